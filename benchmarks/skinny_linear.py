"""Decode-step projections of the Gemma3-4B shape at 1 and 4 rows: cuBLAS (torch's F.linear)
beside the engine's Triton kernels with the configs it picks (kernels/linear.py), each timed as
34 layers of distinct weights replayed from a CUDA graph (so the weights stream from memory, not
from L2), with and without programmatic dependent launch. Also the fused gate/up projection with
its activation against cuBLAS followed by the activation kernel.

    python benchmarks/skinny_linear.py [--sweep | --fp8]

--sweep times, instead, one-row tile configs of the CUDA-core kernel for each projection (block
rows, K tile width, K split, warps; with PDL) beside the config the engine picks: how the
one-row tiles in kernels/linear.py were chosen. --fp8 does the same for float8 weights at 1, 2
and 4 rows, beside the bf16 kernel and the FP8 GEMM of larger steps.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root

from vlm_engine import envs  # noqa: E402
from vlm_engine.kernels.activation import gelu_and_mul  # noqa: E402
from vlm_engine.kernels.gate_up import GATE_UP_GROUP  # noqa: E402
from vlm_engine.kernels.linear import skinny_config  # noqa: E402
from vlm_engine.kernels.triton_linear import LinearConfig, skinny_linear  # noqa: E402

LAYERS = 34
SHAPES = {"q/k/v": (4096, 2560), "o": (2560, 2048), "gate/up": (20480, 2560), "down": (2560, 10240)}


def graph_ms(fn, reps: int = 20) -> float:
    """Milliseconds per call of `fn`, captured once in a CUDA graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / reps)
    return best


def read_bandwidth() -> float:
    """Bytes per second of a 2 GiB sum (reads only), best of 5."""
    data = torch.empty(2**30, dtype=torch.bfloat16, device="cuda").normal_()
    data.sum(dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        data.sum(dtype=torch.float32)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 2 / best


def sweep() -> None:
    """One row: the engine's config and the five fastest of a grid, per projection."""
    tiles = [(2, 1024), (2, 2048), (4, 512), (4, 1024), (4, 2048), (8, 1024), (8, 2048)]
    grid = [
        LinearConfig(block_n=bn, block_k=bk, split_k=split, num_warps=warps)
        for (bn, bk), split, warps in itertools.product(tiles, (1, 2), (2, 4, 8))
    ]
    print("| projection | config | us/layer | GB/s |")
    print("|---|---|---:|---:|")
    for name, (n, k) in SHAPES.items():
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        act = "gelu_mul" if name == "gate/up" else None
        picked = skinny_config(weights[0], 1)
        timed = []
        for config in [picked, *grid]:
            if k // config.split_k < config.block_k:
                continue
            if act == "gelu_mul" and config.block_n % (2 * GATE_UP_GROUP):
                continue  # a tile holds whole groups of gate and up columns

            def engine(config=config, x=x, act=act, weights=weights):
                for w in weights:
                    skinny_linear(x, w, act, config)

            timed.append((graph_ms(engine) / LAYERS * 1e3, config))
        fastest = sorted(timed[1:], key=lambda t: t[0])[:5]
        for i, (us, config) in enumerate([timed[0], *fastest]):
            tile = (f"{config.block_n} x {config.block_k}, split {config.split_k}, "
                    f"{config.num_warps} warps")  # fmt: skip
            mark = " (the engine's)" if i == 0 else ""
            print(f"| {name} | {tile}{mark} | {us:.2f} | {n * k * 2 / us / 1e3:.0f} |", flush=True)


FP8_TILES_CUDA_CORE = [
    LinearConfig(block_n=bn, block_k=bk, split_k=split, num_warps=warps)
    for (bn, bk), split, warps in itertools.product(
        [(4, 1024), (8, 1024), (8, 2048), (16, 1024), (16, 2048), (32, 1024)], (1, 2), (4, 8)
    )
]
FP8_TILES_DOT = [
    LinearConfig(block_n=bn, block_k=bk, split_k=split, num_stages=stages, use_dot=True)
    for (bn, bk, stages), split in itertools.product(
        [(32, 256, 4), (32, 256, 6), (64, 128, 4), (64, 256, 3), (64, 256, 4), (128, 128, 4),
         (32, 512, 3), (64, 512, 3), (128, 256, 3)],
        (1, 2, 4),
    )
]  # fmt: skip


def fp8_sweep() -> None:
    """Float8 weights (kernels/fp8.py) at 1, 2 and 4 rows: the engine's bf16 projection, the
    FP8 GEMM of larger steps (activation quantization + cuBLASLt), the skinny kernels with the
    configs the engine picks for float8, and the five fastest of a grid of both kernels."""
    from vlm_engine.kernels.fp8 import quantize_weight

    print(f"{torch.cuda.get_device_name()}; GB/s: the float8 weight's bytes per second")
    print("| projection | rows | variant | us/layer | GB/s |")
    print("|---|---:|---|---:|---:|")
    for name, (n, k) in SHAPES.items():
        bf16 = [
            torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)
        ]
        quantized = [quantize_weight(w) for w in bf16]
        for rows in (1, 2, 4):
            _fp8_rows(name, rows, bf16, quantized)


