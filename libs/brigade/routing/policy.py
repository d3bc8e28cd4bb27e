"""Choosing workers: prefix-aware (default), round-robin, least-loaded.

The prefix policy scores each worker by the work the request would cost there (DESIGN §4):

    cost_w = a * (prefill_queued_w + booked_tokens_w + uncached_w) / block_size + kv_blocks_w + uncached_w / block_size

where uncached tokens are the prompt minus the longest prefix the worker already holds (or was just sent:
a burst of siblings ties with the worker computing their prefix, and ties go to the most cached), and
kv_blocks counts blocks in use plus those booked, and the request's own new blocks. A worker that
holds the prefix wins until its queue outweighs the prefill it saves: that is the spill of a hot prefix
to a second worker. With a temperature > 0 the choice is sampled (softmax over -cost), so several
routers working from the same stale view do not all pick the same worker.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from brigade.routing.fleet import Fleet, WorkerState
from brigade.routing.index import PrefixIndex

POLICIES = ("prefix", "round_robin", "least_loaded")


@dataclass(frozen=True)
class Decision:
    """Where a request goes: `worker` runs it (prefill only when `decode` is set); `cached` blocks expected."""

    worker: str
    decode: str | None = None
    cached_blocks: int = 0


@dataclass(frozen=True)
class PrefixCost:
    block_size: int = 16
    prefill_weight: float = 1.0  # `a`: queued prefill blocks vs KV blocks held
    temperature: float = 0.0


class Policy:
    """Picks a worker among candidates; keeps its own round-robin position and random stream."""

    def __init__(self, name: str, cost: PrefixCost | None = None, seed: int | None = None) -> None:
        if name not in POLICIES:
            raise ValueError(f"unknown routing policy {name!r} (choose from {', '.join(POLICIES)})")
        self.name = name
        self.cost = cost or PrefixCost()
        self.turn = 0
        self.rng = random.Random(seed)

    def pick(self, candidates: list[WorkerState], exclude: Collection[str] = ()) -> WorkerState | None:
        """Round-robin or least-loaded choice (no prefix information)."""
        pool = [c for c in candidates if c.id not in exclude]
        if not pool:
            return None
        if self.name == "round_robin":
            self.turn += 1
            return pool[(self.turn - 1) % len(pool)]
        return min(pool, key=lambda c: (c.load(), c.id))

    def costs(self, candidates: list[WorkerState], prompt_tokens: int, overlap: dict[str, int]) -> dict[str, float]:
        c = self.cost
        out = {}
        for w in candidates:
            uncached = max(prompt_tokens - overlap.get(w.id, 0) * c.block_size, 0)
            queued = w.status.prefill_queued + w.booked_tokens + uncached
            blocks = w.status.kv_used + w.booked_blocks + uncached / c.block_size
            out[w.id] = c.prefill_weight * queued / c.block_size + blocks
        return out

    def pick_prefix(self, candidates: list[WorkerState], prompt_tokens: int, overlap: dict[str, int],
                    exclude: Collection[str] = (), held: dict[str, int] | None = None) -> WorkerState | None:
        """Lowest cost; ties go to the most cached, then the worker holding the fewest blocks (new
        prefixes spread so caches fill evenly), then id. Sampled by softmax when a temperature is set."""
        pool = [c for c in candidates if c.id not in exclude]
        if not pool:
            return None
        costs = self.costs(pool, prompt_tokens, overlap)
        t = self.cost.temperature
        if t > 0:
            low = min(costs.values())
            weights = [math.exp(-(costs[c.id] - low) / t) for c in pool]
            return self.rng.choices(pool, weights=weights)[0]
        held = held or {}
        return min(pool, key=lambda c: (costs[c.id], -overlap.get(c.id, 0), held.get(c.id, 0), c.id))


def decide(fleet: Fleet, policy: Policy, prompt_tokens: int, disagg_threshold: int, now: float,
           exclude: Collection[str] = (), hashes: Sequence[int] = (), index: PrefixIndex | None = None,
           ) -> Decision | None:
    """Pick the worker(s) for one request.

    Disaggregate when prefill and decode pools both exist and the prompt's uncached part is long enough:
    the prefill worker by prefix and load, the decode worker by load. Otherwise one worker runs it all.
    """
    prefill = fleet.live(("prefill",), now)
    decode = fleet.live(("decode", "colocated"), now)
    use_prefix = policy.name == "prefix" and index is not None and hashes
    overlap: dict[str, int] = {}
    if use_prefix:
        assert index is not None
        overlap = index.overlap(hashes, [w.id for w in prefill + decode], now)

    def choose(pool: list[WorkerState]) -> WorkerState | None:
        if use_prefix:
            assert index is not None
            held = {w.id: len(index.by_worker.get(w.id, ())) for w in pool}
            return policy.pick_prefix(pool, prompt_tokens, overlap, exclude, held)
        return policy.pick(pool, exclude)

    if prefill and decode:
        best_cached = max((overlap.get(w.id, 0) for w in decode), default=0) * policy.cost.block_size
        if prompt_tokens - best_cached >= disagg_threshold:
            p = choose(prefill)
            d = min((c for c in decode if c.id not in exclude), key=lambda c: (c.load(), c.id), default=None)
            if p is not None and d is not None:
                return Decision(p.id, d.id, overlap.get(p.id, 0))
    w = choose(decode)
    return None if w is None else Decision(w.id, None, overlap.get(w.id, 0))
