"""Port picking for `brigade up` beside another system and for tests: blocks of ports that are free, outside the
kernel's ephemeral range, and never handed out twice."""

from __future__ import annotations

import socket

from brigade.launcher import _ephemeral, free_ports


def test_blocks_are_bindable_outside_the_ephemeral_range_and_distinct() -> None:
    eph = _ephemeral()
    seen: set[int] = set()
    for _ in range(50):
        base = free_ports(8)
        block = set(range(base, base + 8))
        assert not block & seen, "a port was handed out twice"
        assert not any(p in eph for p in block) or len(eph) > 60000
        seen |= block
    listeners = []
    try:
        for port in range(base, base + 8):  # the last block can actually be listened on, all of it
            s = socket.socket()
            s.bind(("127.0.0.1", port))
            s.listen()
            listeners.append(s)
    finally:
        for s in listeners:
            s.close()
