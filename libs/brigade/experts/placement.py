"""Which shard holds which expert: static specs for the shards, and the live map workers build from heartbeats."""

from __future__ import annotations

import threading
from dataclasses import dataclass


class PlacementError(ValueError):
    """A placement spec that names bad experts or leaves one out."""


def contiguous(num_experts: int, num_shards: int) -> list[list[int]]:
    """Shard i holds experts [i*E//N, (i+1)*E//N): contiguous, balanced ranges (the default)."""
    if not 0 < num_shards <= num_experts:
        raise PlacementError(f"cannot spread {num_experts} experts over {num_shards} shards")
    return [list(range(i * num_experts // num_shards, (i + 1) * num_experts // num_shards)) for i in range(num_shards)]


def parse_placement(spec: str, num_experts: int, num_shards: int) -> list[list[int]]:
    """Experts per shard, the same in every MoE layer. `spec`: shards separated by ';', each a list of ids and
    ranges, e.g. "0-3,7;4-7" (expert 7 replicated on both shards). Empty: `contiguous`."""
    if not spec.strip():
        return contiguous(num_experts, num_shards)
    shards: list[list[int]] = []
    for part in spec.split(";"):
        ids: set[int] = set()
        for item in filter(None, (x.strip() for x in part.split(","))):
            lo, _, hi = item.partition("-")
            try:
                ids.update(range(int(lo), int(hi or lo) + 1))
            except ValueError as e:
                raise PlacementError(f"placement {spec!r}: bad item {item!r}") from e
        shards.append(sorted(ids))
    if len(shards) != num_shards:
        raise PlacementError(f"placement {spec!r} lists {len(shards)} shards, expected {num_shards}")
    bad = sorted({e for s in shards for e in s if not 0 <= e < num_experts})
    if bad:
        raise PlacementError(f"placement {spec!r}: no such experts {bad} (the model has {num_experts})")
    missing = sorted(set(range(num_experts)) - {e for s in shards for e in s})
    if missing:
        raise PlacementError(f"placement {spec!r} leaves experts {missing} on no shard")
    if any(not s for s in shards):
        raise PlacementError(f"placement {spec!r} gives a shard no experts")
    return shards


def parse_shard(spec: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError as e:
        raise PlacementError(f"--shard must be I/N (e.g. 0/2), got {spec!r}") from e
    if not 0 <= i < n:
        raise PlacementError(f"--shard {spec}: need 0 <= I < N")
    return i, n


@dataclass(frozen=True)
class ShardEntry:
    shard_id: str
    experts: tuple[frozenset[int], ...]  # per layer
    seen: float  # monotonic time of its last heartbeat
    socket: str = ""  # its Unix socket, when the reader may dispatch to it directly (same host)


class LivePlacement:
    """The live map, from shard heartbeats: per layer, per expert, the shard ids that hold it.

    Updated on the event loop, read on the engine thread: readers get an immutable snapshot (`owners`).
    """

    def __init__(self, num_layers: int, num_experts: int, timeout: float = 3.0) -> None:
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.timeout = timeout
        self._shards: dict[str, ShardEntry] = {}
        self._lock = threading.Lock()
        self._owners: tuple[tuple[tuple[str, ...], ...], ...] = self._build()
        self.version = 0  # bumped whenever the map changes

    def update(self, shard_id: str, experts: list[list[int]], now: float, socket: str = "") -> bool:
        """Record a heartbeat (and the shard's socket, if usable); True when the map changed (a new shard, or
        new holdings)."""
        held = tuple(frozenset(e) for e in experts[:self.num_layers])
        with self._lock:
            old = self._shards.get(shard_id)
            self._shards[shard_id] = ShardEntry(shard_id, held, now, socket)
            if old is not None and old.experts == held:
                return False
            self._rebuild()
            return True

    def remove(self, shard_id: str) -> bool:
        """Forget a shard (stopping, failed, or silent); True when it was known."""
        with self._lock:
            if self._shards.pop(shard_id, None) is None:
                return False
            self._rebuild()
            return True

    def purge(self, now: float) -> list[str]:
        """Forget shards whose heartbeat lapsed; return their ids."""
        dead = [s.shard_id for s in list(self._shards.values()) if now - s.seen > self.timeout]
        for shard_id in dead:
            self.remove(shard_id)
        return dead

    def owners(self, layer: int) -> tuple[tuple[str, ...], ...]:
        """Per expert of `layer`, the live shard ids holding it (sorted; empty when none)."""
        return self._owners[layer]

    def missing(self, layer: int) -> list[int]:
        return [e for e, o in enumerate(self._owners[layer]) if not o]

    def shards(self) -> list[str]:
        return sorted(self._shards)

    def sockets(self) -> dict[str, str]:
        """Live shard id -> Unix socket, for the shards that have one (a snapshot)."""
        with self._lock:
            return {s.shard_id: s.socket for s in self._shards.values() if s.socket}

    def _rebuild(self) -> None:
        self._owners = self._build()
        self.version += 1

    def _build(self) -> tuple[tuple[tuple[str, ...], ...], ...]:
        out = []
        for layer in range(self.num_layers):
            per = [[] for _ in range(self.num_experts)]  # type: list[list[str]]
            for sid in sorted(self._shards):
                held = self._shards[sid].experts
                if layer < len(held):
                    for e in held[layer]:
                        if 0 <= e < self.num_experts:
                            per[e].append(sid)
            out.append(tuple(tuple(p) for p in per))
        return tuple(out)
