"""Benchmark reports: the JSON result of a run, its summary text (`vllm bench serve` style), comparison tables."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from brigade.bench.metrics import RequestRecord, by_tag, summarize

WIDTH = 50


def result(config: dict[str, Any], records: Sequence[RequestRecord], duration_s: float) -> dict[str, Any]:
    """{config, summary, tags: {tag: summary}, requests: [record, ...]} of one run."""
    return {"config": config, "summary": summarize(records, duration_s), "tags": by_tag(records, duration_s),
            "requests": [asdict(r) for r in records]}


def write(obj: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(obj, indent=1))


def _head(title: str, fill: str = "-") -> str:
    return f" {title} ".center(WIDTH, fill) if title else fill * WIDTH


def _row(label: str, value: Any) -> str:
    if value is None:
        return f"{label:<40} {'-':<10}"
    return f"{label:<40} {value:<10.2f}" if isinstance(value, float) else f"{label:<40} {value:<10}"


def summary_text(s: dict[str, Any], tags: dict[str, dict[str, Any]] | None = None,
                 title: str = "Serving Benchmark Result") -> str:
    """The summary block printed after a run; per-tag latencies follow when there is more than one tag."""
    lines = [_head(title, "="),
             _row("Successful requests:", s["successful"]),
             _row("Failed requests:", s["failed"]),
             _row("Benchmark duration (s):", s["duration_s"]),
             _row("Total input tokens:", s["total_input_tokens"]),
             _row("Total generated tokens:", s["total_output_tokens"]),
             _row("Request throughput (req/s):", s["request_throughput"]),
             _row("Output token throughput (tok/s):", s["output_throughput"]),
             _row("Total token throughput (tok/s):", s["total_token_throughput"]),
             _row("Peak concurrent requests:", s["peak_concurrency"])]
    for key, name, heading in [("ttft_ms", "TTFT", "Time to First Token"),
                               ("tpot_ms", "TPOT", "Time per Output Token (excl. 1st token)"),
                               ("itl_ms", "ITL", "Inter-token Latency"),
                               ("e2e_ms", "E2EL", "End-to-end Latency")]:
        lines.append(_head(heading))
        for stat, label in [("mean", "Mean"), ("median", "Median"), ("p99", "P99")]:
            lines.append(_row(f"{label} {name} (ms):", s[key][stat]))
    if tags and len(tags) > 1:
        lines.append(_head("Per tag (ms)"))
        lines.append(f"{'tag':<10} {'ok':>5} {'failed':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p99':>8} "
                     f"{'E2E p50':>8}")
        for tag, t in tags.items():
            lines.append(f"{tag or '-':<10} {t['successful']:>5} {t['failed']:>6} {_ms(t['ttft_ms']['median']):>9} "
                         f"{_ms(t['ttft_ms']['p99']):>9} {_ms(t['itl_ms']['p99']):>8} {_ms(t['e2e_ms']['median']):>8}")
    if s["errors"]:
        lines.append(_head("Errors (count)"))
        lines += [f"{n:>5}  {msg}" for msg, n in s["errors"].items()]
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _get(summary: dict[str, Any], key: str, stat: str) -> float | None:
    return (summary.get(key) or {}).get(stat)


def _ratio(v: float | None, base: float | None) -> str:
    return "-" if v is None or not base else f"{v / base:.2f}x"


def compare_table(systems: Sequence[dict[str, Any]]) -> str:
    """One row per system; ratios are this system's value over the first system's (latency: lower is better).

    Each system is {name, kind, summary, tags} (a run result) or {name, kind, error}.
    """
    base = next((s["summary"] for s in systems[:1] if "summary" in s), None) or {}
    head = (f"{'system':<20} {'ok':>5} {'fail':>5} {'dur s':>7} {'req/s':>7} {'out tok/s':>10} {'x':>7} "
            f"{'TTFT p50':>9} {'x':>7} {'TTFT p99':>9} {'ITL p99':>8} {'x':>7} {'E2E p50':>8}")
    lines = [head, "-" * len(head)]
    for sys_ in systems:
        if "summary" not in sys_:
            lines.append(f"{sys_['name']:<20} error: {sys_.get('error', '?')}")
            continue
        s = sys_["summary"]
        ttft, itl = _get(s, "ttft_ms", "median"), _get(s, "itl_ms", "p99")
        lines.append(
            f"{sys_['name']:<20} {s['successful']:>5} {s['failed']:>5} {s['duration_s']:>7.1f} "
            f"{s['request_throughput']:>7.2f} {s['output_throughput']:>10.1f} "
            f"{_ratio(s['output_throughput'], base.get('output_throughput')):>7} "
            f"{_ms(ttft):>9} {_ratio(ttft, _get(base, 'ttft_ms', 'median')):>7} {_ms(_get(s, 'ttft_ms', 'p99')):>9} "
            f"{_ms(itl):>8} {_ratio(itl, _get(base, 'itl_ms', 'p99')):>7} {_ms(_get(s, 'e2e_ms', 'median')):>8}")
    tags = sorted({t for sys_ in systems for t in sys_.get("tags") or {}})
    if len(tags) > 1:
        lines += ["", f"{'tag':<10} {'system':<20} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p99':>8} (ms)"]
        for tag in tags:
            for sys_ in systems:
                t = (sys_.get("tags") or {}).get(tag)
                if t:
                    lines.append(f"{tag:<10} {sys_['name']:<20} {_ms(_get(t, 'ttft_ms', 'median')):>9} "
                                 f"{_ms(_get(t, 'ttft_ms', 'p99')):>9} {_ms(_get(t, 'itl_ms', 'p99')):>8}")
    return "\n".join(lines)
