"""What the small kernels of a batch-1 decode step cost: decode ms/token on the Gemma3-4B shape
(random bf16 weights) with kernels taken out of the forward pass, one engine per process
(in-process core). The outputs are garbage; the figures bound what fusing those kernels away
could give.

    python benchmarks/decode_ablation.py [--variants ",residual,qk_norm,attention,residual+qk_norm+attention"]

residual: both residual steps of every layer (post-norm + add + pre-norm) return their inputs;
qk_norm: q/k norm + rotary + KV store returns q and k as they are; attention: returns an
uninitialized tensor of q's shape.
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
import torch  # noqa: E402

import vlm_engine.models.gemma3 as gemma3  # noqa: E402

DEFAULT_VARIANTS = ",residual,qk_norm,attention,residual+qk_norm+attention,"


def remove(parts: set[str]) -> None:
    """Replace the model module's ops named in `parts` by ones that launch nothing."""
    if "residual" in parts:
        gemma3.post_norm_residual_pre_norm = lambda h, residual, *weights_and_eps: (residual, h)
    if "qk_norm" in parts:
        gemma3.norm_rope_store = lambda q, k, v, *rest: (q, k)
    if "attention" in parts:
        gemma3.attention = lambda q, *rest: torch.empty(q.shape, dtype=q.dtype, device=q.device)


def run_one(path: Path, variant: str) -> str:
    remove(set(filter(None, variant.split("+"))))
    args = gpu_runtime.default_args()
    engine = gpu_runtime.make_engine(path, args, core_process=False)
    first, again = (
        gpu_runtime.single_stream_ms(engine, args),
        gpu_runtime.single_stream_ms(engine, args),
    )
    engine.close()
    return f"| {variant or 'nothing'} | {first[1]:.3f} / {again[1]:.3f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated; + joins")
    parser.add_argument("--one", nargs=2, metavar=("PATH", "VARIANT"))
    args = parser.parse_args()
    if args.one:
        print(run_one(Path(args.one[0]), args.one[1]), flush=True)
        return
    print("| removed | decode ms/token (two runs) |")
    print("|---|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        path = gpu_runtime.make_tiny_checkpoint(
            Path(tmp) / "gemma3-4b-shape", **gpu_runtime.GEMMA3_4B
        )
        for variant in args.variants.split(","):
            command = [sys.executable, __file__, "--one", str(path), variant]
            gpu_runtime.print_row_of(command, dict(os.environ))


if __name__ == "__main__":
    main()
