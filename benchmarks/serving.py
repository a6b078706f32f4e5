"""Serving under load: the OpenAI server (`vlm-engine serve`, the official client's wire format)
beside the same workload sent straight into an in-process `AsyncEngine`, so the server's own cost
shows as the difference.

Workload: requests arrive as a Poisson process at each rate; each has 0-2 images (JPEG, sizes
drawn between 320x240 and 1600x1200), a prompt of 8-160 words and a fixed output length drawn
from 16-256 tokens (`ignore_eos`, `min_tokens`, so random weights stop nowhere else). Every
request streams; per request the time to first token, the gaps between tokens, and the end.
The server's clients are spread over several processes (`--client-processes`), so that reading
the streams with the official client never becomes the bottleneck being measured; `--client
httpx` sends the same requests through httpx and reads the events with json alone, which leaves
the official client's own cost out.

    python benchmarks/serving.py                         # Gemma3-4B shape, random weights, GPU
    python benchmarks/serving.py --demo --rates 2,4 --num-requests 40      # the demo model, CPU

Prints one row per rate and path: completed requests/s, output tokens/s, time to first token and
inter-token latency p50/p99, then the server's overhead against the engine (throughput and
p50 time to first token), and where the server's time to first token goes: the mean at its
clients, the mean inside the server (the engine's arrival to the first token on the server's
event loop, from `/metrics`; the rest is HTTP, the request's parsing and the clients), and the
mean through `AsyncEngine`. Last, the fixed cost apart from load: requests sent one at a time to
an idle engine (`--probes`), without an image and with one, through both paths. The jobs and
the clients that send them are in `serving_clients.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from the repo root

from gpu_runtime import GEMMA3_4B  # noqa: E402
from serving_clients import (  # noqa: E402
    CLIENTS,
    MODEL,
    EngineClient,
    Job,
    Timing,
    make_client,
    make_jobs,
    make_probes,
    probe,
    send_jobs,
)

from vlm_engine import AsyncEngine  # noqa: E402
from vlm_engine.demo.model import default_model_path  # noqa: E402
from vlm_engine.testing import make_tiny_checkpoint  # noqa: E402
from vlm_engine.testing.server_process import ServerProcess  # noqa: E402


def run_server(
    url: str, args: argparse.Namespace, rate: float
) -> tuple[float, list[Timing], float]:
    """The rate's jobs through the server, dealt round-robin to client processes. Each builds
    its jobs, then waits until all are ready; they start together at one moment of the shared
    monotonic clock. Also returns the server's own mean time to first token (ms) over these
    jobs, from its `/metrics`."""
    parts = args.client_processes
    context = multiprocessing.get_context("spawn")
    ready, go = context.Barrier(parts + 1), context.Event()
    start, results = context.Value("d", 0.0), context.Queue()
    workers = [
        context.Process(
            target=client_process, args=(url, args, rate, part, ready, go, start, results)
        )
        for part in range(parts)
    ]
    for worker in workers:
        worker.start()
    ready.wait(timeout=300)
    seconds, count = server_ttft(url)  # the clients' warm-up requests are done
    start.value = t0 = time.perf_counter() + 0.5
    go.set()
    timings = [t for _ in workers for t in results.get(timeout=1800)]
    for worker in workers:
        worker.join()
    seconds_after, count_after = server_ttft(url)
    own = (seconds_after - seconds) / max(count_after - count, 1) * 1e3
    return max(t.end for t in timings) - t0, timings, own


def server_ttft(url: str) -> tuple[float, float]:
    """The server's time-to-first-token histogram so far: (sum of seconds, count). It runs
    from a request's arrival at the engine to its first token on the server's event loop."""
    name = "vlm_time_to_first_token_seconds"
    text = httpx.get(f"{url}/metrics", timeout=30).text
    family = next(f for f in text_string_to_metric_families(text) if f.name == name)
    values = {sample.name: sample.value for sample in family.samples}
    return values[f"{name}_sum"], values[f"{name}_count"]


def client_process(url, args, rate, part, ready, go, start, results) -> None:
    jobs = make_jobs(args.num_requests, rate, args.seed, args.max_output)
    asyncio.run(_warm_up(url, args.client))
    ready.wait(timeout=300)
    go.wait(timeout=300)
    mine = jobs[part :: args.client_processes]
    results.put(asyncio.run(send_jobs(make_client(url, args.client), mine, start.value)))


async def _warm_up(url: str, kind: str) -> None:
    """This process's client and its connections, and one request through the server."""
    warm = make_jobs(2, 100.0, seed=12345, max_output=16)
    await send_jobs(make_client(url, kind), warm, time.perf_counter())


def probe_ttft(timings: list[Timing]) -> tuple[float, float]:
    """p50 time to first token (ms) of the probes without an image and with one."""
    return tuple(
        statistics.median((t.first - t.start) * 1e3 for t in timings if t.images == k)
        for k in (0, 1)
    )


async def run_engine(engine: AsyncEngine, jobs: list[Job]) -> tuple[float, list[Timing]]:
    client = EngineClient(engine)
    warm = make_jobs(8, 100.0, seed=12345, max_output=16)
    await send_jobs(client, warm, time.perf_counter())
    t0 = time.perf_counter()
    timings = await send_jobs(client, jobs, t0)
    return max(t.end for t in timings) - t0, timings


