"""Paged attention behind one small interface: a torch reference path, a native CPU path that reads blocks in
place (float32), and a Triton decode path (GPU).

A step's tokens are laid out decode-first: tokens [0, num_decode) are one query each from running
sequences; then each prefill chunk is a contiguous run. Every token's K/V is written into the paged
cache (flattened to [slots, kv_heads, head_dim]) before attention reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from brigade.kernels import native


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
    """Writes this step's K/V into the layer's cache and returns attention output [T, H, D].

    `reads_tables`: decode queries read `block_tables`/`context_lens`, so the runner need not build the padded
    `decode_groups` (which only the torch path uses).
    """

    reads_tables: bool

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
    """SDPA for one sequence, q [H, L, D] over k/v [KVH, S, D] (grouped-query heads).

    Called with a batch dimension and K/V heads repeated: on the CPU that takes torch's flash kernel, while 3-D
    inputs or `enable_gqa` fall back to the math path, measured 3x slower for 512-2048-token prefills here.
    """
    if q.shape[-3] != k.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], **kw)[0]  # type: ignore[arg-type]


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
    """Gathers decode sequences' pages into padded groups of similar length: the reference path."""

    reads_tables = False

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: AttnMeta, scale: float) -> torch.Tensor:
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        for g in meta.decode_groups:
            out[g.start:g.end] = decode_group(q[g.start:g.end], k_cache, v_cache, g, scale)
        prefill_attention(q, k, v, k_cache, v_cache, meta, scale, out)
        return out


class NativeAttention:
    """The native CPU kernel for decode tokens (K/V rows read where they lie in the paged cache, no gathered
    copy); prefill chunks as in torch. Float32 only: `make_attention` picks it for float32 CPU models."""

    reads_tables = True

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: AttnMeta, scale: float) -> torch.Tensor:
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        nd = meta.num_decode
        if nd:
            assert meta.block_tables is not None and meta.context_lens is not None
            decoded = native.paged_decode_attention(q[:nd].contiguous(), k_cache, v_cache, meta.block_tables,
                                                    meta.context_lens, self.block_size, scale)
            if not meta.prefills:  # a pure decode step: the kernel's output is the whole answer
                return decoded
        out = torch.empty_like(q)
        if nd:
            out[:nd] = decoded
        prefill_attention(q, k, v, k_cache, v_cache, meta, scale, out)
        return out


class TritonAttention:
    """Triton paged decode kernel (split-KV, GQA) for decode tokens; prefill chunks as in torch."""

    reads_tables = True

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


def make_attention(name: str, block_size: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Attention:
    """`torch`, `native`, `triton`, or `auto`: Triton on a CUDA device when it imports; native on the CPU in
    float32 when the kernels build; torch otherwise."""
    if name == "auto":
        if device.startswith("cuda"):
            name = "triton" if _triton_ok() else "torch"
        else:
            name = "native" if dtype == torch.float32 and _native_ok() else "torch"
    if name == "torch":
        return TorchAttention()
    if name == "native":
        if dtype != torch.float32 or not device.startswith("cpu"):
            raise ValueError("the native attention kernel runs float32 on the CPU")
        if not _native_ok():
            raise ValueError("the native attention kernel could not be built (see the log)")
        return NativeAttention(block_size)
    if name == "triton":
        return TritonAttention(block_size)
    raise ValueError(f"unknown attention backend {name!r} (torch, native, triton, auto)")


def _native_ok() -> bool:
    return native.available()


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
