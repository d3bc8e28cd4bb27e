"""The gateway's check of one choice's chunk order: next, duplicate, gap; and the final token count."""

from __future__ import annotations

from brigade.stream_order import ChunkOrder, Order, count_mismatch


def test_in_order_chunks_advance() -> None:
    order = ChunkOrder()
    assert [order.check(s) for s in (1, 2, 3)] == [Order.NEXT] * 3
    assert order.last == 3


def test_repeated_chunks_are_duplicates_and_do_not_move_back() -> None:
    order = ChunkOrder()
    order.check(1)
    order.check(2)
    assert order.check(2) is Order.DUPLICATE and order.check(1) is Order.DUPLICATE
    assert order.last == 2 and order.check(3) is Order.NEXT


def test_a_jump_is_a_gap_and_is_not_taken() -> None:
    order = ChunkOrder()
    order.check(1)
    assert order.check(3) is Order.GAP
    assert order.last == 1  # the choice is replayed: nothing after the gap counts as seen
    assert ChunkOrder().check(2) is Order.GAP  # the first chunk itself lost


def test_a_handed_off_request_continues_and_a_replay_starts_over() -> None:
    order = ChunkOrder()
    assert [order.check(s) for s in (1, 2, 3)] == [Order.NEXT] * 3  # prefill's 1, then the decode worker's 2, 3
    order.reset()  # replayed under a new request id
    assert order.check(1) is Order.NEXT


def test_unnumbered_chunks_pass_unchecked() -> None:
    order = ChunkOrder()
    assert order.check(0) is Order.NEXT and order.check(0) is Order.NEXT
    assert order.last == 0 and order.check(1) is Order.NEXT


def test_count_mismatch() -> None:
    assert not count_mismatch(5, 5)
    assert count_mismatch(5, 4) and count_mismatch(4, 5)
    assert not count_mismatch(0, 3)  # the worker did not count
