"""KV cache sizing: an explicit budget, the automatic one, and the max_model_len floor."""

from __future__ import annotations

import pytest

from brigade.engine.kv_size import AUTO_FLOOR_BYTES, AUTO_REQUESTS, kv_size

BLOCK = 16
BLOCK_BYTES = 1 << 20  # 1 MiB per block: 64 KiB per token
GiB = 1 << 30


def test_explicit_budget_is_kept_when_one_request_fits() -> None:
    assert kv_size(BLOCK_BYTES, BLOCK, 8192, kv_cache_bytes=1 * GiB) == (1024, 8192)


def test_explicit_budget_below_one_request_refuses_to_start() -> None:
    with pytest.raises(ValueError, match="fewer than one request of max_model_len 8192.*--kv-cache-memory"):
        kv_size(BLOCK_BYTES, BLOCK, 8192, kv_cache_bytes=256 << 20)


def test_automatic_size_holds_several_max_length_requests() -> None:
    blocks, max_len = kv_size(BLOCK_BYTES, BLOCK, 8192, memory=64 * GiB)
    assert (blocks, max_len) == (AUTO_REQUESTS * 8192 // BLOCK, 8192)
    # A short context still gets the floor, so many requests and their prefixes fit.
    assert kv_size(BLOCK_BYTES, BLOCK, 256, memory=64 * GiB).num_blocks == AUTO_FLOOR_BYTES // BLOCK_BYTES


def test_automatic_size_lowers_max_model_len_when_memory_is_short() -> None:
    blocks, max_len = kv_size(BLOCK_BYTES, BLOCK, 8192, memory=500 << 20)  # 40%: 200 blocks
    assert blocks == 200 and max_len == 200 * BLOCK
