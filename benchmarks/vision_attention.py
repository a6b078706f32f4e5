"""The vision tower's attention at the Gemma3 SigLIP shape (32 images x 4096 patches, 16 heads of
72) on one GPU: SDPA as vision/siglip.py runs it (on [N, H, P, D] views of the fused q/k/v
projection, then the transpose/reshape copy the out projection needs), SDPA with each backend
forced, SDPA at head_dim 64 and 128 for scale, the Gluon kernel of
kernels/gluon_hopper.py (what the tower runs on Hopper), and the Triton kernel of
kernels/triton_flash.py over a sweep of launch configs. Each row: median ms of
several CUDA-event-timed calls, TFLOP/s of useful work (4 * N * H * P^2 * D), and the max abs
error on the first image against a float32 reference. The fastest config is printed last, ready
to paste into HOPPER_CONFIG.

    python benchmarks/vision_attention.py            # full sweep, ~2 minutes on an H100
    python benchmarks/vision_attention.py --quick    # a handful of configs
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root

from vlm_engine.kernels.vision_attention import (
    gluon_hopper,  # noqa: E402
    vision_attention_ref,  # noqa: E402
)
from vlm_engine.kernels.vision_attention.triton_flash import (  # noqa: E402
    VisionAttentionConfig,
    default_config,
    vision_attention,
)

QUICK_CONFIGS = [
    VisionAttentionConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
    VisionAttentionConfig(
        block_m=128, block_n=64, num_warps=8, num_stages=3, load_k_transposed=True
    ),
    VisionAttentionConfig(block_m=128, block_n=64, num_warps=8, num_stages=3, max_registers=128),
    VisionAttentionConfig(block_m=128, block_n=128, num_warps=8, num_stages=2),
    VisionAttentionConfig(block_m=128, block_n=32, num_warps=8, num_stages=4),
    VisionAttentionConfig(block_m=128, block_n=64, num_warps=4, num_stages=3),
    VisionAttentionConfig(block_m=64, block_n=64, num_warps=4, num_stages=3),
]
# The full sweep re-runs its fastest configs with K read transposed, and with registers capped
# so that two 8-warp (three 4-warp) programs fit on an SM.
RETRIES = 3


def sweep_configs(quick: bool) -> list[VisionAttentionConfig]:
    if quick:
        return QUICK_CONFIGS
    return [
        VisionAttentionConfig(block_m=m, block_n=n, num_warps=w, num_stages=s)
        for m, n, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))
    ]


def label(config: VisionAttentionConfig) -> str:
    extras = ", K transposed" if config.load_k_transposed else ""
    if config.max_registers is not None:
        extras += f", <= {config.max_registers} registers"
    return (
        f"Triton {config.block_m}x{config.block_n}, {config.num_warps} warps, "
        f"{config.num_stages} stages{extras}"
    )


def variants(config: VisionAttentionConfig) -> list[VisionAttentionConfig]:
    """config with K read transposed, and with registers capped for more programs per SM."""
    programs_per_sm = 2 if config.num_warps >= 8 else 3
    registers = 65536 // (programs_per_sm * 32 * config.num_warps) // 8 * 8
    return [
        dataclasses.replace(config, load_k_transposed=True),
        dataclasses.replace(config, max_registers=min(255, registers)),
    ]


def time_ms(fn, warmup: int, reps: int) -> float:
    """Median milliseconds of `reps` calls of fn, each timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def sdpa_on_views(qkv: torch.Tensor, num_heads: int, copy: bool, backend=None):
    """SDPA as siglip.py calls it: q, k, v as [N, H, P, D] views; `copy` adds the
    transpose/reshape to [N, P, H * D] the out projection needs."""
    num_images, num_patches, width = qkv.shape
    head_dim = width // (3 * num_heads)
    q, k, v = qkv.unflatten(-1, (3, num_heads, head_dim)).permute(2, 0, 3, 1, 4)

    def run() -> torch.Tensor:
        if backend is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v)
        if not copy:
            return out.transpose(1, 2)  # a view, for the error column only
        return out.transpose(1, 2).reshape(num_images, num_patches, num_heads * head_dim)

    return run


