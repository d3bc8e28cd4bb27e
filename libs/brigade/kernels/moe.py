"""Mixture-of-experts execution behind one interface: local torch, a Triton kernel, or remote shards."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class MoEExecutor(Protocol):
    """Runs layer `layer`'s routed experts: x [T, h], ids/weights [T, k] -> sum_k w * expert_k(x) [T, h]."""

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor: ...


def flatten_routes(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[T, k] routes -> per-assignment (token, expert, weight), token-major."""
    k = ids.shape[1]
    tok = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(k)
    return tok, ids.reshape(-1), weights.reshape(-1)


def run_assignments(x: torch.Tensor, tok: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor,
                    gate_up: torch.Tensor, down: torch.Tensor, expert_ids: list[int] | None = None) -> torch.Tensor:
    """out[t] = sum over assignments a with tok[a] = t of weight[a] * expert[a](x[t]); one matmul pair per expert.

    `gate_up` [E', 2I, h] and `down` [E', h, I] hold the experts named by `expert_ids` (all when None);
    assignments to other experts are skipped, so a shard can call this with its part.
    """
    out = torch.zeros_like(x)
    if expert.numel() == 0:
        return out
    order = torch.argsort(expert, stable=True)  # within an expert, tokens keep their order
    counts = torch.bincount(expert, minlength=int(expert.max().item()) + 1).tolist()
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    local = range(gate_up.shape[0]) if expert_ids is None else expert_ids
    for slot, e in enumerate(local):
        if e >= len(counts) or counts[e] == 0:
            continue
        sel = order[starts[e]:starts[e + 1]]
        rows = tok[sel]
        gate, up = F.linear(x[rows], gate_up[slot]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[slot]) * weight[sel, None]
        out.index_add_(0, rows, y)
    return out


def run_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor, expert_ids: list[int] | None = None) -> torch.Tensor:
    """Tokens sorted by expert, one matmul pair per expert that has tokens (see `run_assignments`)."""
    tok, expert, weight = flatten_routes(ids, weights)
    return run_assignments(x, tok, expert, weight, gate_up, down, expert_ids)


class LocalExperts:
    """All experts of every layer in this process."""

    def __init__(self, weights: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.weights = weights  # per layer: (gate_up [E, 2I, h], down [E, h, I])

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.weights[layer]
        return run_experts(x, ids, weights, gate_up, down)


def default_experts(weights: list[tuple[torch.Tensor, torch.Tensor]]) -> MoEExecutor:
    """The fused Triton kernel when the weights live on a GPU, else the torch path."""
    if weights and weights[0][0].is_cuda:
        from brigade.kernels import triton_moe

        if triton_moe.available():
            return triton_moe.TritonExperts(weights)
    return LocalExperts(weights)
