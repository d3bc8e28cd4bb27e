"""Prometheus metrics of a worker's engine, under vLLM's names so existing dashboards read them (DESIGN §6).

Values are read from `Engine.stats()` when Prometheus scrapes, so the step loop pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
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
