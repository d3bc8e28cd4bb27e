"""The workers' engine metrics on the gateway's /metrics, from their heartbeats: one scrape of the API port shows
the whole fleet under vLLM's names, one series per worker (label `worker`), as a vLLM dashboard expects."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from brigade.protocol import WorkerStatus

# (name, kind, help): one series per worker of each.
_FAMILIES = [
    ("vllm:num_requests_running", "gauge", "Requests in each worker's running batch"),
    ("vllm:num_requests_waiting", "gauge", "Requests waiting to be scheduled on each worker"),
    ("vllm:kv_cache_usage_perc", "gauge", "Fraction of each worker's KV blocks in use (1 = full)"),
    ("brigade:kv_blocks_used", "gauge", "KV blocks in use on each worker"),
    ("brigade:kv_blocks_total", "gauge", "KV blocks of each worker's cache"),
    ("brigade:prefill_tokens_queued", "gauge", "Prompt tokens each worker has yet to compute"),
    ("vllm:prefix_cache_queries", "counter", "Prompt tokens each worker looked up in its prefix cache"),
    ("vllm:prefix_cache_hits", "counter", "Prompt tokens each worker found in its prefix cache"),
    ("vllm:num_preemptions", "counter", "Requests each worker preempted (recomputed later)"),
    ("brigade:worker_requests_served", "counter", "Requests each worker finished (handoffs excluded)"),
    ("brigade:worker_kv_transfer_bytes", "counter", "KV bytes each prefill worker sent to decode workers"),
]


def _values(st: WorkerStatus) -> dict[str, float]:
    return {
        "vllm:num_requests_running": st.running, "vllm:num_requests_waiting": st.waiting,
        "vllm:kv_cache_usage_perc": st.kv_used / st.kv_total if st.kv_total else 0.0,
        "brigade:kv_blocks_used": st.kv_used, "brigade:kv_blocks_total": st.kv_total,
        "brigade:prefill_tokens_queued": st.prefill_queued,
        "vllm:prefix_cache_queries": st.prefix_queries, "vllm:prefix_cache_hits": st.prefix_hits,
        "vllm:num_preemptions": st.preemptions, "brigade:worker_requests_served": st.served,
        "brigade:worker_kv_transfer_bytes": st.kv_transfer_bytes,
    }


class FleetCollector(Collector):
    """The latest heartbeat of every live worker, turned into metric families at scrape time."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.latest: dict[str, WorkerStatus] = {}

    def update(self, status: WorkerStatus) -> None:
        """A heartbeat arrived (event loop)."""
        self.latest[status.worker_id] = status

    def forget(self, worker_id: str) -> None:
        """The worker is gone: its series disappear, as a stopped vLLM's would."""
        self.latest.pop(worker_id, None)

    def collect(self) -> Iterator[Metric]:
        rows = [(st, _values(st)) for st in list(self.latest.values())]
        labels = ["model_name", "worker", "role"]
        for name, kind, doc in _FAMILIES:
            metric = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, doc, labels=labels)
            for st, values in rows:
                metric.add_metric([self.model_name, st.worker_id, st.role], float(values[name]))
            yield metric
