"""The `brigade` command: one subcommand per tool or service."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence


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
