"""Mixture-of-experts execution behind one interface: local torch today, remote shards later."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class MoEExecutor(Protocol):
    """Runs layer `layer`'s routed experts: x [T, h], ids/weights [T, k] -> sum_k w * expert_k(x) [T, h]."""

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor: ...


def run_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor, expert_ids: list[int] | None = None) -> torch.Tensor:
    """Tokens sorted by expert, one matmul pair per expert that has tokens.

    `gate_up` [E, 2I, h] and `down` [E, h, I] hold the experts named by `expert_ids` (all when None);
    assignments to other experts are skipped, so a shard can call this with its part.
    """
    out = torch.zeros_like(x)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=int(ids.max().item()) + 1 if flat.numel() else 1).tolist()
    k = ids.shape[1]
    local = range(gate_up.shape[0]) if expert_ids is None else expert_ids
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    for slot, e in enumerate(local):
        if e >= len(counts) or counts[e] == 0:
            continue
        sel = order[starts[e]:starts[e + 1]]
        tok = sel // k
        gate, up = F.linear(x[tok], gate_up[slot]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[slot]) * weights.reshape(-1)[sel, None]
        out.index_add_(0, tok, y)
    return out


class LocalExperts:
    """All experts of every layer in this process."""

    def __init__(self, weights: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.weights = weights  # per layer: (gate_up [E, 2I, h], down [E, h, I])

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.weights[layer]
        return run_experts(x, ids, weights, gate_up, down)
