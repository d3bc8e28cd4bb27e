"""One expert shard: its experts of every MoE layer, the compute for a dispatch, and its load metrics."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry, Counter

from brigade import protocol as P
from brigade.experts import dispatch
from brigade.kernels.moe import run_assignments
from brigade.model.config import ModelConfig, load_config
from brigade.model.experts import load_expert_weights

TOKENS_METRIC = "brigade:expert_tokens"  # exported as brigade:expert_tokens_total{layer, expert[, shard]}


class ExpertShard:
    """The experts `held[layer]` of every MoE layer; `run` answers one dispatch."""

    def __init__(self, shard_id: str, cfg: ModelConfig, held: Sequence[Sequence[int]],
                 weights: list[tuple[torch.Tensor, torch.Tensor]], kernel: str = "torch") -> None:
        self.shard_id = shard_id
        self.cfg = cfg
        self.held = [sorted(set(h)) for h in held]
        self.weights = weights
        if kernel not in ("torch", "triton"):
            raise ValueError(f"unknown experts kernel {kernel!r} (torch, triton)")
        self.kernel = kernel
        self.dtype = weights[0][0].dtype if weights else torch.float32
        self.served = 0
        self.registry = CollectorRegistry()
        self.tokens = Counter(TOKENS_METRIC, "Token assignments computed, per MoE layer and expert",
                              ["layer", "expert", "shard"], registry=self.registry)
        self._children = [{e: self.tokens.labels(str(i), str(e), shard_id) for e in h}
                          for i, h in enumerate(self.held)]

    @classmethod
    def load(cls, model_dir: str | Path, shard_id: str, held: Sequence[Sequence[int]],
             dtype: torch.dtype = torch.float32, device: str = "cpu", kernel: str = "torch") -> ExpertShard:
        """Read only this shard's experts' tensors from the checkpoint (either layout)."""
        cfg = load_config(model_dir)
        weights = load_expert_weights(model_dir, held, dtype)
        if device != "cpu":
            weights = [(g.to(device), d.to(device)) for g, d in weights]
        return cls(shard_id, cfg, held, weights, kernel)

    def status(self) -> P.ExpertsStatus:
        return P.ExpertsStatus(self.shard_id, self.cfg.name, num_experts=self.cfg.num_experts,
                               hidden_size=self.cfg.hidden_size, experts=[list(h) for h in self.held],
                               dtype=dispatch.dtype_name(self.dtype), served=self.served, time=time.time())

    def run(self, msg: P.ExpertsDispatch) -> P.ExpertsResult:
        """Compute one dispatch; errors come back in the result, never as an exception."""
        try:
            if not 0 <= msg.layer < len(self.held):
                raise dispatch.DispatchError(f"no MoE layer {msg.layer} (the model has {len(self.held)})")
            x, token, expert, weight = dispatch.decode(msg, self.cfg.hidden_size)
            held = self.held[msg.layer]
            counts = torch.bincount(expert, minlength=self.cfg.num_experts).tolist() if expert.numel() else []
            foreign = [e for e, c in enumerate(counts) if c and e not in self._children[msg.layer]]
            if foreign:
                raise dispatch.DispatchError(f"shard {self.shard_id} does not hold experts {foreign} of layer "
                                             f"{msg.layer} (it holds {held})")
            t0 = time.perf_counter()
            y = self.compute(msg.layer, x, token, expert, weight)
            compute_s = time.perf_counter() - t0
        except dispatch.DispatchError as e:
            return P.ExpertsResult(error=str(e))
        except Exception as e:  # a bug or an OOM: the worker fails the step with this, not after a timeout
            return P.ExpertsResult(error=f"{type(e).__name__}: {e}")
        for e, c in enumerate(counts):
            if c:
                self._children[msg.layer][e].inc(c)
        self.served += 1
        return P.ExpertsResult(dispatch.to_bytes(y.to(x.dtype)), compute_s=compute_s)

    def compute(self, layer: int, x: torch.Tensor, token: torch.Tensor, expert: torch.Tensor,
                weight: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.weights[layer]
        device = gate_up.device
        x, token, expert, weight = (t.to(device) for t in (x, token, expert, weight))
        x, weight = x.to(self.dtype), weight.to(self.dtype)  # the result goes back in the request's dtype
        if self.kernel == "triton":
            from brigade.kernels.triton_moe import fused_moe

            y = fused_moe(x, token, expert, weight, gate_up, down, self.held[layer])
        else:
            y = run_assignments(x, token, expert, weight, gate_up, down, self.held[layer])
        return y.cpu()
