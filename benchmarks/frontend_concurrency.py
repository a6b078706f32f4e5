"""Concurrent requests with large images through `AsyncEngine`: do their decoding and
preprocessing run side by side, and does the event loop stay free meanwhile?

N requests, each a distinct PNG (noise, so decoding costs what a photo's does) and one output
token, all started at once. Measured: wall time until every answer is in, with the frontend's
pool of preparing threads at its default size beside one thread (everything prepared in turn),
and the event loop's longest stall while they run (a ticker that should wake every 1 ms).

    python benchmarks/frontend_concurrency.py [--requests 16] [--size 1920x1080] [--model DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root

from vlm_engine import AsyncEngine, SamplingParams  # noqa: E402
from vlm_engine.demo.model import default_model_path  # noqa: E402


def pngs(n: int, width: int, height: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buffer = io.BytesIO()
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
        out.append(buffer.getvalue())
    return out


async def one_round(engine: AsyncEngine, images: list[bytes]) -> tuple[float, float]:
    """Seconds until every answer is in, and the event loop's longest stall (ms)."""
    params = SamplingParams(temperature=0, max_tokens=1)
    stalls: list[float] = []
    running = True

    async def ticker() -> None:
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stalls.append(now - last - 0.001)
            last = now

    async def ask(image: bytes) -> None:
        prompt = {"prompt": "<start_of_image>What is this?", "images": [image]}
        async for _ in engine.generate(prompt, params):
            pass

    tick = asyncio.ensure_future(ticker())
    start = time.perf_counter()
    await asyncio.gather(*(ask(image) for image in images))
    elapsed = time.perf_counter() - start
    running = False
    await tick
    return elapsed, max(stalls) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--size", default="1920x1080")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    engine = AsyncEngine(args.model or default_model_path(), processor_cache_bytes=0)
    default_pool = engine._frontend
    rows = []
    for label, threads in (
        ("one preparing thread", 1),
        ("default pool", default_pool._max_workers),
    ):
        engine._frontend = concurrent.futures.ThreadPoolExecutor(threads, "bench-frontend")
        times, stalls = [], []
        for r in range(args.rounds):
            images = pngs(args.requests, width, height, seed=100 * threads + r)
            elapsed, stall = asyncio.run(one_round(engine, images))
            times.append(elapsed)
            stalls.append(stall)
        engine._frontend.shutdown()
        rows.append((label, threads, statistics.median(times), max(stalls)))
    engine._frontend = default_pool
    engine.shutdown()
    print(f"{args.requests} concurrent requests, {width}x{height} PNGs, 1 output token")
    print("| preparing | threads | wall s (median) | requests/s | longest event-loop stall ms |")
    print("|---|---:|---:|---:|---:|")
    for label, threads, elapsed, stall in rows:
        print(
            f"| {label} | {threads} | {elapsed:.2f} | {args.requests / elapsed:.1f} | {stall:.1f} |"
        )


if __name__ == "__main__":
    main()
