"""One trace per request across services: a real OTLP/HTTP receiver behind a disaggregated `brigade up`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import free_port, free_ports, metric_samples

from brigade.bench.otlp import OtlpReceiver, ReceivedSpan
from brigade.launcher import Up, UpConfig

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def up(tiny_models: dict[str, Path], receiver: OtlpReceiver) -> Iterator[Up]:
    mp = pytest.MonkeyPatch()
    mp.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export within 0.1 s, not the default 5 s
    try:
        with Up(UpConfig(model=str(tiny_models["llama"]), port=free_port(), mode="disagg", prefill=1, decode=1,
                         disagg_threshold=4, otlp=receiver.url, metrics_port=free_ports(8),
                         worker_args=("--num-blocks", "128"))) as u:
            yield u
    finally:
        mp.undo()


def _one(trace: list[ReceivedSpan], service: str, name: str) -> ReceivedSpan:
    found = [s for s in trace if s.service == service and s.name == name]
    assert len(found) == 1, (service, name, [(s.service, s.name) for s in trace])
    return found[0]


@pytest.mark.parametrize("stream", [False, True])
def test_one_trace_spans_gateway_router_prefill_decode(up: Up, receiver: OtlpReceiver, stream: bool) -> None:
    body: dict[str, Any] = {"model": "llama", "messages": [{"role": "user", "content": "Tell me about tracing."}],
                            "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    url = f"http://{up.cfg.host}:{up.cfg.port}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    if stream:
        chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        request_id, usage = chunks[0]["id"], chunks[-1]["usage"]
    else:
        doc = json.loads("".join(lines))
        request_id, usage = doc["id"], doc["usage"]

    services = {"brigade-gateway", "brigade-router", "brigade-prefill", "brigade-decode"}
    trace = receiver.trace_of(request_id, services, spans={
        ("brigade-gateway", "POST /v1/chat/completions"), ("brigade-router", "route"), ("brigade-prefill", "prefill"),
        ("brigade-prefill", "kv_transfer"), ("brigade-decode", "decode")})
    assert {s.service for s in trace} == services

    gateway = _one(trace, "brigade-gateway", "POST /v1/chat/completions")
    route = _one(trace, "brigade-router", "route")
    prefill = _one(trace, "brigade-prefill", "prefill")
    transfer = _one(trace, "brigade-prefill", "kv_transfer")
    decode = _one(trace, "brigade-decode", "decode")

    # Parent links: gateway -> router -> prefill -> (kv transfer, decode).
    assert gateway.parent_id == ""
    assert gateway.kind == 2  # SPAN_KIND_SERVER
    assert route.parent_id == gateway.span_id
    assert prefill.parent_id == route.span_id
    assert transfer.parent_id == prefill.span_id
    assert decode.parent_id == prefill.span_id
    assert not any(s.error for s in trace)

    g = gateway.attributes
    assert g["gen_ai.request.id"] == request_id
    assert g["gen_ai.usage.prompt_tokens"] == usage["prompt_tokens"]
    assert g["gen_ai.usage.completion_tokens"] == usage["completion_tokens"] == MAX_TOKENS
    assert 0 < g["gen_ai.latency.time_to_first_token"] <= g["gen_ai.latency.e2e"]
    assert g["gen_ai.request.max_tokens"] == MAX_TOKENS

    assert route.attributes["brigade.worker"] == "prefill-0"
    assert route.attributes["brigade.decode_worker"] == "decode-1"
    p = prefill.attributes
    assert p["gen_ai.usage.prompt_tokens"] == usage["prompt_tokens"]
    assert p["gen_ai.latency.time_in_queue"] >= 0
    assert p["gen_ai.latency.time_to_first_token"] > 0
    assert p["brigade.worker"] == "prefill-0"
    t = transfer.attributes
    assert t["brigade.kv.transport"] == "shm"
    assert t["brigade.kv.transfer_blocks"] == -(-usage["prompt_tokens"] // 16)
    assert t["brigade.kv.transfer_bytes"] > 0 and t["brigade.kv.transfer_seconds"] > 0
    assert decode.attributes["gen_ai.usage.completion_tokens"] == MAX_TOKENS


def test_worker_metrics_count_kv_transfers(up: Up) -> None:
    """The prefill worker's /metrics counts the bytes it moved; one histogram sample per transfer."""
    r = httpx.post(f"http://{up.cfg.host}:{up.cfg.port}/v1/completions", timeout=60,
                   json={"model": "llama", "prompt": "count my bytes please", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200
    text = httpx.get(f"http://127.0.0.1:{up.cfg.metrics_port + 1}/metrics", timeout=5).text  # prefill-0
    samples = metric_samples(text)
    transfers = samples[("brigade:kv_transfer_seconds_count", "transport=shm")]
    assert transfers >= 1
    assert samples[("brigade:kv_transfer_bytes_total", "transport=shm")] > 0
    assert samples.get(("brigade:kv_transfer_failures_total", "transport=shm"), 0) == 0


def test_expert_shard_spans_join_the_request_trace(tiny_models: dict[str, Path], receiver: OtlpReceiver) -> None:
    """MoE with experts on 2 shards: every layer's dispatch is a client span under the worker's request span,
    and each shard's work a server span under that dispatch."""
    mp = pytest.MonkeyPatch()
    mp.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    try:
        with Up(UpConfig(model=str(tiny_models["mixtral"]), port=free_port(), decode=1, experts=2, otlp=receiver.url,
                         worker_args=("--num-blocks", "64"))) as u:
            r = httpx.post(f"{u.url}/v1/completions", timeout=60,
                           json={"model": "mixtral", "prompt": "experts, trace yourselves", "max_tokens": 3,
                                 "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            trace = receiver.trace_of(r.json()["id"], {"brigade-gateway", "brigade-decode", "brigade-experts"},
                                      spans={("brigade-decode", "generate")})
    finally:
        mp.undo()
    generate = _one(trace, "brigade-decode", "generate")
    dispatches = [s for s in trace if s.name == "experts.dispatch"]
    served = [s for s in trace if s.name == "experts"]
    layers = {s.attributes["brigade.moe.layer"] for s in dispatches}
    assert layers == set(range(2)), layers  # tiny mixtral: 2 MoE layers, each dispatched every step
    assert all(s.parent_id == generate.span_id and s.service == "brigade-decode" for s in dispatches)
    by_id = {s.span_id: s for s in dispatches}
    assert served and all(s.parent_id in by_id and s.service == "brigade-experts" for s in served)
    assert len({s.attributes["brigade.moe.shard"] for s in served}) == 2  # both shards took part


def _scrape(url: str) -> dict[tuple[str, str], float]:
    """Every sample of a /metrics page, keyed by (name, sorted labels)."""
    return metric_samples(httpx.get(url, timeout=5).text)


def _total(samples: dict[tuple[str, str], float], name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def test_metrics_move_with_requests_served(up: Up) -> None:
    """Gateway histograms count one sample per request served; token counters move by what was served, on the
    gateway and on the workers alike."""
    gateway = f"http://{up.cfg.host}:{up.cfg.port}/metrics"
    decode = f"http://127.0.0.1:{up.cfg.metrics_port + 2}/metrics"  # decode-1
    before, before_decode = _scrape(gateway), _scrape(decode)
    n, max_tokens = 3, 4
    prompts = 0
    for i in range(n):
        r = httpx.post(f"http://{up.cfg.host}:{up.cfg.port}/v1/completions", timeout=60,
                       json={"model": "llama", "prompt": f"request number {i} of the metrics test",
                             "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200
        prompts += r.json()["usage"]["prompt_tokens"]
    after, after_decode = _scrape(gateway), _scrape(decode)

    def delta(name: str, a: dict[tuple[str, str], float] = after, b: dict[tuple[str, str], float] = before) -> float:
        return _total(a, name) - _total(b, name)

    for hist in ("vllm:e2e_request_latency_seconds", "vllm:time_to_first_token_seconds"):
        assert delta(f"{hist}_count") == n
        assert delta(f"{hist}_sum") > 0
    assert delta("vllm:inter_token_latency_seconds_count") == n * (max_tokens - 1)
    assert delta("vllm:request_success_total") == n
    assert delta("vllm:generation_tokens_total") == n * max_tokens
    assert delta("vllm:prompt_tokens_total") == prompts
    # The decode worker generated all but the first token of each (the prefill worker made that one).
    assert delta("vllm:generation_tokens_total", after_decode, before_decode) == n * (max_tokens - 1)
    assert _total(after_decode, "vllm:kv_cache_usage_perc") == 0.0  # everything finished and freed
