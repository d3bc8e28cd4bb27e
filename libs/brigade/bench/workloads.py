"""Benchmark workloads, deterministic for a seed (DESIGN §7).

Every workload is a list of `Request`s with token-id prompts drawn from `[16, vocab)` and an exact output
length (the load generator sends `ignore_eos`). `build` makes one by name and clamps every request to the
server's context (`max_context`: prompt + max_tokens <= max_context, as the gateway checks it).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Any

LOW_ID = 16  # skip the lowest ids: small checkpoints keep their special tokens there


@dataclass(frozen=True)
class Request:
    """One benchmark request: prompt token ids and the exact number of tokens to generate."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    tag: str = ""
    arrival: float | None = None  # seconds after the start; when set, the load generator sends it then
    cacheable: int = 0  # leading prompt tokens an earlier request of the workload already sent (prefix-cache hits)
    after: int | None = None  # index of a request that must finish before this one is sent (a session's last turn)


def _ids(rng: random.Random, n: int, vocab: int) -> tuple[int, ...]:
    return tuple(rng.randrange(LOW_ID, vocab) for _ in range(n))


def fit(r: Request, max_context: int) -> Request:
    """Shorten the prompt (then the output) so prompt + max_tokens fits in max_context."""
    if len(r.prompt_ids) + r.max_tokens <= max_context:
        return r
    max_tokens = min(r.max_tokens, max_context - 1)
    plen = max(1, min(len(r.prompt_ids), max_context - max_tokens))
    return replace(r, prompt_ids=r.prompt_ids[:plen], max_tokens=max_tokens, cacheable=min(r.cacheable, plen))


def mixed(n: int, vocab: int, seed: int = 0, prompt_range: tuple[int, int] = (32, 256),
          output_range: tuple[int, int] = (8, 512)) -> list[Request]:
    """Output lengths log-uniform over a 64x range: the workload that static batching wastes most on."""
    rng = random.Random(seed)
    lo, hi = output_range
    out = []
    for _ in range(n):
        plen = rng.randint(*prompt_range)
        olen = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        out.append(Request(_ids(rng, plen, vocab), olen, "mixed"))
    return out


def rag(n: int, vocab: int, seed: int = 0, max_context: int = 8192, turns: int = 8, doc_tokens: int = 2048,
        question_range: tuple[int, int] = (16, 64), output_range: tuple[int, int] = (16, 64),
        hot: bool = False) -> list[Request]:
    """Sessions of one shared document plus short questions, interleaved at random across sessions.

    ceil(n / turns) sessions share the n requests evenly. Every prompt of a session is its document followed
    by a fresh question: the first (tag "first") computes the document, the follow-ups ("followup") can reuse
    it from a prefix cache. Sessions are mixed between each other; within one, each turn is sent only after the
    previous one has finished (`after`), as a user asks the next question once the answer is in.
    The document shrinks to leave room for the longest question and answer within max_context.
    `hot`: every session shares one document (the hot-prefix case a router must not pile onto one worker).
    """
    rng = random.Random(seed)
    doc_len = max(1, min(doc_tokens, max_context - question_range[1] - output_range[1]))
    sessions = max(1, math.ceil(n / turns))
    left = [n // sessions + (1 if s < n % sessions else 0) for s in range(sessions)]
    docs = [_ids(rng, doc_len, vocab) for _ in range(1 if hot else sessions)] * (sessions if hot else 1)
    asked = [0] * sessions
    last: list[int | None] = [None] * sessions  # index of each session's latest turn
    sent: set[tuple[int, ...]] = set()
    out = []
    while any(left):
        # Weighting by what is left keeps the sessions running side by side until the end.
        s = rng.choices(range(sessions), weights=left)[0]
        question = _ids(rng, rng.randint(*question_range), vocab)
        tag = "followup" if asked[s] else "first"
        out.append(Request(docs[s] + question, rng.randint(*output_range), tag,
                           cacheable=len(docs[s]) if docs[s] in sent else 0, after=last[s]))
        last[s] = len(out) - 1
        sent.add(docs[s])
        asked[s] += 1
        left[s] -= 1
    return out


def interference(n: int, vocab: int, seed: int = 0, max_context: int = 8192, rate: float = 2.0,
                 long_period: float = 10.0, long_tokens: int = 4096, short_prompt: tuple[int, int] = (32, 128),
                 short_output: tuple[int, int] = (64, 128), long_output: int = 16) -> list[Request]:
    """Steady short chats ("short", one every 1/rate s) plus a long prompt ("long") every long_period s.

    Arrival offsets are part of the workload, so every run sees the long prefills land at the same moments
    among the same decodes: the p99 inter-token latency of the short chats measures the interference. Long
    prompts are long_tokens minus up to 1/16 (~4k), clamped so prompt + output fits max_context.
    """
    rng = random.Random(seed)
    long_len = max(1, min(long_tokens, max_context - long_output))
    next_short, next_long = 0.0, long_period / 2 + 0.5 / rate  # half a period in, midway between two shorts
    out = []
    while len(out) < n:
        if next_long < next_short:
            plen = min(long_len, rng.randint(long_tokens - long_tokens // 16, long_tokens))
            out.append(Request(_ids(rng, plen, vocab), long_output, "long", round(next_long, 6)))
            next_long += long_period
        else:
            req = Request(_ids(rng, rng.randint(*short_prompt), vocab), rng.randint(*short_output), "short",
                          round(next_short, 6))
            out.append(req)
            next_short += 1.0 / rate
    return out


# Synthetic ShareGPT lengths: lognormal (mu, sigma) of natural-log token counts, chosen so the means match the
# ShareGPT averages the vLLM paper reports (161 prompt and 338 output tokens; mean = exp(mu + sigma^2 / 2)).
# Medians: 98 prompt, 225 output tokens. Clipped like vLLM's ShareGPT sampler: both >= 4, prompt <= 1024,
# prompt + output <= 2048 (and <= max_context).
SHAREGPT_PROMPT = (math.log(161) - 0.5, 1.0)
SHAREGPT_OUTPUT = (math.log(338) - 0.405, 0.9)


def sharegpt(n: int, vocab: int, seed: int = 0, max_context: int = 8192) -> list[Request]:
    """Prompt and output lengths drawn from lognormal fits of ShareGPT conversations (see SHAREGPT_*)."""
    rng = random.Random(seed)
    budget = min(2048, max_context)
    out = []
    for _ in range(n):
        plen = min(1024, budget - 4, max(4, round(rng.lognormvariate(*SHAREGPT_PROMPT))))
        olen = min(budget - plen, max(4, round(rng.lognormvariate(*SHAREGPT_OUTPUT))))
        out.append(Request(_ids(rng, plen, vocab), olen, "sharegpt"))
    return out


WORKLOADS = {"mixed": mixed, "rag": rag, "interference": interference, "sharegpt": sharegpt}


def build(name: str, n: int, vocab: int, seed: int = 0, max_context: int = 8192,
          rate: float | None = None, options: dict[str, Any] | None = None) -> list[Request]:
    """The named workload, every request fitted to max_context. `rate` sets interference's short-chat rate;
    `options` are passed to the workload function (e.g. interference's long_period)."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r} ({', '.join(WORKLOADS)})")
    if vocab <= LOW_ID:
        raise ValueError(f"vocab must be > {LOW_ID}, got {vocab}")
    kw = dict(options or {})
    if name != "mixed":
        kw["max_context"] = max_context
    if name == "interference" and rate:
        kw["rate"] = rate
    reqs = WORKLOADS[name](n, vocab, seed, **kw)  # type: ignore[operator]
    return [fit(r, max_context) for r in reqs]
