"""Serving-benchmark arithmetic on hand-made streams, and the workloads' determinism and shapes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from brigade.bench.compare import fleet_stats
from brigade.bench.loadgen import StreamParser, arrival_offsets, base_url
from brigade.bench.metrics import RequestRecord, by_tag, peak_concurrency, percentile, stats_ms, summarize, timing, tpot
from brigade.bench.report import compare_table, result, summary_text
from brigade.bench.workloads import WORKLOADS, Request, build, fit, interference, mixed, rag, sharegpt
from brigade.protocol import WorkerStatus


@pytest.mark.parametrize("xs", [[1.0], [3.0, 1.0], [1.0, 2.0, 3.0, 4.0], [5.0, 0.5, 9.0, 2.0, 2.0, 7.5, 1.0]])
@pytest.mark.parametrize("q", [0, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(xs: list[float], q: float) -> None:
    assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_percentile_by_hand() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)  # rank 2.97: 3 + 0.97 * (4 - 3)
    assert math.isnan(percentile([], 50))
    assert stats_ms([]) == {"mean": None, "median": None, "p90": None, "p99": None, "max": None}
    assert stats_ms([0.001, 0.003]) == pytest.approx({"mean": 2.0, "median": 2.0, "p90": 2.8, "p99": 2.98,
                                                      "max": 3.0})


def _feed(lines_at: list[tuple[float, str]]) -> StreamParser:
    p = StreamParser()
    for t, line in lines_at:
        p.feed(line, t)
    return p


def _chunk(text: str, finish: str | None = None) -> str:
    return "data: " + json.dumps({"object": "text_completion", "choices": [{"index": 0, "text": text,
                                                                           "finish_reason": finish}]})


def test_completion_stream_timing() -> None:
    """Sent at t=10; text chunks at 10.2, 10.25, 10.4 (the last carries two tokens); usage says 4 tokens."""
    usage = "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4}})
    p = _feed([(10.2, _chunk("a")), (10.2, ""), (10.25, _chunk("b")), (10.3, ": ping"), (10.4, _chunk("cd")),
               (10.45, _chunk("", "length")), (10.5, usage), (10.5, "data: [DONE]")])
    assert p.done and not p.error
    assert p.chunk_times == [10.2, 10.25, 10.4]  # the empty finish chunk is no token
    assert p.usage == {"prompt_tokens": 7, "completion_tokens": 4}
    ttft, itl, e2e = timing(10.0, p.chunk_times, 10.5)
    assert ttft == pytest.approx(0.2)
    assert itl == pytest.approx([0.05, 0.15])  # per chunk: two gaps for three later tokens
    assert e2e == pytest.approx(0.5)
    r = RequestRecord(0, "t", 7, 4, ok=True, output_tokens=4, ttft_s=ttft, itl_s=itl, e2e_s=e2e)
    assert tpot(r) == pytest.approx((0.5 - 0.2) / 3)  # per token, from usage's count
    assert tpot(RequestRecord(0, "t", 7, 1, ok=True, output_tokens=1, ttft_s=0.1, e2e_s=0.1)) is None


def test_chat_stream_and_errors() -> None:
    role = "data: " + json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    word = "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": "hi"}}]})
    assert _feed([(1.0, role), (2.0, word), (3.0, "data: [DONE]")]).chunk_times == [2.0]
    err = "data: " + json.dumps({"error": {"message": "generation failed: boom", "type": "server_error"}})
    p = _feed([(1.0, _chunk("a")), (2.0, err), (2.1, "data: [DONE]")])
    assert p.error == "generation failed: boom"
    assert "bad SSE data" in _feed([(1.0, "data: {not json")]).error
    assert _feed([(1.0, "data: " + json.dumps({"object": "error", "message": "old vllm"}))]).error == "old vllm"


def _runs() -> list[RequestRecord]:
    return [
        RequestRecord(0, "a", 10, 3, start_s=0.0, ok=True, output_tokens=3, ttft_s=0.1, itl_s=[0.05, 0.05],
                      e2e_s=0.2, status=200),
        RequestRecord(1, "b", 20, 5, start_s=0.1, ok=True, output_tokens=5, ttft_s=0.3, itl_s=[0.1] * 4, e2e_s=0.7,
                      status=200),
        RequestRecord(2, "b", 30, 4, start_s=0.5, ok=False, e2e_s=0.01, status=500, error="boom"),
        RequestRecord(3, "a", 5, 2, start_s=0.9, ok=False, error="ConnectError: refused"),
    ]


def test_summary_counts_and_stats() -> None:
    s = summarize(_runs(), duration_s=2.0)
    assert (s["requests"], s["successful"], s["failed"]) == (4, 2, 2)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (30, 8)
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(4.0)
    assert s["total_token_throughput"] == pytest.approx(19.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert s["ttft_ms"]["median"] == pytest.approx(200.0)
    assert s["tpot_ms"]["mean"] == pytest.approx((50.0 + 100.0) / 2)  # (0.2-0.1)/2 and (0.7-0.3)/4
    assert s["itl_ms"]["mean"] == pytest.approx((2 * 50 + 4 * 100) / 6)  # every gap of every request
    assert s["itl_ms"]["p99"] == pytest.approx(100.0)
    assert s["e2e_ms"]["max"] == pytest.approx(700.0)
    assert s["errors"] == {"500: boom": 1, "no response: ConnectError: refused": 1}
    assert s["peak_concurrency"] == 2  # 0-0.2 and 0.1-0.8 overlap; 0.5-0.51 overlaps the second
    tags = by_tag(_runs(), 2.0)
    assert list(tags) == ["a", "b"]
    assert (tags["a"]["successful"], tags["a"]["failed"], tags["b"]["successful"]) == (1, 1, 1)
    assert tags["b"]["ttft_ms"]["p99"] == pytest.approx(300.0)


def test_peak_concurrency_back_to_back() -> None:
    rs = [RequestRecord(i, "", 1, 1, start_s=float(i), e2e_s=1.0) for i in range(3)]
    assert peak_concurrency(rs) == 1  # one ends exactly when the next starts


def test_report_text_and_json() -> None:
    res = result({"workload": "x"}, _runs(), 2.0)
    json.dumps(res, allow_nan=False)  # valid JSON: no NaN even with empty statistics
    assert set(res) == {"config", "summary", "tags", "requests"}
    assert res["requests"][1]["itl_s"] == [0.1] * 4
    text = summary_text(res["summary"], res["tags"])
    for want in ["Successful requests:", "Failed requests:", "Request throughput (req/s):",
                 "Output token throughput (tok/s):", "Total token throughput (tok/s):", "Median TTFT (ms):",
                 "P99 TPOT (ms):", "Mean ITL (ms):", "P99 E2EL (ms):", "Per tag", "500: boom"]:
        assert want in text
    table = compare_table([{"name": "one", **res}, {"name": "two", "summary": {**res["summary"],
                                                                              "output_throughput": 8.0}},
                           {"name": "three", "error": "did not start"}])
    assert "2.00x" in table and "1.00x" in table and "error: did not start" in table


def test_arrival_offsets() -> None:
    reqs = [Request((1,), 1)] * 2000
    a, b = arrival_offsets(reqs, 10.0, seed=1), arrival_offsets(reqs, 10.0, seed=1)
    assert a == b and a[0] == 0.0 and a != arrival_offsets(reqs, 10.0, seed=2)
    assert all(x <= y for x, y in zip(a, a[1:], strict=False))
    assert a[-1] / (len(a) - 1) == pytest.approx(0.1, rel=0.1)  # mean gap 1/rate
    assert arrival_offsets(reqs[:3], None, 0) == [0.0, 0.0, 0.0]  # all at once
    assert arrival_offsets([Request((1,), 1, arrival=2.5)], 10.0, 0) == [2.5]  # the workload's own time
    assert base_url("http://h:1/v1/") == "http://h:1"


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_workloads_deterministic_and_fit(name: str) -> None:
    a = build(name, 40, 1024, seed=3, max_context=512)
    assert a == build(name, 40, 1024, seed=3, max_context=512)
    assert a != build(name, 40, 1024, seed=4, max_context=512)
    assert len(a) == 40
    assert all(len(r.prompt_ids) + r.max_tokens <= 512 and r.prompt_ids and r.max_tokens >= 1 for r in a)
    assert all(16 <= t < 1024 for r in a for t in r.prompt_ids)


def test_mixed_unchanged_by_build() -> None:
    assert build("mixed", 30, 1024, seed=0, max_context=100_000) == mixed(30, 1024, 0)
    outs = [r.max_tokens for r in mixed(400, 1024, 0)]
    assert min(outs) < 16 and max(outs) > 256  # a wide spread between 8 and 512


def test_fit() -> None:
    r = Request(tuple(range(16, 416)), 200, "x")
    assert fit(r, 1000) is r
    f = fit(r, 300)
    assert (len(f.prompt_ids), f.max_tokens) == (100, 200) and f.prompt_ids == r.prompt_ids[:100]
    g = fit(Request((20,) * 10, 500), 300)
    assert (len(g.prompt_ids), g.max_tokens) == (1, 299)


def test_rag_sessions_share_documents() -> None:
    reqs = rag(40, 1024, seed=0, max_context=8192)
    assert {r.tag for r in reqs} == {"first", "followup"}
    sessions: dict[tuple[int, ...], list[Request]] = {}
    for r in reqs:
        sessions.setdefault(r.prompt_ids[:2048], []).append(r)  # the document is the first 2048 tokens
    assert len(sessions) == 5  # 40 requests, 8 turns per session
    for turns in sessions.values():
        assert [t.tag for t in turns] == ["first"] + ["followup"] * (len(turns) - 1)
        assert all(16 <= len(t.prompt_ids) - 2048 <= 64 for t in turns)  # a short question after it
        assert len({t.prompt_ids for t in turns}) == len(turns)  # fresh questions
    order = [next(i for i, s in enumerate(sessions) if r.prompt_ids[:2048] == s) for r in reqs]
    assert order != sorted(order)  # sessions interleave
    small = rag(16, 1024, seed=0, max_context=512)
    assert all(len(r.prompt_ids) + r.max_tokens <= 512 for r in small)
    assert len({r.prompt_ids[:384] for r in small}) == 2  # document shrunk to 512 - 64 - 64


def test_rag_cacheable_tokens_and_hot_document() -> None:
    reqs = rag(40, 1024, seed=0, max_context=8192)
    assert all(r.cacheable == (2048 if r.tag == "followup" else 0) for r in reqs)
    hot = rag(40, 1024, seed=0, max_context=8192, hot=True)
    assert len({r.prompt_ids[:2048] for r in hot}) == 1  # one document shared by every session
    assert [r.cacheable for r in hot] == [0] + [2048] * 39  # only the very first request misses
    assert sum(r.tag == "first" for r in hot) == 5  # still 5 sessions of 8 turns
    assert fit(hot[1], 1000).cacheable == 1000 - hot[1].max_tokens  # a cut prompt caps what can be cached


def test_fleet_stats_balance_and_hit_share() -> None:
    def st(w: str, served: int, queries: int, hits: int) -> WorkerStatus:
        return WorkerStatus(w, "colocated", "m", 16, 0, served=served, prefix_queries=queries, prefix_hits=hits)

    before = {"a": st("a", 5, 100, 0), "b": st("b", 0, 0, 0)}
    after = {"a": st("a", 11, 4100, 3000), "b": st("b", 2, 1000, 500), "c": st("c", 1, 100, 0)}
    reqs = [Request((20,) * 10, 1, cacheable=c) for c in (0, 2000, 2000)]
    s = fleet_stats(before, after, reqs)
    assert s["workers"]["a"] == {"served": 6, "prompt_tokens": 4000, "hit_tokens": 3000}
    assert s["workers"]["c"]["served"] == 1  # a worker that joined during the run counts from zero
    assert s["max_over_mean_served"] == 6 / 3 and s["max_over_mean_prompt_tokens"] == 4000 / 1700
    assert s["cache_hit_share"] == 3500 / 4000


def test_interference_shape() -> None:
    reqs = interference(100, 1024, seed=0, max_context=8192, rate=4.0, long_period=5.0)
    longs = [r for r in reqs if r.tag == "long"]
    shorts = [r for r in reqs if r.tag == "short"]
    assert len(longs) + len(shorts) == 100 and len(longs) >= 4
    assert all(3840 <= len(r.prompt_ids) <= 4096 for r in longs)
    assert all(len(r.prompt_ids) <= 128 for r in shorts)
    times = [r.arrival for r in reqs]
    assert all(t is not None for t in times) and times == sorted(times)  # type: ignore[type-var]
    assert [s.arrival for s in shorts[:3]] == [0.0, 0.25, 0.5]
    assert longs[1].arrival - longs[0].arrival == pytest.approx(5.0)  # type: ignore[operator]
    clamped = interference(40, 1024, seed=0, max_context=512)
    assert all(len(r.prompt_ids) == 512 - r.max_tokens for r in clamped if r.tag == "long")


def test_sharegpt_lengths() -> None:
    reqs = sharegpt(2000, 1024, seed=0)
    p = np.array([len(r.prompt_ids) for r in reqs])
    o = np.array([r.max_tokens for r in reqs])
    assert p.min() >= 4 and o.min() >= 4 and p.max() <= 1024 and (p + o).max() <= 2048
    assert 80 < np.median(p) < 120 and 190 < np.median(o) < 260  # lognormal medians 98 and 225
    assert 280 < o.mean() < 380
