"""KV block pool, KvManager, block hashing and the scheduler: model-based and plain unit tests.

The stateful tests drive BlockPool / KvManager with random operation sequences and compare them against a
small reference model after every step. `KvShadow` additionally records which tokens were "written" into
each block (what a real KV cache would hold), so any prefix-cache hit or hashed block can be checked against
the tokens it claims to hold.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from brigade.engine.sampling import SamplingParams
from brigade.engine.scheduler import Batch, Scheduler
from brigade.engine.sequence import Sequence, Status
from brigade.kv.hashing import NO_PARENT, hash_block, hash_blocks
from brigade.kv.manager import KvManager
from brigade.kv.pool import BlockPool, KvEvent, NoFreeBlocks

BS = 4


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def make_seq(rid: str, tokens: list[int], max_tokens: int = 16) -> Sequence:
    return Sequence(rid, list(tokens), len(tokens), SamplingParams(max_tokens=max_tokens))


def check_pool(pool: BlockPool) -> None:
    """Structural invariants of a BlockPool that hold after any public operation."""
    free = list(pool.free)
    assert len(free) == len(set(free))
    for b in range(pool.num_blocks):
        assert pool.ref[b] >= 0
        assert (b in pool.free) == (pool.ref[b] == 0), f"block {b}: ref {pool.ref[b]}, free {b in pool.free}"
    assert pool.num_free == len(free) == sum(r == 0 for r in pool.ref)
    assert pool.num_free + pool.num_used == pool.num_blocks
    hashed = {b: h for b, h in enumerate(pool.hash) if h is not None}
    assert {b: h for h, b in pool.by_hash.items()} == hashed  # by_hash is the exact inverse of hash[]
    assert len(pool.by_hash) == len(hashed)


def drain_and_refill(pool: BlockPool) -> None:
    """With nothing held, all num_blocks blocks can be allocated (each once), and then no more."""
    assert pool.num_used == 0
    got = [pool.allocate() for _ in range(pool.num_blocks)]
    assert sorted(got) == list(range(pool.num_blocks))
    with pytest.raises(NoFreeBlocks):
        pool.allocate()


# ---------------------------------------------------------------------------------------------------------------
# BlockPool against a reference model
# ---------------------------------------------------------------------------------------------------------------

HASHES = st.integers(1, 16)  # few values, so duplicate commits and lookups of known hashes are frequent


class PoolMachine(RuleBasedStateMachine):
    """BlockPool vs. a model: holder multiset, block -> hash map, and the exact free-list order."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[KvEvent] = []
        self.pool = BlockPool(1, BS)
        self.held: list[int] = []  # one entry per reference handed out
        self.hashes: dict[int, int] = {}  # block -> hash
        self.free_order: list[int] = []  # front = next to allocate

    @initialize(num_blocks=st.integers(1, 8))
    def setup(self, num_blocks: int) -> None:
        self.pool = BlockPool(num_blocks, BS, on_event=self.events.append)
        self.free_order = list(range(num_blocks))

    def _ref0(self) -> list[int]:
        return [b for b in range(self.pool.num_blocks) if b not in self.held]

    @rule()
    def allocate(self) -> None:
        self.events.clear()
        if not self.free_order:
            with pytest.raises(NoFreeBlocks):
                self.pool.allocate()
            assert self.events == []
            return
        expected = self.free_order.pop(0)
        block = self.pool.allocate()
        assert block == expected, "allocate must take the front of the LRU free list"
        old = self.hashes.pop(block, None)
        if old is None:
            assert self.events == []
        else:
            assert self.events == [KvEvent("removed", (old,))]
            assert self.pool.lookup(old) is None
        self.held.append(block)

    @precondition(lambda self: bool(self.free_order))
    @rule(h=HASHES)
    def store_and_release(self, h: int) -> None:
        """allocate + commit + release: leaves a cached block on the free list (to revive or evict)."""
        if h in self.hashes.values():
            return
        self.allocate()
        block = self.held.pop()
        self.events.clear()
        assert self.pool.commit(block, h, None)
        assert self.events == [KvEvent("stored", (h,), None)]
        self.hashes[block] = h
        self.pool.release(block)  # freshly allocated, so this was the only reference
        self.free_order.append(block)

    @precondition(lambda self: bool(self.hashes))
    @rule(data=st.data())
    def acquire_by_lookup(self, data: st.DataObject) -> None:
        self.events.clear()
        h = data.draw(st.sampled_from(sorted(self.hashes.values())))
        block = self.pool.lookup(h)
        assert block is not None and self.hashes[block] == h
        if block not in self.held:
            self.free_order.remove(block)  # revived from the free list
        self.pool.acquire(block)
        self.held.append(block)
        assert self.events == []

    @rule(h=HASHES)
    def lookup(self, h: int) -> None:
        expected = next((b for b, bh in self.hashes.items() if bh == h), None)
        assert self.pool.lookup(h) == expected

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        self.events.clear()
        block = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.pool.release(block)
        if block not in self.held:
            if block in self.hashes:
                self.free_order.append(block)  # cached: most recently freed, evicted last
            else:
                self.free_order.insert(0, block)  # never hashed: reused first
        assert self.events == []

    @precondition(lambda self: len(self.held) < self.pool.num_blocks)
    @rule(data=st.data())
    def double_release(self, data: st.DataObject) -> None:
        block = data.draw(st.sampled_from(self._ref0()))
        before = (list(self.pool.free), list(self.pool.ref))
        with pytest.raises(RuntimeError):
            self.pool.release(block)
        assert (list(self.pool.free), list(self.pool.ref)) == before

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data(), h=HASHES, parent=st.none() | HASHES)
    def commit(self, data: st.DataObject, h: int, parent: int | None) -> None:
        self.events.clear()
        block = data.draw(st.sampled_from(self.held))
        expected = block not in self.hashes and h not in self.hashes.values()
        assert self.pool.commit(block, h, parent) is expected
        if expected:
            self.hashes[block] = h
            assert self.events == [KvEvent("stored", (h,), parent)]
        else:
            assert self.events == []

    @rule()
    def reset_prefix_cache(self) -> None:
        self.events.clear()
        expected = not self.held
        assert self.pool.reset_prefix_cache() is expected
        if expected:
            self.hashes.clear()
            assert self.events == [KvEvent("cleared")]
        else:
            assert self.events == []

    @invariant()
    def matches_model(self) -> None:
        check_pool(self.pool)
        counts = Counter(self.held)
        assert self.pool.ref == [counts[b] for b in range(self.pool.num_blocks)]
        assert list(self.pool.free) == self.free_order
        assert {b: h for b, h in enumerate(self.pool.hash) if h is not None} == self.hashes

    def teardown(self) -> None:
        for block in self.held:
            self.pool.release(block)
        self.held.clear()
        check_pool(self.pool)
        drain_and_refill(self.pool)


PoolMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)
TestPoolMachine = PoolMachine.TestCase


# ---------------------------------------------------------------------------------------------------------------
# KvManager against a shadow of the cache contents
# ---------------------------------------------------------------------------------------------------------------


class KvShadow:
    """What a real KV cache would hold: for each block, the token prefix ending at its last written slot."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.written: dict[int, tuple[int, ...]] = {}

    def compute(self, seq: Sequence, n: int) -> None:
        """Write the KV of seq's next n tokens (only into blocks nobody else holds) and bump num_computed."""
        assert len(seq.block_ids) * BS >= seq.num_computed + n, "tokens computed without a block to hold them"
        for pos in range(seq.num_computed, seq.num_computed + n):
            b = seq.block_ids[pos // BS]
            assert self.pool.ref[b] == 1, f"writing into block {b} shared by {self.pool.ref[b]} holders"
            self.written[b] = tuple(seq.token_ids[:pos + 1])
        seq.num_computed += n

    def check_seq(self, seq: Sequence) -> None:
        """Every computed position of seq is backed by a block holding exactly seq's tokens."""
        assert len(set(seq.block_ids)) == len(seq.block_ids)
        for i in range(ceil_div(seq.num_computed, BS)):
            end = min((i + 1) * BS, seq.num_computed)
            w = self.written.get(seq.block_ids[i])
            assert w is not None and len(w) >= end and w[:end] == tuple(seq.token_ids[:end]), \
                f"{seq.request_id}: block {i} ({seq.block_ids[i]}) holds the wrong tokens"

    def check_hashed(self) -> None:
        """A block registered under hash h holds exactly the full-block prefix that hashes to h."""
        for b, h in enumerate(self.pool.hash):
            if h is None:
                continue
            w = self.written[b]
            assert len(w) % BS == 0 and hash_blocks(w, BS)[-1] == h


class KvMachine(RuleBasedStateMachine):
    """Several sequences sharing prefixes, admitted / stepped / freed in random order through KvManager."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[KvEvent] = []
        self.pool = BlockPool(1, BS)
        self.kv = KvManager(self.pool)
        self.shadow = KvShadow(self.pool)
        self.base: list[int] = []
        self.seqs: list[Sequence] = []

    @initialize(num_blocks=st.integers(3, 14), prefix_caching=st.booleans(),
                base=st.lists(st.integers(0, 3), min_size=12, max_size=12))
    def setup(self, num_blocks: int, prefix_caching: bool, base: list[int]) -> None:
        self.pool = BlockPool(num_blocks, BS, on_event=self.events.append)
        self.kv = KvManager(self.pool, prefix_caching=prefix_caching)
        self.shadow = KvShadow(self.pool)
        self.base = base

    def _with(self, status: Status) -> list[Sequence]:
        return [s for s in self.seqs if s.status is status]

    @precondition(lambda self: sum(s.status is not Status.FINISHED for s in self.seqs) < 5)
    @rule(k=st.integers(0, 12), tail=st.lists(st.integers(0, 1), min_size=1, max_size=5))
    def add_seq(self, k: int, tail: list[int]) -> None:
        self.seqs.append(make_seq(f"r{len(self.seqs)}", self.base[:k] + tail))

    def _compute_and_commit(self, seq: Sequence, n: int, data: st.DataObject) -> None:
        full_before = seq.num_computed // BS
        self.shadow.compute(seq, n)
        self.events.clear()
        self.kv.commit(seq)
        assert all(e.kind == "stored" for e in self.events)
        full_after = seq.num_computed // BS
        if self.kv.prefix_caching:
            assert seq.hashes[:full_after] == hash_blocks(seq.token_ids, BS)[:full_after]
            # Every block that just became full (and computed) is now findable by its hash.
            for i in range(full_before, full_after):
                assert self.pool.lookup(seq.hashes[i]) is not None, \
                    f"{seq.request_id}: full block {i} was never committed to the prefix cache"
        else:
            assert self.events == [] and not self.pool.by_hash
        if seq.num_computed == seq.num_tokens:  # the engine samples and appends one token
            seq.token_ids.append(data.draw(st.integers(0, 3)))

    @precondition(lambda self: any(s.status is Status.WAITING for s in self.seqs))
    @rule(data=st.data())
    def admit(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self._with(Status.WAITING)))
        assert seq.block_ids == [] and seq.num_computed == 0
        hits = self.kv.match_prefix(seq)
        limit = (seq.num_tokens - 1) // BS
        assert len(hits) <= limit and len(set(hits)) == len(hits)
        expected_hashes = hash_blocks(seq.token_ids, BS)
        for i, b in enumerate(hits):
            assert self.pool.hash[b] == expected_hashes[i]
            assert self.shadow.written[b] == tuple(seq.token_ids[:(i + 1) * BS])
        if self.kv.prefix_caching and len(hits) < limit:  # the match is maximal
            assert self.pool.lookup(expected_hashes[len(hits)]) is None
        if not self.kv.prefix_caching:
            assert hits == []
        cached = len(hits) * BS
        n = data.draw(st.integers(1, seq.num_tokens - cached))
        reviving = sum(self.pool.ref[b] == 0 for b in hits)
        fits = ceil_div(cached + n, BS) - len(hits) + reviving <= self.pool.num_free
        ref_before = list(self.pool.ref)
        ok = self.kv.allocate(seq, n, hits)
        assert ok is fits
        if not ok:
            assert seq.block_ids == [] and self.pool.ref == ref_before
            return
        assert seq.block_ids[:len(hits)] == hits
        assert len(seq.block_ids) == ceil_div(cached + n, BS)
        for b in hits:
            assert self.pool.ref[b] == ref_before[b] + 1
        for b in seq.block_ids[len(hits):]:
            assert ref_before[b] == 0 and self.pool.ref[b] == 1
            self.shadow.written.pop(b, None)  # fresh block: whatever it held is gone
        seq.status = Status.RUNNING
        seq.num_computed = cached
        self._compute_and_commit(seq, n, data)

    @precondition(lambda self: any(s.status is Status.RUNNING for s in self.seqs))
    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self._with(Status.RUNNING)))
        n = data.draw(st.integers(1, seq.num_tokens - seq.num_computed))
        old = list(seq.block_ids)
        need = max(0, ceil_div(seq.num_computed + n, BS) - len(old))
        fits = need <= self.pool.num_free
        ok = self.kv.allocate(seq, n)
        assert ok is fits
        if not ok:
            assert seq.block_ids == old
            return
        assert seq.block_ids[:len(old)] == old and len(seq.block_ids) == len(old) + need
        for b in seq.block_ids[len(old):]:
            self.shadow.written.pop(b, None)
        self._compute_and_commit(seq, n, data)

    @precondition(lambda self: any(s.status is Status.RUNNING for s in self.seqs))
    @rule(data=st.data(), requeue=st.booleans())
    def free(self, data: st.DataObject, requeue: bool) -> None:
        seq = data.draw(st.sampled_from(self._with(Status.RUNNING)))
        # Expected free list: released tail first; cached blocks to the tail, uncached to the front.
        expected = list(self.pool.free)
        ref = list(self.pool.ref)
        for b in reversed(seq.block_ids):
            ref[b] -= 1
            if ref[b] == 0:
                if self.pool.hash[b] is not None:
                    expected.append(b)
                else:
                    expected.insert(0, b)
        self.events.clear()
        self.kv.free(seq)
        assert self.events == []
        assert list(self.pool.free) == expected and self.pool.ref == ref
        assert seq.block_ids == [] and seq.num_committed == 0
        seq.num_computed = 0
        seq.status = Status.WAITING if requeue else Status.FINISHED

    @invariant()
    def consistent(self) -> None:
        check_pool(self.pool)
        holders = Counter(b for s in self.seqs for b in s.block_ids)
        assert self.pool.ref == [holders[b] for b in range(self.pool.num_blocks)]
        for s in self.seqs:
            if s.status is Status.RUNNING:
                assert len(s.block_ids) >= ceil_div(s.num_computed, BS)
                assert s.num_committed * BS <= s.num_computed, \
                    f"{s.request_id}: {s.num_committed} blocks marked committed, only {s.num_computed} tokens computed"
                self.shadow.check_seq(s)
            else:
                assert s.block_ids == []
        self.shadow.check_hashed()

    def teardown(self) -> None:
        for s in self._with(Status.RUNNING):
            self.kv.free(s)
        check_pool(self.pool)
        drain_and_refill(self.pool)


KvMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestKvMachine = KvMachine.TestCase


# ---------------------------------------------------------------------------------------------------------------
# Pool / manager: targeted cases
# ---------------------------------------------------------------------------------------------------------------


def test_lru_order_and_events() -> None:
    events: list[KvEvent] = []
    pool = BlockPool(4, BS, on_event=events.append)
    a, b, c, d = (pool.allocate() for _ in range(4))
    assert pool.commit(a, 11, None) and pool.commit(b, 12, 11) and pool.commit(c, 13, 12)
    assert events == [KvEvent("stored", (11,), None), KvEvent("stored", (12,), 11), KvEvent("stored", (13,), 12)]
    events.clear()
    for blk in (b, a, c, d):  # cached ones freed in the order b, a, c; d never hashed
        pool.release(blk)
    assert events == [] and pool.num_free == 4
    assert pool.lookup(11) == a and pool.lookup(12) == b and pool.lookup(13) == c  # still cached while free
    assert pool.allocate() == d and events == []  # never-hashed block goes first
    assert pool.allocate() == b and events == [KvEvent("removed", (12,))]  # least recently freed cached
    assert pool.lookup(12) is None and pool.lookup(11) == a
    events.clear()
    pool.acquire(pool.lookup(13))  # revive c: it leaves the free list and keeps its hash
    assert pool.ref[c] == 1 and pool.num_free == 1 and events == []
    assert pool.allocate() == a and events == [KvEvent("removed", (11,))]
    with pytest.raises(NoFreeBlocks):
        pool.allocate()
    assert pool.stats.evictions == 2
    check_pool(pool)


def test_double_free_raises() -> None:
    pool = BlockPool(2, BS)
    b = pool.allocate()
    pool.acquire(b)
    pool.release(b)
    pool.release(b)
    with pytest.raises(RuntimeError):
        pool.release(b)
    with pytest.raises(RuntimeError):
        pool.release(1 - b)  # never allocated
    check_pool(pool)
    drain_and_refill(pool)


def test_commit_rejects_duplicates_and_rehash() -> None:
    pool = BlockPool(3, BS)
    a, b = pool.allocate(), pool.allocate()
    assert pool.commit(a, 5, None)
    assert not pool.commit(b, 5, None)  # hash already cached in a
    assert not pool.commit(a, 6, None)  # a already holds a hash
    assert pool.hash == [5, None, None] and pool.by_hash == {5: a}
    pool.release(b)
    assert next(iter(pool.free)) == b  # uncommitted duplicate is reused first


def test_reset_prefix_cache() -> None:
    events: list[KvEvent] = []
    pool = BlockPool(2, BS, on_event=events.append)
    a = pool.allocate()
    pool.commit(a, 9, None)
    assert not pool.reset_prefix_cache()  # a is in use
    pool.release(a)
    assert pool.reset_prefix_cache()
    assert events[-1] == KvEvent("cleared") and pool.lookup(9) is None and pool.by_hash == {}
    check_pool(pool)


def test_invalid_pool_size() -> None:
    with pytest.raises(ValueError):
        BlockPool(0, BS)
    with pytest.raises(ValueError):
        BlockPool(4, 0)


def _prefill(kv: KvManager, seq: Sequence) -> list[int]:
    """Admit seq with its prefix hits, compute the whole prompt and commit; returns the hits."""
    hits = kv.match_prefix(seq)
    cached = len(hits) * BS
    assert kv.allocate(seq, seq.num_tokens - cached, hits)
    seq.num_computed = seq.num_tokens
    kv.commit(seq)
    return hits


def test_prefix_sharing_two_sequences() -> None:
    events: list[KvEvent] = []
    pool = BlockPool(16, BS, on_event=events.append)
    kv = KvManager(pool)
    shared = [7, 1, 2, 3, 4, 5, 6, 8]  # two full blocks
    a = make_seq("a", shared + [9, 9, 1])
    b = make_seq("b", shared + [3, 2, 1, 0, 5])
    assert _prefill(kv, a) == []
    assert [e.kind for e in events] == ["stored", "stored"]  # only a's two full blocks
    assert events[1].parent_hash == events[0].block_hashes[0]
    hits = _prefill(kv, b)
    assert hits == a.block_ids[:2] and b.block_ids[:2] == a.block_ids[:2]
    assert b.num_committed == 3  # two shared blocks plus its own third full block
    assert [pool.ref[x] for x in a.block_ids[:2]] == [2, 2]
    assert pool.ref[a.block_ids[2]] == 1 and a.block_ids[2] != b.block_ids[2]
    assert len(events) == 3
    shared_blocks = list(a.block_ids[:2])
    kv.free(a)
    assert [pool.ref[x] for x in b.block_ids[:2]] == [1, 1]
    kv.free(b)
    assert pool.num_used == 0
    # A third sequence revives the cached blocks from the free list.
    c = make_seq("c", shared + [4])
    assert _prefill(kv, c) == shared_blocks and c.block_ids[:2] == shared_blocks
    assert [pool.ref[x] for x in shared_blocks] == [1, 1]
    check_pool(pool)


def test_prefix_hits_leave_one_token_to_compute() -> None:
    pool = BlockPool(8, BS)
    kv = KvManager(pool)
    a = make_seq("a", list(range(8)))
    _prefill(kv, a)
    same = make_seq("b", list(range(8)))
    assert kv.match_prefix(same) == a.block_ids[:1]  # the last block is recomputed so a logit is produced
    longer = make_seq("c", list(range(9)))
    assert kv.match_prefix(longer) == a.block_ids[:2]


def test_free_evicts_tail_before_shared_head() -> None:
    pool = BlockPool(3, BS)
    kv = KvManager(pool)
    a = make_seq("a", list(range(12)) + [99])
    # 13 tokens need 4 blocks; the pool has 3, so the allocation fails cleanly.
    assert not kv.allocate(a, a.num_tokens)
    assert a.block_ids == [] and pool.num_used == 0
    a = make_seq("a", list(range(12)))
    _prefill(kv, a)
    blocks = list(a.block_ids)
    kv.free(a)
    assert list(pool.free) == blocks[::-1]  # the tail block is evicted first
    assert pool.allocate() == blocks[2]


def test_allocate_counts_revived_hits() -> None:
    pool = BlockPool(3, BS)
    kv = KvManager(pool)
    a = make_seq("a", list(range(8)) + [1])
    _prefill(kv, a)  # 3 blocks, the first two cached
    kv.free(a)
    b = make_seq("b", list(range(8)) + [5, 6, 7, 8, 9])
    hits = kv.match_prefix(b)
    assert len(hits) == 2
    # 2 revived + 2 new = 4 > 3 free: refused without touching the pool.
    assert not kv.allocate(b, b.num_tokens - 8, hits)
    assert pool.num_free == 3 and b.block_ids == [] and all(r == 0 for r in pool.ref)
    assert kv.allocate(b, 4, hits)  # 2 revived + 1 new fits
    assert b.block_ids[:2] == hits and pool.num_free == 0


def test_blocks_filled_across_steps_are_committed() -> None:
    """A block allocated in one step and filled in a later one is still registered once it is full.

    Regression: KvManager.allocate used to set `num_committed = len(block_ids)` on every call, marking a
    partially filled block as committed so it never entered the prefix cache.
    """
    pool = BlockPool(8, BS)
    kv = KvManager(pool)
    # Chunked prefill with a chunk that is not a multiple of the block size.
    a = make_seq("a", list(range(10)))
    assert kv.allocate(a, 6)
    a.num_computed = 6
    kv.commit(a)
    assert kv.allocate(a, 4)
    a.num_computed = 10
    kv.commit(a)
    assert a.num_committed == 2
    assert pool.lookup(hash_blocks(a.token_ids, BS)[1]) == a.block_ids[1]
    # Decode filling the prompt's last partial block.
    b = make_seq("b", [50, 51, 52, 53, 54, 55])
    _prefill(kv, b)
    for tok in (56, 57):
        b.token_ids.append(tok)
        assert kv.allocate(b, 1)
        b.num_computed += 1
        kv.commit(b)
    assert b.num_computed == 8 and b.num_committed == 2
    assert pool.lookup(hash_blocks(b.token_ids, BS)[1]) == b.block_ids[1]


def test_prefix_caching_disabled() -> None:
    events: list[KvEvent] = []
    pool = BlockPool(8, BS, on_event=events.append)
    kv = KvManager(pool, prefix_caching=False)
    a = make_seq("a", list(range(9)))
    _prefill(kv, a)
    b = make_seq("b", list(range(9)))
    assert kv.match_prefix(b) == [] and events == [] and pool.by_hash == {}


# ---------------------------------------------------------------------------------------------------------------
# hash_blocks
# ---------------------------------------------------------------------------------------------------------------


def test_hash_blocks_only_full_blocks() -> None:
    assert hash_blocks([], BS) == []
    assert hash_blocks([1, 2, 3], BS) == []
    assert len(hash_blocks(list(range(4)), BS)) == 1
    assert len(hash_blocks(list(range(11)), BS)) == 2
    assert hash_blocks(list(range(11)), BS) == hash_blocks(list(range(8)), BS)  # the partial tail is ignored


def test_hash_blocks_chaining() -> None:
    x, y, z = [1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]
    hx, hy = hash_blocks(x + y, BS)
    assert hx == hash_block(NO_PARENT, x) and hy == hash_block(hx, y)
    # Same tokens in the second block, different first block -> different second hash.
    assert hash_blocks(z + y, BS)[1] != hy
    assert hash_block(1, y) != hash_block(2, y)
    # Position matters: the same block first or second hashes differently.
    assert hash_blocks(y + x, BS)[0] != hy
    # Starting from a parent continues the chain.
    assert hash_blocks(y, BS, parent=hx) == [hy]
    # Block size is part of the layout.
    assert hash_blocks(x + y, 8)[0] != hy


def test_hash_blocks_extra_and_seed() -> None:
    toks = list(range(12))
    plain = hash_blocks(toks, BS)
    for other in (hash_blocks(toks, BS, extra=b"lora-1"), hash_blocks(toks, BS, seed=1)):
        assert len(other) == 3 and all(p != o for p, o in zip(plain, other, strict=True))
    assert hash_blocks(toks, BS, extra=b"lora-1") != hash_blocks(toks, BS, extra=b"lora-2")
    assert hash_blocks(toks, BS, extra=b"x", seed=3) == hash_blocks(toks, BS, extra=b"x", seed=3)


def test_manager_hashes_use_extra_and_seed() -> None:
    pool = BlockPool(8, BS)
    kv = KvManager(pool, extra=b"tenant", hash_seed=7)
    s = make_seq("s", list(range(9)))
    kv.match_prefix(s)
    assert s.hashes == hash_blocks(s.token_ids, BS, extra=b"tenant", seed=7)


@settings(max_examples=150, deadline=None)
@given(a=st.lists(st.integers(0, 3), max_size=16), b=st.lists(st.integers(0, 3), max_size=16))
def test_hash_blocks_equal_iff_prefix_equal(a: list[int], b: list[int]) -> None:
    ha, hb = hash_blocks(a, BS), hash_blocks(b, BS)
    assert ha == hash_blocks(a + [1, 2], BS)[:len(ha)]  # extending never changes earlier hashes
    for i in range(min(len(ha), len(hb))):
        assert (ha[i] == hb[i]) == (a[:(i + 1) * BS] == b[:(i + 1) * BS])


# ---------------------------------------------------------------------------------------------------------------
# Scheduler, driven the way Engine.step drives it
# ---------------------------------------------------------------------------------------------------------------


def next_token(seq: Sequence) -> int:
    """A deterministic fake sample, so a recomputed sequence continues identically."""
    return (sum(seq.token_ids) * 31 + seq.num_tokens) % 5


def run_step(sched: Scheduler, shadow: KvShadow | None = None,
             sample: Callable[[Sequence], int] = next_token) -> Batch:
    """schedule(), check the batch, then compute / commit / sample / finish like Engine.step."""
    running_before = list(sched.running)
    batch = sched.schedule()
    assert batch.num_tokens <= sched.max_num_batched_tokens
    assert len(batch.seqs) <= sched.max_num_seqs and len(sched.running) <= sched.max_num_seqs
    assert len({id(s) for s in batch.seqs}) == len(batch.seqs)
    assert batch.num_new == sorted(batch.num_new, key=lambda n: n != 1)  # decode-like rows first
    decode_ctx = [s.num_computed for s, n in zip(batch.seqs, batch.num_new, strict=True) if n == 1]
    assert decode_ctx == sorted(decode_ctx)  # shortest context first, so attention can bucket by length
    for seq, n in zip(batch.seqs, batch.num_new, strict=True):
        assert seq.status is Status.RUNNING and seq in sched.running
        assert 1 <= n <= seq.num_tokens - seq.num_computed
        assert len(seq.block_ids) * BS >= seq.num_computed + n
    for k, victim in enumerate(batch.preempted):
        assert victim not in batch.seqs and victim.status is Status.WAITING
        assert victim.block_ids == [] and victim.num_computed == 0
        assert sched.waiting[len(batch.preempted) - 1 - k] is victim  # requeued at the head
    if batch.preempted:
        assert all(s in running_before for s in batch.seqs)  # nothing admitted in a step that preempts
    for seq, n in zip(batch.seqs, batch.num_new, strict=True):
        if shadow is not None:
            shadow.check_seq(seq)  # includes prefix hits of newly admitted sequences
            shadow.compute(seq, n)
        else:
            seq.num_computed += n
        sched.kv.commit(seq)
    for seq in batch.seqs:
        if seq.num_computed == seq.num_tokens:
            seq.token_ids.append(sample(seq))
            if seq.num_output >= seq.params.max_tokens:
                sched.finish(seq, "length")
    check_pool(sched.kv.pool)
    if shadow is not None:
        shadow.check_hashed()
    return batch


def make_sched(num_blocks: int, budget: int, max_seqs: int, chunked: bool = True) -> tuple[Scheduler, KvShadow]:
    pool = BlockPool(num_blocks, BS)
    return Scheduler(KvManager(pool), max_seqs, budget, chunked_prefill=chunked), KvShadow(pool)


def test_budget_and_max_num_seqs() -> None:
    sched, shadow = make_sched(64, budget=8, max_seqs=3)
    seqs = [make_seq(f"s{i}", [i] * 5, max_tokens=4) for i in range(6)]
    for s in seqs:
        sched.add(s)
    first = run_step(sched, shadow)
    assert first.seqs == [seqs[0], seqs[1]] and first.num_new == [5, 3]  # second prompt chunked to the budget
    peak = 0
    for _ in range(100):
        if not sched.has_work():
            break
        run_step(sched, shadow)
        peak = max(peak, len(sched.running))
    assert not sched.has_work() and peak == 3
    assert all(s.status is Status.FINISHED and s.num_output == 4 for s in seqs)
    assert sched.kv.pool.num_used == 0


def test_chunked_prefill_splits_long_prompt() -> None:
    sched, shadow = make_sched(32, budget=16, max_seqs=4)
    seq = make_seq("long", list(range(50)), max_tokens=3)
    sched.add(seq)
    sizes = [run_step(sched, shadow).num_new for _ in range(6)]
    assert sizes == [[16], [16], [16], [2], [1], [1]]
    assert seq.status is Status.FINISHED and seq.num_output == 3


def test_chunked_prefill_shares_budget_with_decodes() -> None:
    sched, shadow = make_sched(32, budget=8, max_seqs=4)
    a = make_seq("a", [1, 2, 3], max_tokens=10)
    sched.add(a)
    run_step(sched, shadow)
    b = make_seq("b", list(range(20)), max_tokens=2)
    sched.add(b)
    batch = run_step(sched, shadow)
    assert batch.seqs == [a, b] and batch.num_new == [1, 7]


def test_no_chunked_prefill_waits_for_whole_prompt() -> None:
    sched, _ = make_sched(32, budget=16, max_seqs=4, chunked=False)
    big = make_seq("big", list(range(20)))
    sched.add(big)
    batch = run_step(sched)
    assert batch.seqs == [] and list(sched.waiting) == [big]
    small_sched, shadow = make_sched(32, budget=16, max_seqs=4, chunked=False)
    small = make_seq("small", list(range(16)), max_tokens=2)
    small_sched.add(small)
    assert run_step(small_sched, shadow).num_new == [16]


def test_preemption_frees_blocks_and_requeues_at_head() -> None:
    sched, shadow = make_sched(4, budget=64, max_seqs=4)
    a = make_seq("a", [1, 1, 1, 1, 2, 2, 2], max_tokens=6)
    b = make_seq("b", [3, 3, 3, 3, 4, 4, 4], max_tokens=6)
    c = make_seq("c", [5, 5], max_tokens=1)
    for s in (a, b):
        sched.add(s)
    assert run_step(sched, shadow).seqs == [a, b]  # both prefills: 2 blocks each, pool full
    sched.add(c)
    run_step(sched, shadow)  # decodes fit in the blocks they hold; c cannot get a block
    assert a.num_tokens == b.num_tokens == 9 and list(sched.waiting) == [c]
    b_blocks = list(b.block_ids)
    batch = run_step(sched, shadow)  # a needs a third block: b (admitted last) is preempted
    assert batch.preempted == [b] and batch.seqs == [a]
    assert list(sched.waiting) == [b, c] and sched.running == [a]
    assert sched.kv.pool.stats.preemptions == 1
    pool = sched.kv.pool
    assert a.block_ids[2] == b_blocks[1]  # b's tail block was freed first, so it is evicted first
    assert pool.ref[b_blocks[0]] == 0 and pool.lookup(b.hashes[0]) == b_blocks[0]  # b's head stays cached
    assert b.num_cached == 0 and b.num_output == 2  # its generated tokens are kept for recompute
    for _ in range(50):
        if not sched.has_work():
            break
        run_step(sched, shadow)
    assert not sched.has_work()
    assert a.num_output == b.num_output == 6 and c.num_output == 1
    assert sched.kv.pool.num_used == 0


def test_prefix_hit_through_scheduler() -> None:
    sched, shadow = make_sched(16, budget=64, max_seqs=4)
    prompt = list(range(12))
    a = make_seq("a", prompt, max_tokens=1)
    sched.add(a)
    run_step(sched, shadow)
    assert a.status is Status.FINISHED
    b = make_seq("b", prompt, max_tokens=1)
    sched.add(b)
    batch = run_step(sched, shadow)
    assert batch.num_new == [4] and b.num_cached == 8
    stats = sched.kv.pool.stats
    assert stats.prefix_queries == 24 and stats.prefix_hits == 8


@settings(max_examples=60, deadline=None)
@given(
    base=st.lists(st.integers(0, 2), min_size=12, max_size=12),
    shapes=st.lists(st.tuples(st.integers(0, 12), st.lists(st.integers(0, 2), min_size=1, max_size=8)),
                    min_size=2, max_size=6),
    max_tokens=st.integers(1, 8),
    budget=st.integers(1, 24),
    max_seqs=st.integers(1, 4),
    extra_blocks=st.integers(0, 6),
    chunked=st.booleans(),
    prefix_caching=st.booleans(),
)
def test_scheduler_random_workloads(base: list[int], shapes: list[tuple[int, list[int]]], max_tokens: int,
                                    budget: int, max_seqs: int, extra_blocks: int, chunked: bool,
                                    prefix_caching: bool) -> None:
    prompts = [base[:k] + tail for k, tail in shapes]  # shared prefixes of random length
    longest = max(map(len, prompts)) + max_tokens
    if not chunked:
        budget = max(budget, longest)  # otherwise a long (re)computed prompt can never be admitted
    pool = BlockPool(ceil_div(longest, BS) + extra_blocks, BS)
    sched = Scheduler(KvManager(pool, prefix_caching=prefix_caching), max_seqs, budget, chunked_prefill=chunked)
    shadow = KvShadow(pool)
    seqs = [make_seq(f"s{i}", p, max_tokens=max_tokens) for i, p in enumerate(prompts)]
    for s in seqs:
        sched.add(s)
    preempted = 0
    for _ in range(2000):
        if not sched.has_work():
            break
        preempted += len(run_step(sched, shadow).preempted)
    assert not sched.has_work(), "scheduler made no progress"
    assert pool.stats.preemptions == preempted
    for s, p in zip(seqs, prompts, strict=True):
        assert s.status is Status.FINISHED and s.num_output == max_tokens and s.token_ids[:len(p)] == p
        # Fake sampling is deterministic, so preemption + recompute must not change the output.
        ref = list(p)
        for _ in range(max_tokens):
            ref.append(next_token(make_seq("x", ref)))
        assert s.token_ids == ref
    assert pool.num_used == 0
    drain_and_refill(pool)
