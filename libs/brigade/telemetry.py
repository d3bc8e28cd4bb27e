"""Prometheus metrics of a worker: its engine under vLLM's names (so existing dashboards read them) and its KV
transfers under brigade:* (DESIGN §6).

Engine values are read from `Engine.stats()` when Prometheus scrapes, so the step loop pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from brigade.engine.engine import Engine

# (vLLM name, Engine.stats() key, help, kind)
ENGINE_METRICS = [
    ("vllm:num_requests_running", "num_requests_running", "Requests in the running batch", "gauge"),
    ("vllm:num_requests_waiting", "num_requests_waiting", "Requests waiting to be scheduled", "gauge"),
    ("vllm:kv_cache_usage_perc", "kv_cache_usage", "Fraction of KV blocks in use (1 = full)", "gauge"),
    ("vllm:prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache", "counter"),
    ("vllm:prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache", "counter"),
    ("vllm:num_preemptions", "num_preemptions", "Requests preempted (recomputed later)", "counter"),
    ("vllm:prompt_tokens", "prompt_tokens", "Prompt tokens of requests that got their first token here", "counter"),
    ("vllm:generation_tokens", "generation_tokens", "Tokens generated", "counter"),
]


class EngineCollector(Collector):
    """Reads the engine's counters at scrape time."""

    def __init__(self, engine: Engine, model_name: str, worker_id: str) -> None:
        self.engine = engine
        self.labels = [model_name, worker_id]

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        for name, key, doc, kind in ENGINE_METRICS:
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
                name, doc, labels=["model_name", "worker"])
            family.add_metric(self.labels, float(stats[key]))
            yield family


def engine_registry(engine: Engine, model_name: str, worker_id: str,
                    registry: CollectorRegistry | None = None) -> CollectorRegistry:
    """A registry (new, or the one given) with the engine's metrics on it."""
    registry = registry or CollectorRegistry()
    registry.register(EngineCollector(engine, model_name, worker_id))
    return registry


TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class TransferMetrics:
    """KV pages moved prefill -> decode by this worker, per transport."""

    def __init__(self, registry: CollectorRegistry) -> None:
        t = ["transport"]
        self.bytes = Counter("brigade:kv_transfer_bytes", "KV bytes sent to decode workers", t, registry=registry)
        self.blocks = Counter("brigade:kv_transfer_blocks", "KV blocks sent to decode workers", t, registry=registry)
        self.seconds = Histogram("brigade:kv_transfer_seconds", "Time to move one request's KV pages", t,
                                 buckets=TRANSFER_BUCKETS, registry=registry)
        self.total_bytes = 0  # every transport together, for the heartbeat
        self.failures = Counter("brigade:kv_transfer_failures", "KV transfers or handoffs that failed (fell back)",
                                t, registry=registry)

    def observe(self, transport: str, blocks: int, nbytes: int, seconds: float) -> None:
        self.total_bytes += nbytes
        self.bytes.labels(transport).inc(nbytes)
        self.blocks.labels(transport).inc(blocks)
        self.seconds.labels(transport).observe(seconds)
