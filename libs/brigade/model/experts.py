"""Expert tensors of MoE checkpoints in both layouts: which names they are, and loading a subset of them.

- published Mixtral layout: `model.layers.L.block_sparse_moe.experts.E.w{1,2,3}.weight` (w1 gate, w3 up, w2 down);
- published Qwen3-MoE layout: `model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`;
- transformers v5 fused layout: `model.layers.L.mlp.experts.gate_up_proj` [E, 2I, h] and `...down_proj` [E, h, I].
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from brigade.model.config import ModelError, load_config
from brigade.model.loader import checkpoint_files

_PER_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w([123])\.weight$")
_PER_EXPERT_QWEN = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_QWEN_PART = {"gate": "w1", "down": "w2", "up": "w3"}  # in Mixtral's names


def is_expert_tensor(name: str) -> bool:
    """True for the experts' weights (not the router): a worker with remote experts skips them."""
    return bool(_PER_EXPERT.match(name) or _PER_EXPERT_QWEN.match(name) or _FUSED.match(name))


def _runs(ids: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted ids -> contiguous [start, stop) runs, to read fused tensors in few slices."""
    runs: list[tuple[int, int]] = []
    for e in ids:
        if runs and runs[-1][1] == e:
            runs[-1] = (runs[-1][0], e + 1)
        else:
            runs.append((e, e + 1))
    return runs


def load_expert_weights(model_dir: str | Path, held: Sequence[Sequence[int]], dtype: torch.dtype = torch.float32,
                        ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per MoE layer, (gate_up [E', 2I, h], down [E', h, I]) of the experts `held[layer]` (sorted), read alone.

    Per-expert tensors of other experts are never read; fused tensors are read by slices.
    """
    cfg = load_config(model_dir)
    if not cfg.is_moe:
        raise ModelError(f"{cfg.name}: not a mixture-of-experts model")
    if len(held) != cfg.num_layers:
        raise ModelError(f"{cfg.name}: placement names {len(held)} layers, the model has {cfg.num_layers}")
    wanted = [sorted(set(h)) for h in held]
    parts: dict[tuple[int, int, str], torch.Tensor] = {}  # (layer, expert, w1|w2|w3)
    for path in checkpoint_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    if (m := _PER_EXPERT.match(name)) or (m := _PER_EXPERT_QWEN.match(name)):
                        layer, e = int(m[1]), int(m[2])
                        if layer < len(wanted) and e in wanted[layer]:
                            part = _QWEN_PART.get(m[3], f"w{m[3]}")
                            parts[(layer, e, part)] = f.get_tensor(name).to(dtype)
                    elif m := _FUSED.match(name):
                        layer = int(m[1])
                        if layer >= len(wanted):
                            continue
                        sl = f.get_slice(name)
                        for lo, hi in _runs(wanted[layer]):
                            block = sl[lo:hi].to(dtype)
                            for e in range(lo, hi):
                                t = block[e - lo]
                                if m[2] == "down_proj":
                                    parts[(layer, e, "w2")] = t
                                else:
                                    gate, up = t.chunk(2, dim=0)
                                    parts[(layer, e, "w1")], parts[(layer, e, "w3")] = gate, up
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelError(f"{path}: cannot read safetensors ({e})") from e
    out = []
    inter = cfg.expert_intermediate_size
    for layer, experts in enumerate(wanted):
        if layer in cfg.dense_layers:  # a dense MLP layer (Qwen3-MoE mlp_only_layers): no experts to hold
            experts = []
        missing = [f"layer {layer} expert {e}" for e in experts for w in ("w1", "w2", "w3")
                   if (layer, e, w) not in parts]
        if missing:
            raise ModelError(f"{cfg.name}: checkpoint is missing expert weights: {', '.join(sorted(set(missing))[:5])}")
        if not experts:
            out.append((torch.empty(0, 2 * inter, cfg.hidden_size, dtype=dtype),
                        torch.empty(0, cfg.hidden_size, inter, dtype=dtype)))
            continue
        gate_up = torch.stack([torch.cat([parts[(layer, e, "w1")], parts[(layer, e, "w3")]]) for e in experts])
        down = torch.stack([parts[(layer, e, "w2")] for e in experts])
        out.append((gate_up.contiguous(), down.contiguous()))
    return out
