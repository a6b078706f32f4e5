"""Batch captioning with the engine core in-process and in its own process, side by side.

    python benchmarks/process_split.py [--model DIR] [--num-images 256] [--output-len 16]

The images are PNG files of generated shapes (the frontend decodes, hashes and preprocesses
each), one chat request per image, greedy with a fixed output length. Each mode gets a fresh
engine, a warm-up batch, then `--repeats` timed runs over a fresh set of files (no cache hits);
the best run counts. Default model: the built-in demo model, on the CPU unless `--device cuda`.
The GPU figures for the Gemma3-4B shape come from `gpu_runtime.py --core-process both`.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root

from vlm_engine import Engine, SamplingParams  # noqa: E402
from vlm_engine.demo import default_model_path  # noqa: E402
from vlm_engine.demo.model import demo_request  # noqa: E402
from vlm_engine.demo.shapes import make_example  # noqa: E402


def write_images(folder: Path, n: int, seed: int) -> list[Path]:
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        image, _ = make_example(rng)
        paths.append(folder / f"{i:05d}.png")
        image.save(paths[-1])
    return paths


def run_mode(model: Path, core_process: bool, image_sets: list[list[Path]], args) -> float:
    params = SamplingParams(temperature=0, max_tokens=args.output_len, min_tokens=args.output_len)
    with Engine(model, device=args.device, core_process=core_process) as engine:
        engine.generate([demo_request(str(p)) for p in image_sets[0][:8]], params)  # warm-up
        best = float("inf")
        for paths in image_sets[1:]:
            start = time.perf_counter()
            outputs = engine.generate([demo_request(str(p)) for p in paths], params)
            best = min(best, time.perf_counter() - start)
            assert all(len(o.token_ids) == args.output_len for o in outputs)
    return len(image_sets[1]) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="default: built-in demo model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model = args.model or default_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        rates = {}
        for core_process in (False, True):
            sets = [
                write_images(Path(tmp) / f"{core_process}-{r}", args.num_images, seed=r)
                for r in range(args.repeats + 1)
            ]
            rates[core_process] = run_mode(model, core_process, sets, args)
    print(f"\n{args.num_images} images x {args.output_len} tokens, {model.name}, {args.device}")
    print("| core | images/s | vs in-process |")
    print("|---|---:|---:|")
    for core_process, label in ((False, "in-process"), (True, "own process (ZMQ)")):
        print(
            f"| {label} | {rates[core_process]:.1f} | {rates[core_process] / rates[False]:.2f}x |"
        )


if __name__ == "__main__":
    main()
