"""Prefix registry and prefix-aware policy, without a network."""

from __future__ import annotations

from brigade.kv.hashing import hash_blocks
from brigade.protocol import WorkerStatus
from brigade.routing.fleet import Fleet
from brigade.routing.index import PrefixIndex
from brigade.routing.policy import Policy, PrefixCost, decide

BS = 16


def _status(wid: str, role: str = "decode", kv_used: int = 0, queued: int = 0) -> WorkerStatus:
    return WorkerStatus(wid, role, "m", BS, 0, kv_used=kv_used, kv_total=1000, prefill_queued=queued)


def _fleet(*statuses: WorkerStatus) -> Fleet:
    f = Fleet(3.0)
    for s in statuses:
        f.update(s, 0.0)
    return f


DOC = list(range(100, 100 + 8 * BS))  # 8 full blocks
H = hash_blocks(DOC, BS, extra=b"m")


def test_longest_prefix_match_per_worker() -> None:
    idx = PrefixIndex()
    idx.apply("a", 0, [["stored", H[:8], None]])
    idx.apply("b", 0, [["stored", H[:3], None]])
    idx.apply("c", 0, [["stored", H[1:5], None]])  # no first block: no usable prefix
    assert idx.overlap(H, ["a", "b", "c", "d"]) == {"a": 8, "b": 3, "c": 0, "d": 0}
    other = hash_blocks([7] * BS + DOC[BS:], BS, extra=b"m")  # differs in block 0: every hash differs
    assert idx.overlap(other, ["a", "b"]) == {"a": 0, "b": 0}


def test_removed_cleared_and_purge() -> None:
    idx = PrefixIndex()
    assert idx.apply("a", 0, [["stored", H[:4], None]])
    assert idx.apply("a", 1, [["removed", [H[2]], None]])
    assert idx.overlap(H, ["a"]) == {"a": 2}
    assert idx.apply("a", 2, [["cleared", [], None]])
    assert idx.overlap(H, ["a"]) == {"a": 0} and len(idx) == 0
    idx.apply("b", 0, [["stored", H[:4], None]])
    idx.purge("b")
    assert len(idx) == 0 and "b" not in idx.by_worker


def test_bounded_registry_evicts_least_recently_touched() -> None:
    idx = PrefixIndex(capacity=4)
    idx.apply("a", 0, [["stored", H[:4], None]])
    idx.overlap(H[:1], ["a"])  # touch block 0: now the most recent
    idx.apply("a", 1, [["stored", H[4:6], None]])
    assert len(idx) == 4 and idx.evictions == 2
    assert H[0] in idx.blocks and H[1] not in idx.blocks and H[2] not in idx.blocks


def test_event_gaps_and_dumps() -> None:
    idx = PrefixIndex()
    assert idx.apply("a", 0, [["stored", H[:2], None]])  # a fresh worker's first batch: in sync
    assert not idx.apply("a", 2, [["stored", H[2:3], None]])  # batch 1 was lost
    assert idx.events["a"].gaps == 1 and idx.needs_dump("a")
    idx.load_dump("a", 2, H[:5])
    assert not idx.needs_dump("a") and idx.overlap(H, ["a"]) == {"a": 5}
    assert idx.apply("a", 2, [["removed", H[:5], None]])  # a replay of an old batch is ignored
    assert idx.overlap(H, ["a"]) == {"a": 5}
    # Joining a worker's stream midway (router restart) needs a dump too.
    assert not idx.apply("b", 17, [["stored", H[:1], None]])


def test_prefix_wins_then_spills_under_load() -> None:
    idx = PrefixIndex()
    idx.apply("a", 0, [["stored", H, None]])
    policy = Policy("prefix", PrefixCost(BS))
    prompt = len(DOC) + 20
    d = decide(_fleet(_status("a"), _status("b")), policy, prompt, 64, 0.0, hashes=H, index=idx)
    assert d is not None and d.worker == "a" and d.cached_blocks == 8
    # a is busy beyond what the cached prefix saves (8 blocks of prefill): the request spills to b.
    busy = _fleet(_status("a", kv_used=50), _status("b"))
    d = decide(busy, policy, prompt, 64, 0.0, hashes=H, index=idx)
    assert d is not None and d.worker == "b" and d.cached_blocks == 0
    # ...but a little load does not outweigh the prefix.
    light = _fleet(_status("a", kv_used=5), _status("b"))
    assert decide(light, policy, prompt, 64, 0.0, hashes=H, index=idx).worker == "a"  # type: ignore[union-attr]


def test_ties_break_by_cache_then_id_and_booking_spreads_new_prefixes() -> None:
    idx = PrefixIndex()
    fleet = _fleet(_status("b"), _status("a"), _status("c"))
    policy = Policy("prefix", PrefixCost(BS))
    picks = []
    for i in range(3):
        hashes = hash_blocks([i] * 64, BS, extra=b"m")
        d = decide(fleet, policy, 64, 64, 0.0, hashes=hashes, index=idx)
        assert d is not None
        fleet.book(d.worker, 64, 4)
        picks.append(d.worker)
    assert picks == ["a", "b", "c"]  # equal costs: lowest id; booked load moves the next one on


def test_recent_decisions_steer_siblings_before_events() -> None:
    idx = PrefixIndex()
    fleet = _fleet(_status("a"), _status("b"))
    policy = Policy("prefix", PrefixCost(BS))
    d1 = decide(fleet, policy, len(DOC), 64, 0.0, hashes=H, index=idx)
    assert d1 is not None
    fleet.book(d1.worker, len(DOC), 8)
    idx.remember(H, d1.worker, ttl=2.0, now=0.0)
    d2 = decide(fleet, policy, len(DOC), 64, 0.5, hashes=H, index=idx)
    assert d2 is not None and d2.worker == d1.worker and d2.cached_blocks == 8
    d3 = decide(fleet, policy, len(DOC), 64, 2.5, hashes=H, index=idx)  # expired: back to load only
    assert d3 is not None and d3.worker != d1.worker


def test_temperature_samples_but_prefers_low_cost() -> None:
    idx = PrefixIndex()
    idx.apply("a", 0, [["stored", H, None]])
    fleet = _fleet(_status("a"), _status("b"))
    policy = Policy("prefix", PrefixCost(BS, temperature=8.0), seed=1)
    picks = [decide(fleet, policy, len(DOC), 64, 0.0, hashes=H, index=idx).worker for _ in range(200)]  # type: ignore[union-attr]
    assert 150 < picks.count("a") < 200  # mostly the cached worker, sometimes the other


def test_disaggregated_prefill_by_prefix_decode_by_load() -> None:
    idx = PrefixIndex()
    idx.apply("p1", 0, [["stored", H, None]])
    fleet = _fleet(_status("p0", "prefill"), _status("p1", "prefill"), _status("d0", kv_used=9), _status("d1"))
    policy = Policy("prefix", PrefixCost(BS))
    d = decide(fleet, policy, len(DOC) + 100, 64, 0.0, hashes=H, index=idx)
    assert d is not None and d.worker == "p1" and d.decode == "d1"
    # A prompt mostly cached on a decode worker runs there (its uncached part is under the threshold).
    idx.apply("d0", 0, [["stored", H, None]])
    fleet.update(_status("d0", kv_used=2), 0.0)
    d = decide(fleet, policy, len(DOC) + 10, 64, 0.0, hashes=H, index=idx)
    assert d is not None and d.decode is None and d.worker == "d0"
