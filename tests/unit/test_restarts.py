"""When `brigade up` restarts a child that died, and when it gives up."""

from __future__ import annotations

from brigade.launcher import MAX_RESTARTS, RESTART_BACKOFF_S, RESTART_WINDOW_S, Restarts


def test_first_restart_is_immediate_then_the_delay_doubles() -> None:
    r = Restarts()
    assert r.due("decode-0", 100.0) == 0
    r.restarted("decode-0", 100.0)
    assert r.due("decode-0", 101.0) == RESTART_BACKOFF_S  # died again at 101: wait
    assert r.due("decode-0", 101.0 + RESTART_BACKOFF_S) == 0
    r.restarted("decode-0", 101.0 + RESTART_BACKOFF_S)
    assert r.due("decode-0", 103.0) == 2 * RESTART_BACKOFF_S
    assert r.due("router", 103.0) == 0  # each child has its own count


def test_a_child_that_keeps_dying_stops_the_stack_and_old_deaths_are_forgotten() -> None:
    r = Restarts()
    for i in range(MAX_RESTARTS):
        r.restarted("gateway", 10.0 + i)
    assert r.due("gateway", 20.0) is None
    assert r.due("gateway", 10.0 + MAX_RESTARTS + RESTART_WINDOW_S) == 0
