"""The Ray captioning path with one replica beside the local command, on the same image files:
what Ray Data, the file hashing and the actor cost.

N image files (JPEG, sizes drawn between 320x240 and 1600x1200, all distinct), a caption of a
fixed length each. The rates count captioning, not starting the engines (the Ray path's count
includes hashing the files); the job times include everything.

    python benchmarks/ray_captioning.py                    # Gemma3-4B shape, random weights, GPU
    python benchmarks/ray_captioning.py --demo --num-images 64               # the demo model, CPU
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root

from gpu_runtime import GEMMA3_4B  # noqa: E402

from vlm_engine import Engine, SamplingParams  # noqa: E402
from vlm_engine.captioning import caption_images, find_images  # noqa: E402
from vlm_engine.demo.model import default_model_path  # noqa: E402
from vlm_engine.testing import make_tiny_checkpoint  # noqa: E402


def write_images(folder: Path, n: int, seed: int) -> None:
    rng, pixels = random.Random(seed), np.random.default_rng(seed)
    for i in range(n):
        width, height = rng.randint(320, 1600), rng.randint(240, 1200)
        coarse = pixels.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        picture = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
        picture.save(folder / f"image{i:05d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--demo", action="store_true", help="the demo model (CPU) instead of 4B")
    args = parser.parse_args()
    params = SamplingParams(
        temperature=0, max_tokens=args.output_len, min_tokens=args.output_len, ignore_eos=True
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        write_images(root / "images", args.num_images, seed=0)
        images = find_images([root / "images"])
        if args.demo:
            model, options = default_model_path(), {}
        else:
            model = make_tiny_checkpoint(root / "gemma3-4b-shape", **GEMMA3_4B)
            options = {"load_format": "dummy", "max_model_len": 4096, "max_num_seqs": 256}
        local_start = time.perf_counter()
        with Engine(model, **options) as engine:
            engine_start = time.perf_counter() - local_start
            local = caption_images(
                engine, images, root / "local.jsonl", params=params, batch_size=args.batch_size
            )
        local_total = time.perf_counter() - local_start
        local_steady = args.num_images / local.elapsed_s

        import ray

        from vlm_engine.distributed import caption_dataset

        ray.init(include_dashboard=False, log_to_driver=False)
        start = time.perf_counter()
        remote = caption_dataset(
            [root / "images"], root / "ray.jsonl", model=model, params=params, replicas=1,
            batch_size=args.batch_size // 4, engine_options=options,
        )  # fmt: skip
        ray_total = time.perf_counter() - start
        ray_steady = args.num_images / remote.elapsed_s
        ray.shutdown()
    print(f"{args.num_images} distinct images, {args.output_len} output tokens each")
    print("| path | job s (engine start included) | images/s (captioning) | engine idle |")
    print("|---|---:|---:|---:|")
    print(
        f"| local command | {local_total:.1f} (engine start {engine_start:.1f}) | {local_steady:.2f} | |"
    )
    idle = f"{remote.engine_idle_share:.1%}" if remote.engine_idle_share is not None else ""
    print(f"| Ray, 1 replica | {ray_total:.1f} | {ray_steady:.2f} | {idle} |")
    change = (ray_steady / local_steady - 1) * 100
    print(f"\nRay path against the local command, images/s: {change:+.1f}%")


if __name__ == "__main__":
    main()
