"""KV cache contents for transfer tests: reproducible random caches and exact byte views."""

from __future__ import annotations

import torch

from brigade.kv.transfer import KvLayout

SENTINEL = -7.0  # what a receiver's untouched blocks hold


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes, so comparisons are exact (no 0.0 == -0.0, no NaN issues)."""
    return t.contiguous().view(torch.uint8)


def pattern(layout: KvLayout, num_blocks: int, seed: int) -> torch.Tensor:
    """A cache in runner shape with reproducible random contents."""
    g = torch.Generator().manual_seed(seed)
    shape = (layout.layers, 2, num_blocks * layout.block_size, layout.kv_heads, layout.head_dim)
    return torch.randn(shape, generator=g).to(layout.torch_dtype)
