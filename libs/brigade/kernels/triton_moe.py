"""Fused MoE in Triton: a grouped GEMM over the step's (token, expert) assignments sorted by expert.

The assignments are sorted by expert and each expert's run is padded to a multiple of BLOCK_M, so every
row block belongs to one expert (vLLM's "align block size" trick). Two launches:

* gate/up, grid ``(row_blocks, cdiv(I, BLOCK_N))``: gathers the block's token rows of x, multiplies them by
  the expert's gate and up tiles in one K loop (two fp32 accumulators) and stores ``silu(gate) * up``;
* down, grid ``(row_blocks, cdiv(h, BLOCK_N))``: multiplies that by the expert's down projection and scales
  each row by its gate weight.

Rows are then summed into their tokens with `index_add_` (k rows per token; deterministic, no atomics).
Triton is imported on first use, like `triton_attention`, so the interpreter mode is fixed by whoever
imports it first (tests set ``TRITON_INTERPRET=1`` on machines without a GPU).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

from brigade.kernels import triton_attention
from brigade.kernels.moe import flatten_routes

triton: Any = None
tl: Any = None

__all__ = ["TritonExperts", "available", "fused_moe"]

_MIN_DOT = 16  # tl.dot needs every dimension >= 16


def available() -> bool:
    return triton_attention.available()


def _load() -> None:
    global triton, tl
    if triton is None:
        import triton as _triton
        import triton.language as _tl

        triton, tl = _triton, _tl


def _gate_up_kernel(
    X, W, OUT, ROW_TOK, BLOCK_SLOT,
    H, INTER,
    stride_xt, stride_xh,
    stride_we, stride_wn, stride_wh,
    stride_om, stride_oi,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
):  # fmt: skip
    """OUT[rows, n-tile] = silu(x[tok] @ W_gate^T) * (x[tok] @ W_up^T) for one expert's row block."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(BLOCK_SLOT + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = tl.load(ROW_TOK + offs_m)
    valid = tok >= 0
    tok = tl.where(valid, tok, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < INTER
    offs_k = tl.arange(0, BLOCK_K)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_base = W + slot * stride_we
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < H
        a = tl.load(X + tok[:, None] * stride_xt + kk[None, :] * stride_xh,
                    mask=valid[:, None] & k_mask[None, :], other=0.0)
        wmask = k_mask[:, None] & n_mask[None, :]
        wg = tl.load(w_base + offs_n[None, :] * stride_wn + kk[:, None] * stride_wh, mask=wmask, other=0.0)
        wu = tl.load(w_base + (offs_n + INTER)[None, :] * stride_wn + kk[:, None] * stride_wh, mask=wmask, other=0.0)
        if DOT_FP32:
            a, wg, wu = a.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
        # ieee: fp32 inputs would otherwise run in tf32 on GPUs; no effect on fp16/bf16.
        acc_g += tl.dot(a, wg, input_precision="ieee")
        acc_u += tl.dot(a, wu, input_precision="ieee")
    act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(OUT + offs_m[:, None] * stride_om + offs_n[None, :] * stride_oi, act.to(OUT.dtype.element_ty),
             mask=valid[:, None] & n_mask[None, :])


def _down_kernel(
    A, W, OUT, ROW_TOK, ROW_W, BLOCK_SLOT,
    H, INTER,
    stride_am, stride_ai,
    stride_we, stride_wh, stride_wi,
    stride_om, stride_oh,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
):  # fmt: skip
    """OUT[rows, n-tile] = (A[rows] @ W_down^T) * gate weight of each row, for one expert's row block."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(BLOCK_SLOT + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = tl.load(ROW_TOK + offs_m) >= 0
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_base = W + slot * stride_we
    for k0 in range(0, INTER, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < INTER
        a = tl.load(A + offs_m[:, None] * stride_am + kk[None, :] * stride_ai,
                    mask=valid[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_base + offs_n[None, :] * stride_wh + kk[:, None] * stride_wi,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_FP32:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc += tl.dot(a, w, input_precision="ieee")
    # The torch path rounds the expert output to the activation dtype before scaling: do the same.
    y = acc.to(OUT.dtype.element_ty).to(tl.float32)
    gw = tl.load(ROW_W + offs_m, mask=valid, other=0.0).to(tl.float32)
    out = (y * gw[:, None]).to(OUT.dtype.element_ty)
    tl.store(OUT + offs_m[:, None] * stride_om + offs_n[None, :] * stride_oh, out,
             mask=valid[:, None] & n_mask[None, :])


@cache
def _kernels() -> tuple[Any, Any]:
    """Jit both kernels in the mode triton's own library was jitted in (see triton_attention)."""
    interpret = triton_attention.interpreter_mode()
    _load()
    if bool(triton.knobs.runtime.interpret) != interpret:
        raise RuntimeError("TRITON_INTERPRET changed after triton was imported; set it before the first import")
    return triton.jit(_gate_up_kernel), triton.jit(_down_kernel)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def align(expert: torch.Tensor, slot_of: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort assignments by weight slot, pad each slot's run to a multiple of block_m.

    Returns (row_assign [P]: assignment index per padded row, -1 for padding; block_slot [P / block_m]).
    Assignments whose expert has no slot (slot_of = -1) are dropped.
    """
    slot = slot_of[expert]
    keep = (slot >= 0).nonzero().squeeze(1)
    order = keep[torch.argsort(slot[keep], stable=True)]
    counts = torch.bincount(slot[order], minlength=int(slot_of.max().item()) + 1).tolist()
    rows, blocks, start = [], [], 0
    for s, c in enumerate(counts):
        if c == 0:
            continue
        nb = -(-c // block_m)
        seg = torch.full((nb * block_m,), -1, dtype=torch.int64, device=expert.device)
        seg[:c] = order[start:start + c]
        rows.append(seg)
        blocks += [s] * nb
        start += c
    if not rows:
        return torch.empty(0, dtype=torch.int64, device=expert.device), torch.empty(0, dtype=torch.int32)
    return torch.cat(rows), torch.tensor(blocks, dtype=torch.int32, device=expert.device)


def fused_moe(x: torch.Tensor, tok: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor,
              gate_up: torch.Tensor, down: torch.Tensor, expert_ids: list[int] | None = None,
              block_m: int | None = None) -> torch.Tensor:
    """Same contract as `moe.run_assignments`, as two Triton launches."""
    num_tokens, hidden = x.shape
    inter = down.shape[2]
    out = torch.zeros_like(x)
    if expert.numel() == 0:
        return out
    gate_up_kernel, down_kernel = _kernels()
    interpret = triton_attention.interpreter_mode()
    if not interpret and x.device.type != "cuda":
        raise RuntimeError("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing triton")
    num_global = int(expert.max().item()) + 1
    local = list(range(gate_up.shape[0])) if expert_ids is None else list(expert_ids)
    slot_of = torch.full((max(num_global, max(local) + 1),), -1, dtype=torch.int64, device=x.device)
    slot_of[torch.tensor(local, device=x.device)] = torch.arange(len(local), device=x.device)
    bm = block_m or (_MIN_DOT if interpret else 64)
    row_assign, block_slot = align(expert.long(), slot_of, bm)
    if row_assign.numel() == 0:
        return out
    valid = row_assign >= 0
    safe = row_assign.clamp(min=0)
    row_tok = torch.where(valid, tok.long()[safe], -1).to(torch.int32).contiguous()
    row_w = torch.where(valid, weight[safe], 0).to(x.dtype).contiguous()
    rows = row_assign.numel()
    act = torch.empty((rows, inter), dtype=x.dtype, device=x.device)
    y = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    bn_i = min(64, max(_MIN_DOT, _next_pow2(inter)))
    bn_h = min(64, max(_MIN_DOT, _next_pow2(hidden)))
    bk = 64 if interpret else 32
    dot32 = interpret and x.dtype == torch.bfloat16  # the interpreter's bf16 tl.dot is broken
    nblocks = block_slot.numel()
    gate_up_kernel[(nblocks, triton.cdiv(inter, bn_i))](
        x, gate_up, act, row_tok, block_slot, hidden, inter,
        *x.stride(), *gate_up.stride(), *act.stride(),
        BLOCK_M=bm, BLOCK_N=bn_i, BLOCK_K=bk, DOT_FP32=dot32,
    )  # fmt: skip
    down_kernel[(nblocks, triton.cdiv(hidden, bn_h))](
        act, down, y, row_tok, row_w, block_slot, hidden, inter,
        *act.stride(), *down.stride(), *y.stride(),
        BLOCK_M=bm, BLOCK_N=bn_h, BLOCK_K=bk, DOT_FP32=dot32,
    )  # fmt: skip
    out.index_add_(0, row_tok[valid].long(), y[valid])
    return out


class TritonExperts:
    """`MoEExecutor` over the fused kernel; all experts of every layer in this process."""

    def __init__(self, weights: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.weights = weights  # per layer: (gate_up [E, 2I, h], down [E, h, I])

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.weights[layer]
        tok, expert, weight = flatten_routes(ids, weights)
        return fused_moe(x, tok, expert, weight, gate_up, down)
