"""What differs between the Llama-like families, kept out of the forward passes.

- tensor names and layouts: split or fused (Phi-3) q/k/v and gate/up; MoE experts per expert (Mixtral's w1/w2/w3,
  Qwen3-MoE's gate/up/down_proj) or fused (transformers v5), dense layers inside an MoE model;
- per-head q/k RMSNorm (Qwen3, Gemma 3);
- rotary tables: partial rotary (Phi-4-mini), longrope's short/long factors and cos/sin scale (Phi-3).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from brigade.kernels.attention import AttnMeta
from brigade.model.config import ModelConfig, ModelError, is_long_rope, rope_attention_scale, rope_inv_freq
from brigade.model.loader import require


@dataclass
class Layer:
    """One decoder layer's weights; q/k/v and gate/up are fused for fewer, larger matmuls."""

    input_norm: torch.Tensor
    qkv: torch.Tensor  # [(H + 2*KVH) * D, hidden]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor | None  # dense MLP [2I, hidden]
    down: torch.Tensor | None
    router: torch.Tensor | None  # MoE gate [E, hidden]
    q_norm: torch.Tensor | None = None  # per-head RMSNorm weights [D]
    k_norm: torch.Tensor | None = None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, as Hugging Face does."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotary embedding (half-split layout) to x [T, heads, D]; with cos/sin narrower than D (partial
    rotary) only the first dims rotate and the rest pass through."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((rotate(x[..., :r], cos, sin), x[..., r:]), dim=-1)
    half = r // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Rotary:
    """Per-token rotary angles for one step: [T, rotary_dim / 2] (the half form the native kernel takes)."""

    def __init__(self, cfg: ModelConfig, device: torch.device, local: bool = False) -> None:
        self.short = rope_inv_freq(cfg, local=local).to(device)
        self.long = rope_inv_freq(cfg, long=True).to(device) if is_long_rope(cfg) and not local else None
        self.old = int(cfg.rope_scaling["original_max_position_embeddings"]) if self.long is not None else 0
        self.scale = 1.0 if local else rope_attention_scale(cfg)

    def cos_sin(self, positions: torch.Tensor, meta: AttnMeta) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, rotary_dim / 2], times longrope's attention factor."""
        pos = positions.to(torch.float32)[:, None]
        if self.long is None:
            freqs = pos * self.short[None, :]
        else:
            freqs = pos * torch.where(self._long_rows(positions, meta)[:, None], self.long, self.short)
        if self.scale == 1.0:
            return freqs.cos(), freqs.sin()
        return freqs.cos() * self.scale, freqs.sin() * self.scale

    def _long_rows(self, positions: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
        """Which tokens take longrope's long factors. Transformers chooses per forward call, for every token of
        it, by the call's last position: a token does here by its own sequence's last position in this step, so a
        step gives what one transformers call over that sequence gives (a decode token: its own position).

        Not done here: transformers' Phi-3 `generate` also drops the cache when a sequence first grows past
        original_max_position_embeddings and recomputes all of it with the long factors; here the keys cached
        before keep their short rotation (as in vLLM), so such a sequence's later tokens can differ. A prompt
        longer than that length, prefilled in one chunk, matches exactly."""
        last = positions.clone()
        for p in meta.prefills:
            end = p.q_start + p.q_len
            last[p.q_start:end] = positions[end - 1]
        return last >= self.old  # seq_len = last + 1 > original_max_position_embeddings


def accepts_window(attention: object) -> bool:
    """Whether an attention backend takes the `window=` keyword (sliding-window attention)."""
    try:
        return "window" in inspect.signature(attention.__call__).parameters  # type: ignore[operator]
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------- tensor names and layouts


def _attention_weights(t: dict[str, torch.Tensor], cfg: ModelConfig, i: int) -> dict[str, torch.Tensor | None]:
    p = f"model.layers.{i}.self_attn."
    if f"{p}qkv_proj.weight" in t:  # Phi-3: already fused, q then k then v
        require(t, [f"{p}o_proj.weight"], cfg.name)
        qkv = t.pop(f"{p}qkv_proj.weight")
    else:
        names = [f"{p}{n}_proj.weight" for n in "qkvo"]
        require(t, names, cfg.name)
        qkv = torch.cat([t.pop(n) for n in names[:3]])
    want = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    if qkv.shape[0] != want:
        raise ModelError(f"{cfg.name}: layer {i} q/k/v weights have {qkv.shape[0]} rows, the config needs {want}")
    out: dict[str, torch.Tensor | None] = {"qkv": qkv, "o": t.pop(f"{p}o_proj.weight"), "qkv_bias": None}
    if cfg.attention_bias:
        bnames = [f"{p}{n}_proj.bias" for n in "qkv"]
        require(t, bnames, cfg.name)
        out["qkv_bias"] = torch.cat([t.pop(n) for n in bnames])
    if cfg.qk_norm:
        require(t, [f"{p}q_norm.weight", f"{p}k_norm.weight"], cfg.name)
        out["q_norm"], out["k_norm"] = t.pop(f"{p}q_norm.weight"), t.pop(f"{p}k_norm.weight")
    return out


def _dense_mlp(t: dict[str, torch.Tensor], cfg: ModelConfig, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [2I, h] (gate rows first) and down [h, I]."""
    p = f"model.layers.{i}.mlp."
    if f"{p}gate_up_proj.weight" in t:  # Phi-3: already fused, gate then up
        require(t, [f"{p}down_proj.weight"], cfg.name)
        return t.pop(f"{p}gate_up_proj.weight"), t.pop(f"{p}down_proj.weight")
    names = [f"{p}{n}_proj.weight" for n in ("gate", "up", "down")]
    require(t, names, cfg.name)
    return torch.cat([t.pop(names[0]), t.pop(names[1])]), t.pop(names[2])


def _expert_weights(t: dict[str, torch.Tensor], cfg: ModelConfig, i: int,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router [E, h], gate_up [E, 2I, h], down [E, h, I] from any of the three checkpoint layouts."""
    p = f"model.layers.{i}."
    n = range(cfg.num_experts)
    if f"{p}block_sparse_moe.gate.weight" in t:  # the published Mixtral layout: w1 = gate, w3 = up, w2 = down
        router, per, parts = f"{p}block_sparse_moe.gate.weight", f"{p}block_sparse_moe.experts.", ("w1", "w3", "w2")
    elif f"{p}mlp.experts.0.gate_proj.weight" in t:  # the published Qwen3-MoE layout
        router, per, parts = f"{p}mlp.gate.weight", f"{p}mlp.experts.", ("gate_proj", "up_proj", "down_proj")
    else:  # transformers v5 fused layout
        names = [f"{p}mlp.gate.weight", f"{p}mlp.experts.gate_up_proj", f"{p}mlp.experts.down_proj"]
        require(t, names, cfg.name)
        return t.pop(names[0]), t.pop(names[1]), t.pop(names[2])
    require(t, [router] + [f"{per}{e}.{w}.weight" for e in n for w in parts], cfg.name)
    gate_up = torch.stack([torch.cat([t.pop(f"{per}{e}.{parts[0]}.weight"), t.pop(f"{per}{e}.{parts[1]}.weight")])
                           for e in n])
    down = torch.stack([t.pop(f"{per}{e}.{parts[2]}.weight") for e in n])
    return t.pop(router), gate_up, down


def _router_weight(t: dict[str, torch.Tensor], cfg: ModelConfig, i: int) -> torch.Tensor:
    """Just the router [E, h] (experts run elsewhere), from either name."""
    p = f"model.layers.{i}."
    names = [f"{p}block_sparse_moe.gate.weight", f"{p}mlp.gate.weight"]
    found = [n for n in names if n in t]
    if not found:
        raise ModelError(f"{cfg.name}: checkpoint is missing tensors: {names[0]} (or {names[1]})")
    return t.pop(found[0])


def load_layers(t: dict[str, torch.Tensor], cfg: ModelConfig, remote_experts: bool,
                ) -> tuple[list[Layer], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Pop every decoder layer's weights out of `t`; also the local experts' (gate_up, down) per layer (empty
    placeholders for an MoE model's dense layers, so the list stays indexed by layer)."""
    layers: list[Layer] = []
    expert_w: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        norms = [f"{p}input_layernorm.weight", f"{p}post_attention_layernorm.weight"]
        require(t, norms, cfg.name)
        attn = _attention_weights(t, cfg, i)
        gate_up = down = router = None
        if not cfg.is_moe or i in cfg.dense_layers:
            gate_up, down = _dense_mlp(t, cfg, i)
            if cfg.is_moe and not remote_experts:
                h, inter, dtype = cfg.hidden_size, cfg.expert_intermediate_size, gate_up.dtype
                expert_w.append((gate_up.new_empty(0, 2 * inter, h, dtype=dtype), gate_up.new_empty(0, h, inter)))
        elif remote_experts:  # the experts' weights live elsewhere (shards): the router only
            router = _router_weight(t, cfg, i)
        else:
            router, gu, dn = _expert_weights(t, cfg, i)
            expert_w.append((gu, dn))
        layers.append(Layer(input_norm=t.pop(norms[0]), post_norm=t.pop(norms[1]), gate_up=gate_up, down=down,
                            router=router, **attn))  # type: ignore[arg-type]
    return layers, expert_w
