"""Decode-step kernels on and off: the skinny Triton projections (steps of up to 4 tokens) and
programmatic dependent launch, each alone and together, on the Gemma3-4B shape with random bf16
weights: time to first token and decode ms/token at batch 1 (benchmark b), and captioning
images/s (benchmark a). Each variant runs in a fresh process with the core in its own process
(the default), the same settings as gpu_runtime.py; the switches are the environment variables
VLM_ENGINE_SKINNY_LINEAR and VLM_ENGINE_PDL.

    python benchmarks/decode_kernels_ab.py [--skip-captioning] [--variants 11,00,10,01]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_runtime
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root

import gpu_runtime  # noqa: E402


def run_one(path: Path, captioning: bool) -> str:
    args = gpu_runtime.default_args()
    engine = gpu_runtime.make_engine(path, args, core_process=True)
    first = gpu_runtime.single_stream_ms(engine, args)
    images_per_s = args.num_images / gpu_runtime.caption_seconds(engine, args) if captioning else 0
    again = gpu_runtime.single_stream_ms(engine, args)
    engine.close()
    on_off = {"1": "on", "0": "off"}
    return (
        f"| {on_off[os.environ['VLM_ENGINE_SKINNY_LINEAR']]} | "
        f"{on_off[os.environ['VLM_ENGINE_PDL']]} | {first[0]:.1f} / {again[0]:.1f} | "
        f"{first[1]:.2f} / {again[1]:.2f} | {images_per_s:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-captioning", action="store_true")
    parser.add_argument("--variants", default="11,00,10,01", help="skinny and PDL, 1 = on")
    parser.add_argument("--one", metavar="PATH")
    args = parser.parse_args()
    if args.one:
        print(run_one(Path(args.one), not args.skip_captioning), flush=True)
        return
    print("| skinny projections | PDL | time to first token (ms) | decode ms/token | "
          "captioning images/s |")  # fmt: skip
    print("|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        path = gpu_runtime.make_tiny_checkpoint(
            Path(tmp) / "gemma3-4b-shape", **gpu_runtime.GEMMA3_4B
        )
        for skinny, pdl in args.variants.split(","):
            env = dict(os.environ, VLM_ENGINE_SKINNY_LINEAR=skinny, VLM_ENGINE_PDL=pdl)
            command = [sys.executable, __file__, "--one", str(path)]
            if args.skip_captioning:
                command.append("--skip-captioning")
            gpu_runtime.print_row_of(command, env)


if __name__ == "__main__":
    main()
