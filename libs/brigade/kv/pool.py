"""The block pool: ref-counted KV blocks, a hash index of full blocks, and an O(1) LRU free list.

A block with ref count 0 sits in the free list. If it holds a full, hashed block it stays findable by
hash until it is reused, so a later request with the same prefix revives it instead of recomputing.
Allocation takes the least recently freed block; blocks that never held a cached prefix are freed to
the front so they are reused before cached ones.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal


class NoFreeBlocks(RuntimeError):
    """Raised by `allocate` when every block is in use."""


@dataclass(frozen=True)
class KvEvent:
    """A change to the set of cached block hashes, for the router's prefix registry."""

    kind: Literal["stored", "removed", "cleared"]
    block_hashes: tuple[int, ...] = ()
    parent_hash: int | None = None


@dataclass
class PoolStats:
    """Counters exposed as metrics."""

    prefix_queries: int = 0  # prompt tokens looked up
    prefix_hits: int = 0  # of which found cached
    evictions: int = 0  # cached blocks reused for other content
    preemptions: int = 0  # bumped by the scheduler


class BlockPool:
    """Fixed set of `num_blocks` KV blocks of `block_size` tokens each."""

    def __init__(self, num_blocks: int, block_size: int,
                 on_event: Callable[[KvEvent], None] | None = None) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.on_event = on_event
        self.ref = [0] * num_blocks
        self.hash: list[int | None] = [None] * num_blocks
        self.by_hash: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.stats = PoolStats()

    @property
    def num_free(self) -> int:
        """Blocks that can be allocated now (including cached ones that would be evicted)."""
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def allocate(self) -> int:
        """Take a block for new content (ref 1), evicting the least recently freed cached block."""
        if not self.free:
            raise NoFreeBlocks("KV cache is full")
        block, _ = self.free.popitem(last=False)
        old = self.hash[block]
        if old is not None:
            self.hash[block] = None
            del self.by_hash[old]
            self.stats.evictions += 1
            self._emit(KvEvent("removed", (old,)))
        self.ref[block] = 1
        return block

    def lookup(self, block_hash: int) -> int | None:
        """The block holding this hash, in use or free-but-cached; None when not cached."""
        return self.by_hash.get(block_hash)

    def acquire(self, block: int) -> None:
        """Add a reference to a cached block (reviving it from the free list if needed)."""
        if self.ref[block] == 0:
            del self.free[block]
        self.ref[block] += 1

    def release(self, block: int) -> None:
        """Drop a reference; at zero the block joins the free list (cached ones at the LRU tail)."""
        if self.ref[block] <= 0:
            raise RuntimeError(f"block {block} released more times than acquired")
        self.ref[block] -= 1
        if self.ref[block] == 0:
            self.free[block] = None
            if self.hash[block] is None:
                self.free.move_to_end(block, last=False)

    def commit(self, block: int, block_hash: int, parent_hash: int | None) -> bool:
        """Register a full block under its hash; False if that hash is already cached elsewhere."""
        if block_hash in self.by_hash or self.hash[block] is not None:
            return False
        self.hash[block] = block_hash
        self.by_hash[block_hash] = block
        self._emit(KvEvent("stored", (block_hash,), parent_hash))
        return True

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash (only when no block is in use); emits `cleared`."""
        if self.num_used:
            return False
        self.by_hash.clear()
        self.hash = [None] * self.num_blocks
        self._emit(KvEvent("cleared"))
        return True

    def _emit(self, event: KvEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)