def run_loop(coroutine):
    """The in-process path on the event loop the server gets from uvicorn: uvloop where it is
    installed (the `serve` extra installs it), so that the two paths differ by the server only."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def summary(elapsed: float, timings: list[Timing], jobs: list[Job]) -> dict[str, float]:
    ttft = sorted((t.first - t.start) * 1e3 for t in timings if t.first is not None)
    text_ttft = sorted((t.first - t.start) * 1e3 for t in timings if t.first and not t.images)
    gaps = sorted(
        (b - a) * 1e3 for t in timings for a, b in zip(t.stamps, t.stamps[1:], strict=False)
    )
    tokens = sum(job.output_len for job in jobs)
    return {
        "requests_s": len(jobs) / elapsed,
        "tokens_s": tokens / elapsed,
        "ttft_p50": _pct(ttft, 50), "ttft_p99": _pct(ttft, 99),
        "ttft_mean": statistics.mean(ttft),
        "text_ttft_p50": _pct(text_ttft, 50),
        "itl_p50": _pct(gaps, 50), "itl_p99": _pct(gaps, 99),
    }  # fmt: skip


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return (
        statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]
        if len(values) > 1
        else values[0]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="2,4,8", help="requests per second, one run each")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--max-output", type=int, default=256)
    parser.add_argument("--demo", action="store_true", help="the demo model (CPU) instead of 4B")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--probes", type=int, default=20, help="requests sent one at a time to an idle engine"
    )
    parser.add_argument(
        "--client-processes", type=int, default=4, help="processes the server's clients run in"
    )
    parser.add_argument(
        "--client", choices=sorted(CLIENTS), default="openai",
        help="the server's client: the official openai client, or the same requests through "
        "httpx and json alone (the server's share without the client's own cost)",
    )  # fmt: skip
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.demo:
            path, options = default_model_path(), ["--max-model-len", "1024"]
            engine_options = {"max_model_len": 1024}
        else:
            path = make_tiny_checkpoint(Path(tmp) / "gemma3-4b-shape", **GEMMA3_4B)
            options = ["--load-format", "dummy", "--max-model-len", "4096", "--max-num-seqs", "256"]
            engine_options = {"load_format": "dummy", "max_model_len": 4096, "max_num_seqs": 256}
        server = ServerProcess(
            [
                "--model",
                str(path),
                "--served-model-name",
                MODEL,
                "--log-level",
                "warning",
                *options,
            ],
            Path(tmp) / "server.log",
        )
        jobs_by_rate = {
            r: make_jobs(args.num_requests, r, args.seed, args.max_output) for r in rates
        }
        warm = make_jobs(8, 100.0, seed=12345, max_output=16)  # the server's first requests
        asyncio.run(send_jobs(make_client(server.url, args.client), warm, time.perf_counter()))
        served, own_ttft = {}, {}
        for rate in rates:
            elapsed, timings, own_ttft[rate] = run_server(server.url, args, rate)
            served[rate] = summary(elapsed, timings, jobs_by_rate[rate])
        probes = make_probes(args.probes)
        idle_server = probe_ttft(
            asyncio.run(probe(lambda: make_client(server.url, args.client), probes))
        )
        server.stop()
        engine = AsyncEngine(path, **engine_options)
        direct = {}
        for rate in rates:
            elapsed, timings = run_loop(run_engine(engine, jobs_by_rate[rate]))
            direct[rate] = summary(elapsed, timings, jobs_by_rate[rate])
        idle_engine = probe_ttft(run_loop(probe(lambda: EngineClient(engine), probes)))
        engine.shutdown()
    print(
        f"{args.num_requests} requests per rate, 0-2 images, outputs 16-{args.max_output} "
        f"tokens; the server's {args.client} clients in {args.client_processes} processes"
    )
    print(
        "| rate req/s | path | req/s | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for rate in rates:
        for name, row in (("server", served[rate]), ("AsyncEngine", direct[rate])):
            print(
                f"| {rate:g} | {name} | {row['requests_s']:.2f} | {row['tokens_s']:.0f} | "
                f"{row['ttft_p50']:.1f} | {row['ttft_p99']:.1f} | {row['itl_p50']:.2f} | "
                f"{row['itl_p99']:.2f} |"
            )
    print(
        "\n| rate req/s | server throughput vs engine | server TTFT p50 - engine (ms) | "
        "the same, requests without images (ms) |"
    )
    print("|---:|---:|---:|---:|")
    for rate in rates:
        loss = 1 - served[rate]["tokens_s"] / direct[rate]["tokens_s"]
        extra = served[rate]["ttft_p50"] - direct[rate]["ttft_p50"]
        text = served[rate]["text_ttft_p50"] - direct[rate]["text_ttft_p50"]
        print(f"| {rate:g} | {-loss * 100:+.1f}% | {extra:+.1f} | {text:+.1f} |")
    print(
        "\nMean time to first token (ms): at the server's clients; inside the server (arrival at "
        "the engine to the first token on its event loop, from /metrics); through AsyncEngine"
    )
    print("| rate req/s | server's clients | inside the server | AsyncEngine |")
    print("|---:|---:|---:|---:|")
    for rate in rates:
        print(
            f"| {rate:g} | {served[rate]['ttft_mean']:.1f} | {own_ttft[rate]:.1f} | "
            f"{direct[rate]['ttft_mean']:.1f} |"
        )

    print(
        f"\nIdle engine, {args.probes} requests one at a time (8 output tokens): "
        "p50 time to first token (ms)"
    )
    print("| request | server | AsyncEngine | server - engine |")
    print("|---|---:|---:|---:|")
    for k, name in enumerate(("no image", "one 1024x768 JPEG")):
        print(
            f"| {name} | {idle_server[k]:.1f} | {idle_engine[k]:.1f} | "
            f"{idle_server[k] - idle_engine[k]:+.1f} |"
        )


if __name__ == "__main__":
    main()
