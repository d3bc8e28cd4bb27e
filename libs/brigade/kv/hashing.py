"""Chained block hashes: h_i = xxh3_64(seed, h_{i-1} || tokens_i || extra) over full blocks only."""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import xxhash

NO_PARENT = 0


def hash_block(parent: int, tokens: Sequence[int], extra: bytes = b"", seed: int = 0) -> int:
    """Hash one full block given its parent's hash (NO_PARENT for the first block)."""
    h = xxhash.xxh3_64(seed=seed)
    h.update(parent.to_bytes(8, "little"))
    h.update(array("q", tokens).tobytes())
    if extra:
        h.update(extra)
    return h.intdigest()


def hash_blocks(tokens: Sequence[int], block_size: int, parent: int = NO_PARENT, extra: bytes = b"",
                seed: int = 0) -> list[int]:
    """Hashes of every full block of `tokens`, chained from `parent`."""
    out: list[int] = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash_block(parent, tokens[start:start + block_size], extra, seed)
        out.append(parent)
    return out
