"""How many KV blocks an engine allocates: vLLM's rule of thumb for a CPU, written out.

An explicit `kv_cache_bytes` is the operator's budget: a budget that cannot hold one request of
`max_model_len` tokens refuses to start (vLLM does the same), since every long request would be refused.
Without one the cache holds `AUTO_REQUESTS` max-length requests, at least `AUTO_FLOOR_BYTES`, and at most
`AUTO_MEMORY_FRACTION` of the memory available now; where even one max-length request does not fit there,
`max_model_len` is lowered to what fits, with a warning.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

log = logging.getLogger("brigade.engine")

AUTO_REQUESTS = 4  # max-length requests the automatic cache holds at once
AUTO_FLOOR_BYTES = 256 << 20  # short-context models still get room for many requests and their prefixes
AUTO_MEMORY_FRACTION = 0.4  # of MemAvailable: the weights, activations and other processes need the rest


class KvSize(NamedTuple):
    num_blocks: int
    max_model_len: int


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable; total physical memory elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def kv_size(block_bytes: int, block_size: int, max_model_len: int, kv_cache_bytes: int = 0,
            memory: int | None = None) -> KvSize:
    """Blocks to allocate and the max_model_len they support; ValueError for a budget below one request.

    `block_bytes`: bytes of one block over all layers (K and V); `kv_cache_bytes` 0: size automatically
    against `memory` (default: what is available now)."""
    per_request = -(-max_model_len // block_size)  # blocks of one max-length request
    if kv_cache_bytes:
        blocks = max(1, kv_cache_bytes // block_bytes)
        if blocks < per_request:
            raise ValueError(
                f"a KV cache of {kv_cache_bytes / 2**20:.0f} MiB holds {blocks * block_size} tokens, fewer than one "
                f"request of max_model_len {max_model_len} needs ({per_request * block_bytes / 2**20:.0f} MiB): "
                "raise --kv-cache-memory or lower --max-model-len")
        return KvSize(blocks, max_model_len)
    want = max(AUTO_REQUESTS * per_request, AUTO_FLOOR_BYTES // block_bytes, 1)
    cap = int(AUTO_MEMORY_FRACTION * (available_memory() if memory is None else memory)) // block_bytes
    blocks = max(1, min(want, cap))
    if blocks >= per_request:
        return KvSize(blocks, max_model_len)
    fits = blocks * block_size
    log.warning("only %d KV tokens fit in %.0f%% of the available memory: max_model_len lowered from %d to %d",
                fits, 100 * AUTO_MEMORY_FRACTION, max_model_len, fits)
    return KvSize(blocks, fits)
