"""Triton paged-attention decode kernel (split-KV "flash decoding", GQA-aware).

One query token per sequence attends over its paged KV cache:

* phase 1, grid ``(B, KVH, num_splits)``: a program owns every query head of one KV head (the GQA group, padded
  to 16 rows so the scores are one ``tl.dot``), so each K/V tile is loaded once per group rather than once per
  query head. It walks its split's share of the sequence in tiles of tokens, resolving each token's physical slot
  through the block table, and keeps an online softmax in fp32. With one split it writes the final output
  directly; otherwise it writes a normalised partial output and its log-sum-exp.
* phase 2, grid ``(B, H)``: merges the splits by log-sum-exp weighting.

Softmax runs in base 2 (``exp2``, with log2(e) folded into the scale) because that is the cheap instruction on GPUs.

Triton is optional and imported on first use, so importing this module never pulls it in. That matters for the
interpreter: ``import triton`` jits triton's own library (``tl.sum``, ``tl.max``, ``tl.cdiv``) in whichever mode
``TRITON_INTERPRET`` selects at that moment, so the variable must be set before the first ``import triton`` in the
process, and a kernel jitted in the other mode fails when it calls them. ``_kernels`` checks the two agree.
"""

from __future__ import annotations

import importlib.util
import math
import os
from functools import cache
from typing import Any

import torch

# Bound by _load_triton(); the kernel bodies resolve ``tl`` through these module globals when they run.
triton: Any = None
tl: Any = None

__all__ = ["available", "default_num_splits", "interpreter_mode", "paged_decode"]

_LOG2E = 1.4426950408889634
# Rows of the GQA group tile; tl.dot needs every dimension >= 16.
_MIN_DOT = 16
# Each split should keep at least this many tokens, otherwise the merge and launch overhead dominate.
_MIN_TOKENS_PER_SPLIT = 256
_MAX_SPLITS = 32


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _load_triton() -> Any:
    """Import triton on first use (see the module docstring for why not at import time)."""
    global triton, tl
    if triton is None:
        import triton as _triton
        import triton.language as _tl

        triton, tl = _triton, _tl
    return triton


def interpreter_mode() -> bool:
    """Whether this process's triton runs kernels in the CPU interpreter (imports triton).

    Decided by the library's own jitted functions, which froze the mode when triton was first imported.
    """
    _load_triton()
    return type(tl.sum).__name__ == "InterpretedFunction"


def available() -> bool:
    """True when triton is installed and kernels can run: a CUDA device, or TRITON_INTERPRET=1 for the CPU."""
    if importlib.util.find_spec("triton") is None:
        return False
    if torch.cuda.is_available():
        return True
    return interpreter_mode() if triton is not None else _env_interpret()


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _decode_split_kernel(
    Q, K, V, BT, CL, OUT, LSE,
    qk_scale,
    window,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_btb, stride_btn,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls,
    num_splits,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    DIRECT: tl.constexpr,
    DOT_FP32: tl.constexpr,
):  # fmt: skip
    """Phase 1: online softmax over one split of one sequence for all query heads of one KV head."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    offs_g = tl.arange(0, G_PAD)
    offs_n = tl.arange(0, TILE_N)
    offs_d = tl.arange(0, D_PAD)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g

    ctx = tl.load(CL + b)
    # Sliding window: keys [lo, ctx) only; the tiles before lo's are never visited and the block-table entries
    # before lo never loaded (their blocks may be back in the pool). `window` is huge when there is none.
    lo = tl.maximum(ctx - window, 0)
    first_tile = lo // TILE_N
    # Splits are cut per sequence in whole tiles, so every split of a long sequence gets work and a tile never
    # straddles two splits; short sequences simply leave their trailing splits empty.
    num_tiles = tl.cdiv(ctx, TILE_N)
    tiles_per_split = tl.cdiv(num_tiles - first_tile, num_splits)
    tile_lo = first_tile + split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    q_ptrs = Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], dtype=tl.float32)

    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_vh
    for tile in range(tile_lo, tile_hi):
        tok = tile * TILE_N + offs_n
        t_mask = (tok < ctx) & (tok >= lo)
        # The mask keeps block-table padding (which may hold garbage such as -1) from ever being read.
        blk = tl.load(BT + b * stride_btb + (tok // BLOCK_SIZE) * stride_btn, mask=t_mask, other=0)
        # int64: block id * block stride overflows int32 on large caches.
        blk = blk.to(tl.int64)
        slot = tok % BLOCK_SIZE
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(
            k_base + blk[:, None] * stride_kb + slot[:, None] * stride_kt + offs_d[None, :] * stride_kd,
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            v_base + blk[:, None] * stride_vb + slot[:, None] * stride_vt + offs_d[None, :] * stride_vd,
            mask=kv_mask,
            other=0.0,
        )
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        # ieee: fp32 inputs would otherwise silently run in tf32 on GPUs (~1e-3 error); no effect on fp16/bf16.
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        s = tl.where(t_mask[None, :], s, float("-inf"))
        # Each visited tile holds >= 1 valid token, so m_new is finite and no exp2(-inf - -inf) NaN can arise.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    nonempty = l_i > 0.0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    out_mask = g_mask[:, None] & d_mask[None, :]
    o_ptrs = OUT + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=out_mask)
    if not DIRECT:
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(LSE + b * stride_lb + heads * stride_lh + split * stride_ls, lse, mask=g_mask)


def _merge_splits_kernel(
    PART, LSE, OUT,
    stride_pb, stride_ph, stride_ps, stride_pd,
    stride_lb, stride_lh, stride_ls,
    stride_ob, stride_oh, stride_od,
    num_splits,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    S_PAD: tl.constexpr,
):  # fmt: skip
    """Phase 2: combine the per-split normalised outputs of one (sequence, head) by their log-sum-exp."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM

    lse = tl.load(LSE + b * stride_lb + h * stride_lh + offs_s * stride_ls, mask=s_mask, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    # All splits empty (context length 0): use 0 as the reference so the weights are exp2(-inf) = 0, not NaN.
    lse_ref = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w = tl.exp2(lse - lse_ref)
    w_sum = tl.sum(w, axis=0)
    part = tl.load(
        PART + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :] * stride_pd,
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    out = tl.sum(part * w[:, None], axis=0) / tl.where(w_sum > 0.0, w_sum, 1.0)
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_d * stride_od, out.to(OUT.dtype.element_ty), mask=d_mask)


