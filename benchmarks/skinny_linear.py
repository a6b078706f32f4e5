"""Decode-step projections of the Gemma3-4B shape at 1 and 4 rows: cuBLAS (torch's F.linear)
beside the engine's Triton kernels with the configs it picks (kernels/linear.py), each timed as
34 layers of distinct weights replayed from a CUDA graph (so the weights stream from memory, not
from L2), with and without programmatic dependent launch. Also the fused gate/up projection with
its activation against cuBLAS followed by the activation kernel.

    python benchmarks/skinny_linear.py [--sweep]

--sweep times, instead, one-row tile configs of the CUDA-core kernel for each projection (block
rows, K tile width, K split, warps; with PDL) beside the config the engine picks: how the
one-row tiles in kernels/linear.py were chosen.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="one-row tile configs")
    torch.manual_seed(0)
    if parser.parse_args().sweep:
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
