"""Paged attention behind one small interface: a torch reference path, a native CPU path that reads blocks in
place (float32), and a Triton decode path (GPU).

A step's tokens are laid out decode-first: tokens [0, num_decode) are one query each from running
sequences; then each prefill chunk is a contiguous run. Every token's K/V is written into the paged
cache (flattened to [slots, kv_heads, head_dim]) before attention reads it.

Sliding window (`window=w` per call, 0 for none): a query at position p sees keys j with p - w < j <= p, as
transformers' Mistral mask does. The keys before a query's window are never read: when every layer slides, the
engine returns blocks that left every window to the pool and leaves a placeholder id in their table entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    slots: torch.Tensor | None  # [ctx_len - k_start] cache slots of keys k_start...; None: no cached prefix
    mask: torch.Tensor | None  # [q_len, ctx_len - k_start] bool, causal with offset; None when slots is None
    k_start: int = 0  # position of slots[0]: earlier keys left every window (their blocks may be freed)
    windowed: dict[int, tuple[int, torch.Tensor]] = field(default_factory=dict, repr=False)  # window: (lo, mask)


@dataclass
class DecodeGroup:
    """Decode queries [start, end) of similar context length, gathered and padded together."""

    start: int
    end: int
    blocks: torch.Tensor  # [n, max_blocks] int64 block ids (padding points at block 0)
    mask: torch.Tensor  # [n, 1, 1, max_blocks * block_size] bool
    lens: torch.Tensor | None = None  # [n] int64 context lengths (None: counted from mask)
    windowed: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)


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
    `decode_groups` (which only the torch path uses). `window`: sliding-window size (0: full causal attention).
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
        *,
        window: int = 0,
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
                      v_cache: torch.Tensor, meta: AttnMeta, scale: float, out: torch.Tensor,
                      window: int = 0) -> None:
    """Causal (sliding-window when `window`) attention for each prefill chunk, over its cached prefix if any."""
    for p in meta.prefills:
        end = p.q_start + p.q_len
        qs = q[p.q_start:end].transpose(0, 1)
        if p.slots is None:
            ks, vs = k[p.q_start:end].transpose(0, 1), v[p.q_start:end].transpose(0, 1)
            if window and p.q_len > window:
                o = _sdpa(qs, ks, vs, attn_mask=_fresh_mask(p, window, q.device), scale=scale)
            else:  # the flash path: plain causal when the whole chunk fits in the window
                o = _sdpa(qs, ks, vs, is_causal=True, scale=scale)
        else:
            lo, mask = _span_mask(p, window)
            slots = p.slots[lo:] if lo else p.slots
            ks, vs = k_cache[slots].transpose(0, 1), v_cache[slots].transpose(0, 1)
            o = _sdpa(qs, ks, vs, attn_mask=mask, scale=scale)
        out[p.q_start:end] = o.transpose(0, 1)


def _fresh_mask(p: PrefillSpan, window: int, device: torch.device) -> torch.Tensor:
    """[L, L] sliding-window causal mask of a chunk that starts at position 0 (built once per step)."""
    if window not in p.windowed:
        i = torch.arange(p.q_len, device=device)
        d = i[:, None] - i[None, :]
        p.windowed[window] = (0, (d >= 0) & (d < window))
    return p.windowed[window][1]


def _span_mask(p: PrefillSpan, window: int) -> tuple[int, torch.Tensor]:
    """(first slot index to read, mask over the keys from there) of a chunk over a cached prefix."""
    assert p.mask is not None
    first_q = p.ctx_len - p.q_len  # position of the chunk's first query
    if not window:
        # The runner drops keys before k_start only for a model whose every layer slides.
        assert not p.k_start, "keys before k_start were dropped but this layer attends to all"
        return 0, p.mask
    if p.ctx_len - p.k_start <= window:  # every key is inside every query's window: causal alone decides
        return 0, p.mask
    if window not in p.windowed:
        lo = max(0, first_q - window + 1 - p.k_start)
        key_pos = torch.arange(p.k_start + lo, p.ctx_len, device=p.mask.device)
        q_pos = torch.arange(first_q, p.ctx_len, device=p.mask.device)
        p.windowed[window] = (lo, p.mask[:, lo:] & (key_pos[None, :] > q_pos[:, None] - window))
    return p.windowed[window]


def decode_group(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: DecodeGroup,
                 scale: float, window: int = 0) -> torch.Tensor:
    """One query per sequence over its paged context: q [n, H, D] -> [n, H, D].

    Whole blocks are gathered with one `index_select` (contiguous block_size x KVH x D rows: far
    faster than per-slot indexing), keeping the cache's [token, kv_head, dim] order. Scores then come
    from a single batched matmul against all KV heads at once, with each query head's vector placed in
    its own KV head's columns (zeros elsewhere): twice the tiny attention FLOPs for GQA-2, but no
    transposed copy of the gathered K/V, which is what dominates on a CPU.

    With a window, only the blocks each row's window touches are gathered (see `_window_view`).
    """
    blocks, mask = _window_view(g, window) if window else (g.blocks, g.mask)
    n, nb = blocks.shape
    _, kvh, d = k_cache.shape
    h = q.shape[1]
    group = h // kvh
    length = mask.shape[-1]
    idx = blocks.reshape(-1)
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
    s.masked_fill_(~mask.view(n, 1, length), float("-inf"))
    o = torch.bmm(torch.softmax(s, dim=-1), vs)  # [n, H, KVH*D]
    if kvh == 1:
        return o
    o = o.view(n, kvh, group, kvh, d)
    return torch.stack([o[:, j, :, j] for j in range(kvh)], dim=1).view(n, h, d)


def _window_view(g: DecodeGroup, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks [n, W], mask [n, 1, 1, W * block_size]) covering each row's last `window` keys.

    Row r's columns start at the block holding its first visible key, so table entries of blocks that left the
    window (placeholders once freed) are never gathered; columns past a row's table read block 0, masked.
    """
    if window in g.windowed:
        return g.windowed[window]
    n, nb = g.blocks.shape
    bs = g.mask.shape[-1] // nb
    lens = g.lens if g.lens is not None else g.mask.view(n, -1).sum(-1)
    width = min(nb, -(-window // bs) + 1)  # blocks that `window` consecutive positions can touch
    if width == nb and int(lens.max()) <= window:
        view = g.blocks, g.mask  # every key of every row is in its window
    else:
        lo = (lens - window).clamp(min=0)  # first visible key of each row
        cols = (lo // bs)[:, None] + torch.arange(width, device=lens.device)  # [n, W]
        padded = torch.cat([g.blocks, g.blocks.new_zeros(n, width)], dim=1)
        pos = (cols[:, :, None] * bs + torch.arange(bs, device=lens.device)).view(n, width * bs)
        valid = (pos >= lo[:, None]) & (pos < lens[:, None])
        view = padded.gather(1, cols), valid[:, None, None, :]
    g.windowed[window] = view
    return view


class TorchAttention:
    """Gathers decode sequences' pages into padded groups of similar length: the reference path."""

    reads_tables = False

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: AttnMeta, scale: float, *, window: int = 0) -> torch.Tensor:
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        for g in meta.decode_groups:
            out[g.start:g.end] = decode_group(q[g.start:g.end], k_cache, v_cache, g, scale, window)
        prefill_attention(q, k, v, k_cache, v_cache, meta, scale, out, window)
        return out


class NativeAttention:
    """The native CPU kernel for decode tokens (K/V rows read where they lie in the paged cache, no gathered
    copy); prefill chunks as in torch. Float32 only: `make_attention` picks it for float32 CPU models."""

    reads_tables = True

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: AttnMeta, scale: float, *, window: int = 0) -> torch.Tensor:
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        nd = meta.num_decode
        if nd:
            assert meta.block_tables is not None and meta.context_lens is not None
            decoded = native.paged_decode_attention(q[:nd].contiguous(), k_cache, v_cache, meta.block_tables,
                                                    meta.context_lens, self.block_size, scale, window)
            if not meta.prefills:  # a pure decode step: the kernel's output is the whole answer
                return decoded
        out = torch.empty_like(q)
        if nd:
            out[:nd] = decoded
        prefill_attention(q, k, v, k_cache, v_cache, meta, scale, out, window)
        return out


class TritonAttention:
    """Triton paged decode kernel (split-KV, GQA) for decode tokens; prefill chunks as in torch."""

    reads_tables = True

    def __init__(self, block_size: int) -> None:
        from brigade.kernels import triton_attention

        self.block_size = block_size
        self.kernel = triton_attention.paged_decode

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: AttnMeta, scale: float, *, window: int = 0) -> torch.Tensor:
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decode
        if nd:
            assert meta.block_tables is not None and meta.context_lens is not None
            shape = (-1, self.block_size, *k_cache.shape[1:])
            out[:nd] = self.kernel(q[:nd], k_cache.view(shape), v_cache.view(shape), meta.block_tables,
                                   meta.context_lens, scale, window=window)
        prefill_attention(q, k, v, k_cache, v_cache, meta, scale, out, window)
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
