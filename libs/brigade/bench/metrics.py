"""Serving-benchmark arithmetic: per-request records and their summaries (pure functions, no I/O).

Definitions follow `vllm bench serve`: TTFT is the time to the first chunk that carries text; ITL is every
gap between two such chunks; TPOT = (E2E - TTFT) / (output tokens - 1); throughputs divide by the whole run's
duration and count successful requests only.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    """What one request did. Times are seconds; start_s is relative to the start of the run."""

    index: int
    tag: str
    prompt_tokens: int
    max_tokens: int
    start_s: float = 0.0
    ok: bool = False
    output_tokens: int = 0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    status: int | None = None  # HTTP status; None when no response came
    error: str = ""


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def gaps(times: Sequence[float]) -> list[float]:
    """Differences between consecutive timestamps."""
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def timing(start: float, chunk_times: Sequence[float], end: float) -> tuple[float | None, list[float], float]:
    """(TTFT, ITL gaps, E2E) of one stream from its send time, its text chunks' arrival times and its end."""
    ttft = chunk_times[0] - start if chunk_times else None
    return ttft, gaps(chunk_times), end - start


def tpot(r: RequestRecord) -> float | None:
    """Mean time per output token after the first; None with fewer than two tokens or no timing."""
    if r.ttft_s is None or r.e2e_s is None or r.output_tokens < 2:
        return None
    return (r.e2e_s - r.ttft_s) / (r.output_tokens - 1)


def stats_ms(values_s: Iterable[float]) -> dict[str, float | None]:
    """mean / median / p90 / p99 / max in milliseconds; None for each when there is no data."""
    xs = [v * 1e3 for v in values_s]
    if not xs:
        return {"mean": None, "median": None, "p90": None, "p99": None, "max": None}
    return {"mean": sum(xs) / len(xs), "median": percentile(xs, 50), "p90": percentile(xs, 90),
            "p99": percentile(xs, 99), "max": max(xs)}


def peak_concurrency(records: Sequence[RequestRecord]) -> int:
    """Most requests in flight at once (by send time and end time)."""
    events = sorted([(r.start_s, 1) for r in records if r.e2e_s is not None]
                    + [(r.start_s + r.e2e_s, -1) for r in records if r.e2e_s is not None],
                    key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    peak = cur = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak


def summarize(records: Sequence[RequestRecord], duration_s: float) -> dict[str, Any]:
    """Counts, throughputs and latency statistics of a run (or of one tag's requests within it)."""
    ok = [r for r in records if r.ok]
    inp = sum(r.prompt_tokens for r in ok)
    outp = sum(r.output_tokens for r in ok)
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    errors = Counter(f"{r.status if r.status is not None else 'no response'}: {r.error}"[:200]
                     for r in records if not r.ok)
    return {
        "requests": len(records),
        "successful": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": inp,
        "total_output_tokens": outp,
        "request_throughput": len(ok) * per_s,
        "output_throughput": outp * per_s,
        "total_token_throughput": (inp + outp) * per_s,
        "peak_concurrency": peak_concurrency(records),
        "ttft_ms": stats_ms(r.ttft_s for r in ok if r.ttft_s is not None),
        "tpot_ms": stats_ms(t for r in ok if (t := tpot(r)) is not None),
        "itl_ms": stats_ms(g for r in ok for g in r.itl_s),
        "e2e_ms": stats_ms(r.e2e_s for r in ok if r.e2e_s is not None),
        "errors": dict(errors.most_common(10)),
    }


def by_tag(records: Sequence[RequestRecord], duration_s: float) -> dict[str, dict[str, Any]]:
    """A summary per tag, over the whole run's duration."""
    tags = sorted({r.tag for r in records})
    return {t: summarize([r for r in records if r.tag == t], duration_s) for t in tags}
