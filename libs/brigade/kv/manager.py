"""Per-sequence block bookkeeping on top of the pool: prefix lookup, allocation, commit, free.

Sliding window (every layer of the model attends to the last `window` positions only): a block whose every
slot is older than the window of the next position to compute is never read again, so `allocate` returns it to
the pool and leaves `NULL_BLOCK` in its table entry (entries keep their positional meaning; kernels read only
inside the window). A freed block that was hashed stays in the prefix cache, evictable, like any freed block;
a prefix match then needs only the blocks the window of its first uncached position reaches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from brigade.kv.hashing import NO_PARENT, hash_block
from brigade.kv.pool import BlockPool

if TYPE_CHECKING:
    from brigade.engine.sequence import Sequence

NULL_BLOCK = -1  # table entry of a block that left the sliding window and went back to the pool


class KvManager:
    """Gives sequences the blocks they need; shares full blocks by chained hash."""

    def __init__(self, pool: BlockPool, prefix_caching: bool = True, extra: bytes = b"",
                 hash_seed: int = 0, window: int = 0) -> None:
        """`window`: the sliding window of every layer, so blocks that left it can be freed (0: keep all)."""
        self.pool = pool
        self.window = window
        self.block_size = pool.block_size
        self.prefix_caching = prefix_caching
        self.extra = extra
        self.hash_seed = hash_seed
        # Full prompt blocks that an admitted sequence will compute but has not yet: a sibling with the same
        # prefix waits for them instead of computing them a second time.
        self.inflight: dict[int, Sequence] = {}

    def _hash_upto(self, seq: Sequence, num_blocks: int) -> None:
        """Extend seq.hashes to cover its first `num_blocks` full blocks."""
        bs = self.block_size
        for i in range(len(seq.hashes), num_blocks):
            parent = seq.hashes[i - 1] if i else NO_PARENT
            seq.hashes.append(hash_block(parent, seq.token_ids[i * bs:(i + 1) * bs], self.extra, self.hash_seed))

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks covering the longest prefix of seq (at least one token is left to compute)."""
        if not self.prefix_caching:
            return []
        limit = (seq.num_tokens - 1) // self.block_size
        self._hash_upto(seq, limit)
        if self._slides(seq):
            return self._match_window(seq, limit)
        hits: list[int] = []
        for h in seq.hashes[:limit]:
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def _slides(self, seq: Sequence) -> bool:
        # A disaggregated prefill hands all its prompt blocks to the decode side: keep them whole.
        return self.window > 0 and not seq.prefill_only

    def _first_needed(self, num_computed: int) -> int:
        """Index of the first block the window of position `num_computed` (the next to compute) reaches."""
        return max(0, num_computed - self.window + 1) // self.block_size

    def _match_window(self, seq: Sequence, limit: int) -> list[int]:
        """Longest prefix of k blocks whose blocks from `_first_needed(k * block_size)` on are all cached;
        the blocks before them are NULL_BLOCK (the hash chain vouches for the tokens they held)."""
        found = [self.pool.lookup(h) for h in seq.hashes[:limit]]
        best, run = 0, 0  # run: cached blocks ending at block k - 1
        for k in range(1, limit + 1):
            run = run + 1 if found[k - 1] is not None else 0
            if run >= k - self._first_needed(k * self.block_size):
                best = k
        first = self._first_needed(best * self.block_size)
        live = [b for b in found[first:best] if b is not None]
        assert len(live) == best - first
        return [NULL_BLOCK] * first + live

    def waits_for(self, seq: Sequence, hits: int) -> bool:
        """True when the block after seq's cached prefix is being computed by another sequence."""
        if not self.prefix_caching or hits >= len(seq.hashes):
            return False
        owner = self.inflight.get(seq.hashes[hits])
        return owner is not None and owner is not seq

    def claim(self, seq: Sequence, hits: int) -> None:
        """Mark seq's uncached full prompt blocks as in flight (it is admitted and will compute them)."""
        if self.prefix_caching:
            for h in seq.hashes[hits:]:
                self.inflight.setdefault(h, seq)

    def _unclaim(self, seq: Sequence, hashes: list[int]) -> None:
        for h in hashes:
            if self.inflight.get(h) is seq:
                del self.inflight[h]

    def blocks_needed(self, seq: Sequence, num_new: int, hits: int = 0) -> int:
        total = -(-(seq.num_computed + hits * self.block_size + num_new) // self.block_size)
        return max(0, total - len(seq.block_ids) - hits)

    def allocate(self, seq: Sequence, num_new: int, hits: list[int] | tuple[int, ...] = ()) -> bool:
        """Reserve blocks for `num_new` more tokens (after the prefix hits); False if they don't fit."""
        if self._slides(seq):
            self._drop_left_window(seq)
        need = self.blocks_needed(seq, num_new, len(hits))
        live = [b for b in hits if b != NULL_BLOCK]
        reviving = sum(1 for b in live if self.pool.ref[b] == 0)
        if need + reviving > self.pool.num_free:
            return False
        for b in live:
            self.pool.acquire(b)
        seq.block_ids.extend(hits)
        if hits:  # prefix hits are committed; blocks allocated earlier may still be filling up
            seq.num_committed = len(seq.block_ids)
        for _ in range(need):
            seq.block_ids.append(self.pool.allocate())
        return True

    def _drop_left_window(self, seq: Sequence) -> None:
        """Free the blocks no query from seq.num_computed on can see (dropped ones form a prefix)."""
        i = min(self._first_needed(seq.num_computed), len(seq.block_ids)) - 1
        while i >= 0 and seq.block_ids[i] != NULL_BLOCK:
            self.pool.release(seq.block_ids[i])  # full, so committed when caching: it stays cached, evictable
            seq.block_ids[i] = NULL_BLOCK
            i -= 1

    def commit(self, seq: Sequence) -> None:
        """Register the blocks that became full since the last call (after their KV was computed)."""
        if not self.prefix_caching:
            return
        full = seq.num_computed // self.block_size
        if full <= seq.num_committed:
            return
        self._hash_upto(seq, full)
        for i in range(seq.num_committed, full):
            self.pool.commit(seq.block_ids[i], seq.hashes[i], seq.hashes[i - 1] if i else None)
        if self.inflight:
            self._unclaim(seq, seq.hashes[seq.num_committed:full])
        seq.num_committed = full

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks, tail first, so its tail is evicted before its shared head."""
        for b in reversed(seq.block_ids):
            if b != NULL_BLOCK:
                self.pool.release(b)
        seq.block_ids.clear()
        seq.num_committed = 0
        if self.inflight:
            self._unclaim(seq, seq.hashes)
