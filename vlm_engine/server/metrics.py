"""The server's Prometheus metrics, in a registry of its own (two servers in one process do not
share counters).

The server counts requests by outcome, tokens, and latencies as it answers; the engine's own
state (running and waiting requests, KV-cache use, cache hits) is read from `stats()` at each
scrape.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
CACHES = ("processor_cache", "encoder_cache", "ec_connector", "prefix_cache")


class _EngineState(Collector):
    """The engine's stats of the latest scrape, as gauges and counters."""

    def __init__(self) -> None:
        self.stats: dict[str, Any] = {}

    def collect(self) -> Iterator[Any]:
        stats = self.stats
        if not stats:
            return
        scheduler, kv = stats["scheduler"], stats["kv_cache"]
        yield _gauge(
            "vlm_requests_running", "Requests running in the engine.", scheduler["num_running"]
        )
        yield _gauge(
            "vlm_requests_waiting", "Requests waiting to be scheduled.", scheduler["num_waiting"]
        )
        yield _gauge(
            "vlm_kv_cache_usage_ratio", "Share of the KV-cache blocks in use.", kv["usage"]
        )
        yield _gauge("vlm_kv_cache_blocks", "KV-cache blocks in all.", kv["num_blocks"])
        yield _gauge("vlm_kv_cache_free_blocks", "KV-cache blocks free.", kv["num_free_blocks"])
        hits = CounterMetricFamily("vlm_cache_hits", "Hits of each cache layer.", labels=["cache"])
        queries = CounterMetricFamily(
            "vlm_cache_queries", "Lookups of each cache layer.", labels=["cache"]
        )
        for cache in CACHES:
            found, asked = _hits_and_queries(stats.get(cache, {}))
            hits.add_metric([cache], found)
            queries.add_metric([cache], asked)
        yield hits
        yield queries


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _hits_and_queries(stats: dict[str, Any]) -> tuple[float, float]:
    if "queries" in stats:  # the prefix cache counts tokens looked up and found
        return stats["hits"], stats["queries"]
    hits = stats.get("hits", 0)
    return hits, hits + stats.get("misses", 0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.engine = _EngineState()
        self.registry.register(self.engine)
        self.requests = Counter(
            "vlm_requests", "Requests answered, by outcome.", ["endpoint", "outcome"],
            registry=self.registry,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "vlm_prompt_tokens", "Prompt tokens of finished requests.", registry=self.registry
        )
        self.generation_tokens = Counter(
            "vlm_generation_tokens", "Generated tokens.", registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "vlm_time_to_first_token_seconds", "From arrival to the first output token.",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.inter_token_latency = Histogram(
            "vlm_inter_token_latency_seconds", "Between consecutive output tokens of a request.",
            buckets=TOKEN_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.e2e_latency = Histogram(
            "vlm_e2e_request_latency_seconds", "From arrival to the last output token.",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip

    def render(self, engine_stats: dict[str, Any]) -> bytes:
        self.engine.stats = engine_stats
        return generate_latest(self.registry)
