"""Paged attention behind one small interface: a torch path (CPU) and a Triton decode path (GPU).

A step's tokens are laid out decode-first: tokens [0, num_decode) are one query each from running
sequences; then each prefill chunk is a contiguous run. Every token's K/V is written into the paged
cache (flattened to [slots, kv_heads, head_dim]) before attention reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class PrefillSpan:
    """One sequence's prefill chunk: queries [q_start, q_start+q_len) over ctx_len keys."""

    q_start: int
    q_len: int
    ctx_len: int
    slots: torch.Tensor | None  # [ctx_len] cache slots of the whole context; None: no cached prefix
    mask: torch.Tensor | None  # [q_len, ctx_len] bool, causal with offset; None when slots is None


@dataclass
class DecodeGroup:
    """Decode queries [start, end) of similar context length, gathered and padded together."""

    start: int
    end: int
    blocks: torch.Tensor  # [n, max_blocks] int64 block ids (padding points at block 0)
    mask: torch.Tensor  # [n, 1, 1, max_blocks * block_size] bool


@dataclass
class AttnMeta:
    """Where this step's K/V go and what each query attends to (shared by every layer)."""

    slot_mapping: torch.Tensor  # [T] int64
    num_decode: int
    decode_groups: list[DecodeGroup]  # for the torch path
    block_tables: torch.Tensor | None  # [nd, max_blocks] int32, for kernels that walk the table
    context_lens: torch.Tensor | None  # [nd] int32
    prefills: list[PrefillSpan]


class Attention(Protocol):
    """Writes this step's K/V into the layer's cache and returns attention output [T, H, D]."""

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttnMeta,
        scale: float,
    ) -> torch.Tensor: ...


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> torch.Tensor:
    """SDPA with grouped-query heads: q [.., H, L, D], k/v [.., KVH, S, D] (no repeated K/V copies)."""
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[-3] != k.shape[-3], **kw)  # type: ignore[arg-type]


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """Scatter this step's keys and values into their cache slots."""
    k_cache.index_copy_(0, slots, k)
    v_cache.index_copy_(0, slots, v)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, meta: AttnMeta, scale: float, out: torch.Tensor) -> None:
    """Causal attention for each prefill chunk, over its cached prefix when it has one."""
    for p in meta.prefills:
        end = p.q_start + p.q_len
        qs = q[p.q_start:end].transpose(0, 1)
        if p.slots is None:
            ks, vs = k[p.q_start:end].transpose(0, 1), v[p.q_start:end].transpose(0, 1)
            o = _sdpa(qs, ks, vs, is_causal=True, scale=scale)
        else:
            ks, vs = k_cache[p.slots].transpose(0, 1), v_cache[p.slots].transpose(0, 1)
            o = _sdpa(qs, ks, vs, attn_mask=p.mask, scale=scale)
        out[p.q_start:end] = o.transpose(0, 1)


def decode_group(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: DecodeGroup,
                 scale: float) -> torch.Tensor:
    """One query per sequence over its paged context: q [n, H, D] -> [n, H, D].

    Whole blocks are gathered with one `index_select` (contiguous block_size x KVH x D rows: far
    faster than per-slot indexing), keeping the cache's [token, kv_head, dim] order. Scores then come
    from a single batched matmul against all KV heads at once, with each query head's vector placed in
    its own KV head's columns (zeros elsewhere): twice the tiny attention FLOPs for GQA-2, but no
    transposed copy of the gathered K/V, which is what dominates on a CPU.
    """
    n, nb = g.blocks.shape
    _, kvh, d = k_cache.shape
    h = q.shape[1]
    group = h // kvh
    length = g.mask.shape[-1]
    idx = g.blocks.reshape(-1)
    ks = k_cache.view(-1, length // nb * kvh * d).index_select(0, idx).view(n, length, kvh * d)
    vs = v_cache.view(-1, length // nb * kvh * d).index_select(0, idx).view(n, length, kvh * d)
    if kvh == 1:
        qb = q * scale
    else:
        qb = q.new_zeros(n, kvh, group, kvh, d)
        qv = q.view(n, kvh, group, d) * scale
        for j in range(kvh):
            qb[:, j, :, j] = qv[:, j]
    s = torch.bmm(qb.view(n, h, kvh * d), ks.transpose(1, 2))  # [n, H, L]
    s.masked_fill_(~g.mask.view(n, 1, length), float("-inf"))
    o = torch.bmm(torch.softmax(s, dim=-1), vs)  # [n, H, KVH*D]
    if kvh == 1:
        return o
    o = o.view(n, kvh, group, kvh, d)
    return torch.stack([o[:, j, :, j] for j in range(kvh)], dim=1).view(n, h, d)


class TorchAttention:
    """Gathers decode sequences' pages into padded groups of similar length and runs SDPA; CPU default."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: AttnMeta, scale: float) -> torch.Tensor:
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        for g in meta.decode_groups:
            out[g.start:g.end] = decode_group(q[g.start:g.end], k_cache, v_cache, g, scale)
        prefill_attention(q, k, v, k_cache, v_cache, meta, scale, out)
        return out


class TritonAttention:
    """Triton paged decode kernel (split-KV, GQA) for decode tokens; prefill chunks as in torch."""

    def __init__(self, block_size: int) -> None:
        from brigade.kernels import triton_attention

        self.block_size = block_size
        self.kernel = triton_attention.paged_decode

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: AttnMeta, scale: float) -> torch.Tensor:
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decode
        if nd:
            assert meta.block_tables is not None and meta.context_lens is not None
            shape = (-1, self.block_size, *k_cache.shape[1:])
            out[:nd] = self.kernel(q[:nd], k_cache.view(shape), v_cache.view(shape), meta.block_tables,
                                   meta.context_lens, scale)
        prefill_attention(q, k, v, k_cache, v_cache, meta, scale, out)
        return out


def make_attention(name: str, block_size: int, device: str = "cpu") -> Attention:
    """`torch`, `triton`, or `auto` (Triton on a CUDA device when it imports, torch otherwise)."""
    if name == "auto":
        name = "triton" if device.startswith("cuda") and _triton_ok() else "torch"
    if name == "torch":
        return TorchAttention()
    if name == "triton":
        return TritonAttention(block_size)
    raise ValueError(f"unknown attention backend {name!r} (torch, triton, auto)")


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
