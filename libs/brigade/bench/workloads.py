"""Benchmark workloads, deterministic for a seed (DESIGN §7)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    """One benchmark request: prompt token ids and the exact number of tokens to generate."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    tag: str = ""


def mixed(n: int, vocab: int, seed: int = 0, prompt_range: tuple[int, int] = (32, 256),
          output_range: tuple[int, int] = (8, 512)) -> list[Request]:
    """Output lengths log-uniform over a 64x range: the workload that static batching wastes most on."""
    rng = random.Random(seed)
    lo, hi = output_range
    out = []
    for _ in range(n):
        plen = rng.randint(*prompt_range)
        olen = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        # Skip the lowest ids: small checkpoints keep their special tokens there.
        out.append(Request(tuple(rng.randrange(16, vocab) for _ in range(plen)), olen, "mixed"))
    return out


WORKLOADS = {"mixed": mixed}