@cache
def _kernels() -> tuple[Any, Any]:
    """Jit both kernels, in the mode triton's own library was jitted in when it was imported."""
    interpret = interpreter_mode()
    # triton.jit reads TRITON_INTERPRET now; a mismatch would make our kernel call library functions of the
    # other mode, which fails deep inside the launch with an obscure error.
    if bool(triton.knobs.runtime.interpret) != interpret:
        raise RuntimeError(
            "TRITON_INTERPRET changed after triton was imported; set it before the first `import triton` "
            f"(triton was imported with interpreter mode {'on' if interpret else 'off'})"
        )
    return triton.jit(_decode_split_kernel), triton.jit(_merge_splits_kernel)


@cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Splits per sequence: enough programs to fill the GPU twice over, but no split under ~256 tokens.

    ``max_context`` is an upper bound (the block-table width times the block size) so that choosing needs no
    device-to-host sync and stays fixed for a given shape (CUDA-graph friendly).
    """
    if device.type == "cuda":
        target_programs = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        # Interpreter: every program costs real CPU time, so only split when asked to.
        target_programs = 1
    by_occupancy = math.ceil(target_programs / max(1, batch * num_kv_heads))
    by_length = math.ceil(max(1, max_context) / _MIN_TOKENS_PER_SPLIT)
    return max(1, min(by_occupancy, by_length, _MAX_SPLITS))


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    window: int = 0,
) -> torch.Tensor:
    """Single-token attention over a paged KV cache.

    q: [B, H, D]; k_cache, v_cache: [num_blocks, block_size, KVH, D]; block_tables: int [B, max_blocks];
    context_lens: int [B] (0 for padded rows, which yield zeros). Query head h reads KV head h // (H // KVH).
    window > 0: each query sees only its last `window` keys (table entries before them are never read).
    Returns [B, H, D] in q's dtype, computed with fp32 softmax and accumulation.
    """
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"bad shapes: q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, kv_dim = k_cache.shape
    if kv_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"q {tuple(q.shape)} is incompatible with kv cache {tuple(k_cache.shape)}")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"dtype mismatch: q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {q.dtype}")
    if block_tables.shape[0] != batch or context_lens.shape != (batch,):
        raise ValueError("block_tables and context_lens must have one row per sequence")

    out = torch.empty_like(q)
    if batch == 0:
        return out
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    if num_splits is None:
        span = block_tables.shape[1] * block_size
        num_splits = default_num_splits(batch, num_kv_heads, min(span, window or span), q.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")

    split_kernel, merge_kernel = _kernels()
    interpret = interpreter_mode()
    if not interpret and q.device.type != "cuda":
        raise RuntimeError("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing triton")
    group = num_heads // num_kv_heads
    d_pad = max(_MIN_DOT, _next_pow2(head_dim))
    # Tokens are gathered one by one through the block table, so a tile may span several small blocks or part of
    # a large one: >= 32 tokens amortise the loop, <= 64 bounds registers (K and V tiles are TILE_N x D each).
    tile_n = min(max(32, block_size), 64)
    meta = dict(
        GROUP=group,
        G_PAD=max(_MIN_DOT, _next_pow2(group)),
        HEAD_DIM=head_dim,
        D_PAD=d_pad,
        BLOCK_SIZE=block_size,
        TILE_N=tile_n,
        # The interpreter's bf16 tl.dot is broken (garbage ~1e10), so upcast there; GPUs keep bf16 tensor cores.
        DOT_FP32=interpret and q.dtype == torch.bfloat16,
    )
    grid = (batch, num_kv_heads, num_splits)
    inputs = (q, k_cache, v_cache, block_tables, context_lens)
    # No window: one longer than any context, so the kernel has a single code path.
    window_arg = window if window > 0 else 1 << 30
    in_strides = (*q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride())
    qk_scale = float(scale) * _LOG2E

    if num_splits == 1:
        split_kernel[grid](
            *inputs, out, out, qk_scale, window_arg, *in_strides,
            out.stride(0), out.stride(1), 0, out.stride(2),
            0, 0, 0,  # no LSE in the one-split path (its pointer argument is a placeholder)
            1, DIRECT=True, **meta,
        )  # fmt: skip
        return out

    part = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
    lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
    split_kernel[grid](
        *inputs, part, lse, qk_scale, window_arg, *in_strides,
        *part.stride(), *lse.stride(),
        num_splits, DIRECT=False, **meta,
    )  # fmt: skip
    merge_kernel[(batch, num_heads)](
        part, lse, out,
        *part.stride(), *lse.stride(), *out.stride(),
        num_splits,
        HEAD_DIM=head_dim, D_PAD=d_pad, S_PAD=max(2, _next_pow2(num_splits)),
    )  # fmt: skip
    return out
