"""What constrained decoding costs: schema compile times, and a batch of schema-constrained requests against the
same batch unconstrained.

The unconstrained runs are the same requests with each one's max_tokens set to the length its constrained run
produced, EOS ignored: both kinds of run generate the same tokens per request in the same batch shape, so the
throughput ratio is the cost of the masks alone.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from typing import Any

from brigade.engine.engine import Engine, EngineConfig
from brigade.engine.grammar import Grammars
from brigade.engine.sampling import SamplingParams

# Shapes clients send: enums, nested objects, arrays with bounds, integers with ranges, a pattern.
SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {"type": "object", "additionalProperties": False, "required": ["name", "age", "colour"],
               "properties": {"name": {"type": "string", "maxLength": 24},
                              "age": {"type": "integer", "minimum": 18, "maximum": 99},
                              "colour": {"enum": ["red", "green", "blue"]}}},
    "order": {"type": "object", "additionalProperties": False, "required": ["customer", "items"],
              "properties": {
                  "customer": {"type": "object", "required": ["id", "city"],
                               "properties": {"id": {"type": "integer", "minimum": 1},
                                              "city": {"type": "string", "maxLength": 20}}},
                  "items": {"type": "array", "minItems": 1, "maxItems": 4,
                            "items": {"type": "object", "required": ["sku", "qty"],
                                      "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                                                     "qty": {"type": "integer", "minimum": 1, "maximum": 9}}}}}},
    "event": {"type": "object", "required": ["title", "day", "attendees", "online"],
              "properties": {"title": {"type": "string", "maxLength": 40},
                             "day": {"enum": ["mon", "tue", "wed", "thu", "fri"]},
                             "attendees": {"type": "array", "items": {"type": "string", "maxLength": 16},
                                           "maxItems": 5},
                             "online": {"type": "boolean"}, "notes": {"type": ["string", "null"]}}},
}
QUESTIONS = ("Invent a person as JSON.", "Write a shop order as JSON.", "Describe a meeting as JSON.",
             "Give me some data as JSON.")


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def compile_times(grammars: Grammars, variants: int = 20) -> dict[str, dict[str, float]]:
    """Milliseconds per schema: uncached (each variant differs in its title, so none is in the cache), and
    cached (the same spec again, what every later request with that schema pays)."""
    grammars.tokenizer()  # built once per engine; not a compile
    out: dict[str, dict[str, float]] = {}
    for name, schema in SCHEMAS.items():
        cold, warm = [], []
        for i in range(variants):
            spec = json.dumps({**schema, "title": f"{name}-{i}-{time.monotonic_ns()}"})
            t0 = time.perf_counter()
            grammars.matcher("json", spec)
            t1 = time.perf_counter()
            grammars.matcher("json", spec)
            cold.append((t1 - t0) * 1e3)
            warm.append((time.perf_counter() - t1) * 1e3)
        out[name] = {"uncached_p50_ms": statistics.median(cold), "uncached_p99_ms": _percentile(cold, 0.99),
                     "cached_p50_ms": statistics.median(warm), "cached_p99_ms": _percentile(warm, 0.99)}
    return out


def _run(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    return time.perf_counter() - t0, [len(o.token_ids) for o in outs]


def bench(model: str, requests: int = 32, max_tokens: int = 160, threads: int = 0, rounds: int = 3) -> dict[str, Any]:
    """Compile times and constrained/unconstrained throughput on one engine, `rounds` runs of each alternated; a
    JSON-able report."""
    engine = Engine(EngineConfig(model=model, threads=threads, max_num_seqs=max(requests, 1)))
    names = list(SCHEMAS)
    prompts = [engine.tokenizer.chat([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
               for i in range(requests)]
    constrained = [SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=i,
                                  structured=("json", json.dumps(SCHEMAS[names[i % len(names)]])))
                   for i in range(requests)]
    engine.generate(prompts[:2], constrained[:2])  # warm-up: the tokenizer view, kernels, the compile cache
    _, lengths = _run(engine, prompts, constrained)
    free = [replace(p, structured=None, ignore_eos=True, max_tokens=n) for p, n in zip(constrained, lengths,
                                                                                       strict=True)]
    # Alternated, so that a drift of the machine's speed (±10% here from minute to minute) falls on both.
    c_s = f_s = 0.0
    same = True
    for _ in range(rounds):
        seconds, got = _run(engine, prompts, constrained)
        c_s += seconds
        same = same and got == lengths
        seconds, got = _run(engine, prompts, free)
        f_s += seconds
        same = same and got == lengths
    tokens = sum(lengths) * rounds
    return {"model": model, "requests": requests, "rounds": rounds, "output_tokens": sum(lengths),
            "same_tokens": same, "constrained_tok_s": tokens / c_s, "unconstrained_tok_s": tokens / f_s,
            "ratio": f_s / c_s, "compile": compile_times(engine.grammars)}


def summary(report: dict[str, Any]) -> str:
    lines = [f"{report['requests']} requests, {report['output_tokens']} output tokens, {report['rounds']} rounds of "
             f"each (same tokens per request in every run: {report['same_tokens']})",
             f"constrained   {report['constrained_tok_s']:8.1f} tok/s",
             f"unconstrained {report['unconstrained_tok_s']:8.1f} tok/s",
             f"ratio         {report['ratio']:8.3f}x", "compile ms (p50 / p99): uncached | cached"]
    for name, c in report["compile"].items():
        lines.append(f"  {name:8s} {c['uncached_p50_ms']:.2f} / {c['uncached_p99_ms']:.2f} | "
                     f"{c['cached_p50_ms']:.3f} / {c['cached_p99_ms']:.3f}")
    return "\n".join(lines)