def _fp8_rows(name: str, rows: int, bf16: list, quantized: list) -> None:
    from vlm_engine.kernels.fp8 import fp8_linear

    n, k = bf16[0].shape
    act = "gelu_mul" if name == "gate/up" else None
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)

    def run_bf16():
        for w in bf16:
            skinny_linear(x, w, act, skinny_config(w, rows))

    def run_scaled_mm():
        for w, scale in quantized:
            y = fp8_linear(x, w, scale)
            if act:
                gelu_and_mul(y)

    def run(config):
        for w, scale in quantized:
            skinny_linear(x, w, act, config, scale)

    def row(variant, us):
        print(f"| {name} | {rows} | {variant} | {us:.2f} | {n * k / us / 1e3:.0f} |", flush=True)

    def us_per_layer(fn):
        return graph_ms(fn) / LAYERS * 1e3

    row("bf16 weights, the engine's kernel", us_per_layer(run_bf16))
    row("FP8 GEMM (cuBLASLt)", us_per_layer(run_scaled_mm))
    picked = skinny_config(quantized[0][0], rows)
    row(f"float8, the engine's: {_describe(picked)}", us_per_layer(lambda: run(picked)))
    grid = FP8_TILES_DOT + (FP8_TILES_CUDA_CORE if rows <= 2 else [])
    timed = []
    for config in grid:
        if k // config.split_k < config.block_k:
            continue
        if act == "gelu_mul" and config.block_n % (2 * GATE_UP_GROUP):
            continue
        try:
            timed.append((us_per_layer(lambda c=config: run(c)), config))
        except Exception as error:  # a tile too large for the SM's shared memory
            print(f"| {name} | {rows} | {_describe(config)} | failed: {type(error).__name__} | |")
    for us, config in sorted(timed, key=lambda t: t[0])[:5]:
        row(_describe(config), us)


def _describe(config: LinearConfig) -> str:
    kind = f"tensor cores, {config.num_stages} stages" if config.use_dot else "CUDA cores"
    return (f"{config.block_n} x {config.block_k}, split {config.split_k}, "
            f"{config.num_warps} warps, {kind}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="one-row tile configs")
    parser.add_argument("--fp8", action="store_true", help="float8 weights: tile configs")
    torch.manual_seed(0)
    args = parser.parse_args()
    if args.fp8:
        fp8_sweep()
        return
    if args.sweep:
        sweep()
        return
    bandwidth = read_bandwidth()
    print(f"{torch.cuda.get_device_name()}, read bandwidth {bandwidth / 1e9:.0f} GB/s (2 GiB sum)")
    print("| projection | rows | cuBLAS us/layer | engine, no PDL | engine, PDL | engine GB/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (n, k) in SHAPES.items():
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
        for rows in (1, 4):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            act = "gelu_mul" if name == "gate/up" else None
            config = skinny_config(weights[0], rows)

            def cublas(x=x, act=act, weights=weights):
                for w in weights:
                    y = F.linear(x, w)
                    if act:
                        gelu_and_mul(y)

            def engine(x=x, act=act, config=config, weights=weights):
                for w in weights:
                    skinny_linear(x, w, act, config)

            theirs = graph_ms(cublas) / LAYERS * 1e3
            timings = []
            for enabled in (False, True):
                envs.values.pdl = enabled
                timings.append(graph_ms(engine) / LAYERS * 1e3)
            label = f"{name} + activation" if act else name
            print(
                f"| {label} | {rows} | {theirs:.1f} | {timings[0]:.1f} | {timings[1]:.1f} | "
                f"{n * k * 2 / timings[1] / 1e3:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
