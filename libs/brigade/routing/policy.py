"""Choosing workers: round-robin and least-loaded (the prefix-aware policy builds on these)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from brigade.routing.fleet import Fleet, WorkerState

POLICIES = ("round_robin", "least_loaded")


@dataclass(frozen=True)
class Decision:
    """Where a request goes: `worker` runs it (prefill only when `decode` is set)."""

    worker: str
    decode: str | None = None


class Policy:
    """Picks a worker among candidates; keeps its own round-robin position."""

    def __init__(self, name: str) -> None:
        if name not in POLICIES:
            raise ValueError(f"unknown routing policy {name!r} (choose from {', '.join(POLICIES)})")
        self.name = name
        self.turn = 0

    def pick(self, candidates: list[WorkerState], exclude: Collection[str] = ()) -> WorkerState | None:
        pool = [c for c in candidates if c.id not in exclude]
        if not pool:
            return None
        if self.name == "round_robin":
            self.turn += 1
            return pool[(self.turn - 1) % len(pool)]
        return min(pool, key=lambda c: (c.load(), c.id))


def decide(fleet: Fleet, policy: Policy, prompt_tokens: int, disagg_threshold: int, now: float,
           exclude: Collection[str] = ()) -> Decision | None:
    """Disaggregate when prefill and decode pools both exist and the prompt is long enough."""
    prefill = fleet.live(("prefill",), now)
    decode = fleet.live(("decode", "colocated"), now)
    if prefill and decode and prompt_tokens >= disagg_threshold:
        p = policy.pick(prefill, exclude)
        d = min((c for c in decode if c.id not in exclude), key=lambda c: (c.load(), c.id), default=None)
        if p is not None and d is not None:
            return Decision(p.id, d.id)
    w = policy.pick(decode, exclude)
    return None if w is None else Decision(w.id)
