"""Benchmark plots (matplotlib, Agg, no display): TTFT and ITL distributions per tag, throughput vs rate.

Needs the `bench` extra (`pip install -e ".[bench]"`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

Run = tuple[str, dict[str, Any]]  # (label, a run result as report.result makes it)


def _series(runs: Sequence[Run], field: str) -> list[tuple[str, list[float]]]:
    """(legend label, sorted values in ms) per run and tag, successful requests only."""
    out = []
    for label, res in runs:
        tags = sorted({r["tag"] for r in res["requests"]})
        for tag in tags:
            vals: list[float] = []
            for r in res["requests"]:
                if r["ok"] and r["tag"] == tag:
                    v = r[field]
                    vals += [x * 1e3 for x in (v if isinstance(v, list) else [v]) if x is not None]
            name = " ".join(p for p in (label, tag if len(tags) > 1 or not label else "") if p)
            if vals:
                out.append((name, sorted(vals)))
    return out


def _cdf(ax: Any, series: list[tuple[str, list[float]]], title: str) -> None:
    for name, xs in series:
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=name)
    if series and min(xs[0] for _, xs in series) > 0:
        ax.set_xscale("log")  # latencies span decades: a prefill-bound first token vs a decode step
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of requests" if "TTFT" in title else "fraction of gaps")
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize="small")


def _x_of(res: dict[str, Any]) -> tuple[str, float | None]:
    cfg = res.get("config", {})
    if cfg.get("rate"):
        return "request rate (req/s)", float(cfg["rate"])
    if cfg.get("concurrency"):
        return "concurrency", float(cfg["concurrency"])
    return "", None


def plot(runs: Sequence[Run], path: str | Path) -> None:
    """CDFs of TTFT and ITL for every run and tag; with several runs at different rates (or concurrencies),
    a third panel of output throughput against the rate."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = sorted((x, res["summary"]["output_throughput"], label) for label, res in runs
                    if (x := _x_of(res)[1]) is not None)
    sweep = len({p[0] for p in points}) > 1
    fig = Figure(figsize=(15 if sweep else 10, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if sweep else 2)
    _cdf(axes[0], _series(runs, "ttft_s"), "TTFT (CDF)")
    _cdf(axes[1], _series(runs, "itl_s"), "Inter-token latency (CDF)")
    if sweep:
        ax = axes[2]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        for x, y, label in points:
            if label:
                ax.annotate(label, (x, y), fontsize="x-small", textcoords="offset points", xytext=(3, 3))
        ax.set_title("Output throughput")
        ax.set_xlabel(_x_of(runs[0][1])[0])
        ax.set_ylabel("tokens/s")
        ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=100)


def runs_from_json(obj: dict[str, Any], label: str = "") -> list[Run]:
    """The runs in a result file: a single run, or every served system of a `bench compare` result."""
    if "requests" in obj:
        return [(label, obj)]
    return [(s["name"], s) for s in obj.get("systems", []) if "requests" in s]
