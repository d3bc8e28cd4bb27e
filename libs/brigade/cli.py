"""The `brigade` command: one subcommand per tool or service."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any


def _make_model(args: argparse.Namespace) -> int:
    from brigade.model.make import make_model

    out = make_model(args.arch, args.size, args.out, seed=args.seed)
    print(out)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from brigade.engine.engine import Engine, EngineConfig, InvalidRequest
    from brigade.engine.sampling import SamplingParams
    from brigade.model.config import ModelError
    from brigade.model.make import demo_model_dir

    model = str(demo_model_dir()) if args.model == "demo" else args.model
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                                ignore_eos=args.ignore_eos, top_p=args.top_p, top_k=args.top_k)
        engine = Engine(EngineConfig(model=model, threads=args.threads))
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
    from brigade.model.make import demo_model_dir

    model = str(demo_model_dir()) if args.model == "demo" else args.model
    report = offline.bench(model, args.workload, args.requests, args.seed, args.threads, args.batch_size,
                           hf=not args.no_hf, max_num_seqs=args.max_num_seqs,
                           max_num_batched_tokens=args.max_num_batched_tokens)
    print(offline.summary(report))
    if args.out:
        offline.write(report, args.out)
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
        else:
            from brigade.services import worker as svc  # type: ignore[no-redef]

            cfg = C.from_args(C.WorkerConfig, args)
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        asyncio.run(svc.serve(cfg))
        return 0

    return run


def _up(args: argparse.Namespace) -> int:
    from brigade.launcher import UpConfig, run

    return run(UpConfig(model=args.model, host=args.host, port=args.port, mode=args.mode, prefill=args.prefill,
                        decode=args.decode, router=args.router, nats=args.nats or "", kv_transport=args.kv_transport,
                        disagg_threshold=args.disagg_threshold, worker_args=tuple(args.worker_arg)))


def parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render --help in docs)."""
    p = argparse.ArgumentParser(prog="brigade", description="Brigade LLM inference server")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("make-model", help="write a small random-weight HF checkpoint with a real tokenizer")
    m.add_argument("--arch", required=True, choices=["llama", "qwen2", "mixtral"])
    m.add_argument("--size", default="tiny", choices=["tiny", "bench"])
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(fn=_make_model)

    g = sub.add_parser("generate", help="run the in-process engine on one prompt")
    g.add_argument("--model", default="demo", help="HF checkpoint directory, or 'demo'")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    g.add_argument("--json", action="store_true", help='print {"token_ids": [...], "text": ...}')
    g.set_defaults(fn=_generate)

    from brigade import config as C

    for name, cls, helptext in [
        ("gateway", C.GatewayConfig, "the OpenAI-compatible HTTP gateway"),
        ("router", C.RouterConfig, "the router"),
        ("prefill", C.WorkerConfig, "a prefill worker"),
        ("decode", C.WorkerConfig, "a decode worker (also runs whole requests: colocated mode)"),
    ]:
        sp = sub.add_parser(name, help=helptext)
        C.add_flags(sp, cls)
        if cls is C.WorkerConfig:
            sp.set_defaults(role=name)
        sp.set_defaults(fn=_service(name))

    u = sub.add_parser("up", help="the whole system on this machine (embedded NATS, every service)")
    u.add_argument("--model", default="demo", help="HF checkpoint directory, or 'demo'")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=8000)
    u.add_argument("--mode", default="colocated", choices=["colocated", "disagg"])
    u.add_argument("--prefill", type=int, default=1, help="prefill workers (disagg mode)")
    u.add_argument("--decode", type=int, default=1, help="decode workers")
    u.add_argument("--router", default="least_loaded", choices=["round_robin", "least_loaded"])
    u.add_argument("--nats", help="use this NATS server instead of starting one")
    u.add_argument("--kv-transport", default="shm", choices=["shm", "nats", "cuda-ipc"])
    u.add_argument("--disagg-threshold", type=int, default=64, help="shorter prompts prefill on the decode worker")
    u.add_argument("--worker-arg", action="append", default=[], help="extra flag for every worker (repeatable)")
    u.set_defaults(fn=_up)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    o = bsub.add_parser("offline", help="in-process engine throughput vs Hugging Face static batching")
    o.add_argument("--model", default="demo")
    o.add_argument("--workload", default="mixed", choices=["mixed"])
    o.add_argument("--requests", type=int, default=128)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    o.add_argument("--batch-size", type=int, default=32, help="HF static batch size")
    o.add_argument("--max-num-seqs", type=int, default=128)
    o.add_argument("--max-num-batched-tokens", type=int, default=1024)
    o.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline")
    o.add_argument("--out", help="write the report as JSON")
    o.set_defaults(fn=_bench_offline)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
