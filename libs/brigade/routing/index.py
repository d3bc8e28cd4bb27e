"""The prefix registry: block hash -> workers holding that block, from the workers' KV events.

Block hashes are chained (each covers its whole prefix), so the longest cached prefix of a prompt on a
worker is the longest run of the prompt's leading hashes that the worker holds. The registry is bounded
(least recently touched hashes go first), forgets a worker at once when it dies, and notices lost events
by their per-worker sequence numbers so the router can ask that worker for a full dump.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class WorkerEvents:
    """Where a worker's event stream stands."""

    last_id: int = -1
    needs_dump: bool = True  # until a dump (or the first event batch of a fresh worker) syncs us
    gaps: int = 0


@dataclass
class PrefixIndex:
    """hash -> set of worker ids; LRU-bounded; per-worker event bookkeeping."""

    capacity: int = 1_000_000
    blocks: OrderedDict[int, set[str]] = field(default_factory=OrderedDict)
    by_worker: dict[str, set[int]] = field(default_factory=dict)
    events: dict[str, WorkerEvents] = field(default_factory=dict)
    # Recent routing decisions: hash -> (worker, expiry). Siblings of a request follow it before its
    # KV events arrive (those come only after its prefill ran).
    pending: dict[int, tuple[str, float]] = field(default_factory=dict)
    evictions: int = 0

    def __len__(self) -> int:
        return len(self.blocks)

    # ---- updates from workers -------------------------------------------------------------------
    def apply(self, worker: str, event_id: int, ops: Iterable[Sequence[Any]]) -> bool:
        """Apply one event batch (ops: [kind, hashes, parent] in order).

        False when we are out of sync with this worker (a gap shows lost events, or we joined its stream
        midway, e.g. after a router restart): ask it for a dump.
        """
        state = self.events.setdefault(worker, WorkerEvents())
        fresh = state.last_id < 0 and event_id == 0  # a worker's very first batch needs no dump
        if state.last_id >= 0 and event_id <= state.last_id:
            return True  # a duplicate or reordered old batch: already reflected
        gap = state.last_id >= 0 and event_id != state.last_id + 1
        if gap:
            state.gaps += 1
            state.needs_dump = True
        if fresh:
            state.needs_dump = False
        state.last_id = event_id
        for kind, hashes, _parent in ops:
            if kind == "stored":
                for h in hashes:
                    self._add(worker, h)
            elif kind == "removed":
                for h in hashes:
                    self._remove(worker, h)
            elif kind == "cleared":
                self._drop_blocks(worker)
        return not state.needs_dump

    def load_dump(self, worker: str, event_id: int, hashes: Iterable[int]) -> None:
        """Replace what we know of a worker with its full list of cached hashes as of `event_id`."""
        self._drop_blocks(worker)
        for h in hashes:
            self._add(worker, h)
        state = self.events.setdefault(worker, WorkerEvents())
        state.last_id = event_id
        state.needs_dump = False

    def purge(self, worker: str) -> None:
        """Forget a worker entirely (heartbeat lapsed, or refused)."""
        self._drop_blocks(worker)
        self.events.pop(worker, None)
        self.pending = {h: wt for h, wt in self.pending.items() if wt[0] != worker}

    def needs_dump(self, worker: str) -> bool:
        state = self.events.get(worker)
        return state is None or state.needs_dump

    # ---- queries ------------------------------------------------------------------------------
    def overlap(self, hashes: Sequence[int], workers: Iterable[str], now: float | None = None) -> dict[str, int]:
        """For each worker: how many leading blocks of `hashes` it holds (or was just sent)."""
        now = time.monotonic() if now is None else now
        out = {w: 0 for w in workers}
        alive = set(out)
        for i, h in enumerate(hashes):
            holders = set(self.blocks.get(h, ()))
            pend = self.pending.get(h)
            if pend is not None and pend[1] > now:
                holders.add(pend[0])
            alive &= holders
            if not alive:
                break
            for w in alive:
                out[w] = i + 1
            if h in self.blocks:
                self.blocks.move_to_end(h)  # touched: keep hot prefixes in a bounded registry
        return out

    def remember(self, hashes: Sequence[int], worker: str, ttl: float, now: float | None = None) -> None:
        """Record a routing decision so the next few siblings follow it before KV events arrive."""
        now = time.monotonic() if now is None else now
        expiry = now + ttl
        for h in hashes:
            self.pending[h] = (worker, expiry)
        if len(self.pending) > 4 * 65536:  # drop expired entries now and then; bounded either way
            self.pending = {h: wt for h, wt in self.pending.items() if wt[1] > now}

    # ---- internals ----------------------------------------------------------------------------
    def _add(self, worker: str, h: int) -> None:
        holders = self.blocks.get(h)
        if holders is None:
            holders = self.blocks[h] = set()
        else:
            self.blocks.move_to_end(h)
        holders.add(worker)
        self.by_worker.setdefault(worker, set()).add(h)
        while len(self.blocks) > self.capacity:
            old, owners = self.blocks.popitem(last=False)
            for w in owners:
                self.by_worker.get(w, set()).discard(old)
            self.evictions += 1

    def _remove(self, worker: str, h: int) -> None:
        holders = self.blocks.get(h)
        if holders is not None:
            holders.discard(worker)
            if not holders:
                del self.blocks[h]
        self.by_worker.get(worker, set()).discard(h)

    def _drop_blocks(self, worker: str) -> None:
        for h in self.by_worker.pop(worker, set()):
            holders = self.blocks.get(h)
            if holders is not None:
                holders.discard(worker)
                if not holders:
                    del self.blocks[h]
