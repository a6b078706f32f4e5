"""Async scheduling on and off, with the core in-process and in its own process: time to first
token, decode ms/token (benchmark b) and captioning images/s (benchmark a), Gemma3-4B shape with
random bf16 weights on one GPU. Each engine runs in a fresh Python process (an in-process
engine's memory is not handed back to the next one), with the same settings as gpu_runtime.py.

    python benchmarks/async_scheduling_ab.py [--skip-captioning]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_runtime
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root

import gpu_runtime  # noqa: E402


def run_one(path: Path, core_process: bool, async_scheduling: bool, captioning: bool) -> str:
    args = gpu_runtime.default_args()
    engine = gpu_runtime.make_engine(path, args, core_process, async_scheduling)
    first = gpu_runtime.single_stream_ms(engine, args)
    images_per_s = args.num_images / gpu_runtime.caption_seconds(engine, args) if captioning else 0
    again = gpu_runtime.single_stream_ms(engine, args)
    engine.close()
    core = "own process" if core_process else "in-process"
    return (
        f"| {core} | {'on' if async_scheduling else 'off'} | {first[0]:.1f} / {again[0]:.1f} | "
        f"{first[1]:.2f} / {again[1]:.2f} | {images_per_s:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-captioning", action="store_true")
    parser.add_argument("--one", nargs=3, metavar=("PATH", "CORE_PROCESS", "ASYNC"))
    args = parser.parse_args()
    if args.one:
        path, core_process, async_scheduling = args.one
        row = run_one(
            Path(path), core_process == "1", async_scheduling == "1", not args.skip_captioning
        )
        print(row, flush=True)
        return
    print(
        "| core | async scheduling | time to first token (ms) | decode ms/token | captioning images/s |"
    )
    print("|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        path = gpu_runtime.make_tiny_checkpoint(
            Path(tmp) / "gemma3-4b-shape", **gpu_runtime.GEMMA3_4B
        )
        for core_process in ("0", "1"):
            for async_scheduling in ("1", "0"):
                command = [
                    sys.executable,
                    __file__,
                    "--one",
                    str(path),
                    core_process,
                    async_scheduling,
                ]
                if args.skip_captioning:
                    command.append("--skip-captioning")
                gpu_runtime.print_row_of(command)


if __name__ == "__main__":
    main()