class Table:
    """Prints rows as they come; remembers the first row's time as the baseline."""

    def __init__(self, flops: float, reference: torch.Tensor, warmup: int, reps: int):
        self.flops, self.reference = flops, reference
        self.warmup, self.reps = warmup, reps
        self.baseline_ms: float | None = None
        print("| variant | ms | TFLOP/s | vs SDPA + copy | max abs err (image 0) |")
        print("|---|---:|---:|---:|---:|")

    def time(self, name: str, fn, flops: float | None = None) -> float | None:
        """Times fn and prints its row; `flops` for another shape (then no error column)."""
        try:
            out = fn()
            torch.cuda.synchronize()
            ms = time_ms(fn, self.warmup, self.reps)
        except Exception as error:  # an unsupported backend, out of shared memory, ...
            torch.cuda.synchronize()
            print(f"| {name} | skipped: {type(error).__name__}: {str(error)[:80]} | | | |")
            return None
        self.baseline_ms = self.baseline_ms or ms
        error = "-"
        if flops is None:
            flat = out[:1].reshape(self.reference.shape).float()
            error = f"{(flat - self.reference).abs().max().item():.2e}"
        print(
            f"| {name} | {ms:.3f} | {(flops or self.flops) / ms / 1e9:.0f} | "
            f"{self.baseline_ms / ms:.2f}x | {error} |",
            flush=True,
        )
        return ms


def random_qkv(args: argparse.Namespace, head_dim: int) -> torch.Tensor:
    width = 3 * args.heads * head_dim
    return torch.randn(args.images, args.patches, width, device="cuda", dtype=torch.bfloat16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a handful of Triton configs")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--patches", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=72)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/vision_attention.py needs a CUDA device")

    torch.manual_seed(0)
    n, p, h, d = args.images, args.patches, args.heads, args.head_dim
    qkv = random_qkv(args, d)  # [N, P, 3 * H * D]
    with sdpa_kernel(SDPBackend.MATH):  # float32, no TF32: the error column's reference
        reference = vision_attention_ref(qkv[:1].float(), h)
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"qkv [{n}, {p}, 3 * {h} * {d}] bf16"
    )
    table = Table(4 * n * h * p * p * d, reference, args.warmup, args.reps)
    table.time("SDPA + transpose/reshape copy (siglip.py today)", sdpa_on_views(qkv, h, True))
    table.time("SDPA, no copy", sdpa_on_views(qkv, h, False))
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                    SDPBackend.EFFICIENT_ATTENTION):  # fmt: skip
        table.time(f"SDPA {backend.name} + copy", sdpa_on_views(qkv, h, True, backend))
    for other_dim in (64, 128):  # for scale: where SDPA's time for D=72 comes from
        fn = sdpa_on_views(random_qkv(args, other_dim), h, True)
        table.time(f"SDPA + copy at head_dim {other_dim}", fn, 4 * n * h * p * p * other_dim)

    if gluon_hopper.supported(qkv, h):
        table.time(
            "Gluon: warp-specialized, TMA, async wgmma (the tower's default on Hopper)",
            lambda: gluon_hopper.vision_attention(qkv, h),
        )
    else:
        print("| Gluon kernel | skipped: not supported here (needs Hopper, 64 < D <= 80) | | | |")
    table.time(
        f"{label(default_config(p, qkv.device))} (default)", lambda: vision_attention(qkv, h)
    )
    timings = {}
    for config in sweep_configs(args.quick):
        ms = table.time(label(config), lambda c=config: vision_attention(qkv, h, config=c))
        if ms is not None:
            timings[config] = ms
    if not args.quick:
        fastest = sorted(timings, key=timings.get)[:RETRIES]
        for config in [variant for c in fastest for variant in variants(c)]:
            ms = table.time(label(config), lambda c=config: vision_attention(qkv, h, config=c))
            if ms is not None:
                timings[config] = ms
    if timings:
        best = min(timings, key=timings.get)
        print(f"\nfastest: {best}  ({timings[best]:.3f} ms)")


if __name__ == "__main__":
    main()
