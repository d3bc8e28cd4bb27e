"""Ordering of one choice's TokenChunks at the gateway: lost chunks (a gap) and repeated ones (duplicates).

Workers number each request's chunks 1, 2, ... (TokenChunk.seq); a NATS reconnect can drop some on the way,
which the client would otherwise see as silently missing text. Pure logic, so it is tested on its own.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Order(enum.Enum):
    """What to do with a chunk."""

    NEXT = "next"  # in order (or not numbered): relay it
    DUPLICATE = "duplicate"  # seen already: drop it
    GAP = "gap"  # chunks before it were lost: replay the choice from what the client has


@dataclass
class ChunkOrder:
    """The last seq relayed for one request id; `reset()` when the choice moves to a new request id."""

    last: int = 0

    def check(self, seq: int) -> Order:
        """Classify a chunk by its seq, and advance past it when it is the next one."""
        if seq <= 0:  # not numbered (an error chunk, an older worker): nothing to check
            return Order.NEXT
        if seq <= self.last:
            return Order.DUPLICATE
        if seq != self.last + 1:
            return Order.GAP
        self.last = seq
        return Order.NEXT

    def reset(self) -> None:
        self.last = 0


def count_mismatch(completion_tokens: int, relayed: int) -> bool:
    """True when a final chunk's count of generated tokens differs from the tokens relayed for the choice.

    The worker's count is cumulative across replays (it includes the tokens it was resumed with); 0 means the
    worker did not count, so there is nothing to compare.
    """
    return completion_tokens > 0 and completion_tokens != relayed
