"""Llama-family forward (Llama, Mistral, Qwen2, Mixtral) over a paged KV cache.

Plain tensors and functional ops, no nn.Module: a step's tokens arrive flattened ([T]) with their
positions, attention metadata says which cache slots each token writes and reads.

Two paths compute the same function. The reference path is eager torch, op by op as Hugging Face does it. The
fast path (float32 on the CPU, `fast=True`) multiplies by oneDNN-prepacked weights and runs the pointwise steps
as fused native kernels: residual add + RMSNorm in one pass, rotary in place on the fused qkv rows, SiLU-and-mul.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from brigade.kernels import linear as L
from brigade.kernels import native
from brigade.kernels.attention import Attention, AttnMeta, TorchAttention
from brigade.kernels.moe import MoEExecutor, default_experts
from brigade.model.config import ModelConfig, ModelError, load_config, rope_inv_freq
from brigade.model.experts import is_expert_tensor
from brigade.model.loader import load_tensors, require


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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, as Hugging Face does."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotary embedding (half-split layout) to x [T, heads, D]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _expert_weights(t: dict[str, torch.Tensor], cfg: ModelConfig, i: int,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router [E, h], gate_up [E, 2I, h], down [E, h, I] from either checkpoint layout."""
    p = f"model.layers.{i}."
    if f"{p}block_sparse_moe.gate.weight" in t:  # the published Mixtral layout: one tensor per expert
        names = [f"{p}block_sparse_moe.experts.{e}.w{w}.weight" for e in range(cfg.num_experts) for w in (1, 2, 3)]
        require(t, names, cfg.name)
        ex = [f"{p}block_sparse_moe.experts.{e}." for e in range(cfg.num_experts)]
        gate_up = torch.stack([torch.cat([t.pop(x + "w1.weight"), t.pop(x + "w3.weight")]) for x in ex])
        down = torch.stack([t.pop(x + "w2.weight") for x in ex])
        return t.pop(f"{p}block_sparse_moe.gate.weight"), gate_up, down
    names = [f"{p}mlp.gate.weight", f"{p}mlp.experts.gate_up_proj", f"{p}mlp.experts.down_proj"]
    require(t, names, cfg.name)  # transformers v5 fused layout
    return t.pop(names[0]), t.pop(names[1]), t.pop(names[2])


def _router_weight(t: dict[str, torch.Tensor], cfg: ModelConfig, i: int) -> torch.Tensor:
    """Just the router [E, h] (experts run elsewhere), from either checkpoint layout."""
    p = f"model.layers.{i}."
    names = [f"{p}block_sparse_moe.gate.weight", f"{p}mlp.gate.weight"]
    found = [n for n in names if n in t]
    if not found:
        raise ModelError(f"{cfg.name}: checkpoint is missing tensors: {names[0]} (or {names[1]})")
    return t.pop(found[0])


class Model:
    """Weights plus `forward`; built by `load_model`."""

    def __init__(self, cfg: ModelConfig, tensors: dict[str, torch.Tensor],
                 experts: MoEExecutor | None = None, attention: Attention | None = None,
                 fast: bool | None = None) -> None:
        """`fast`: use the fast path (None: wherever it applies, i.e. float32 on the CPU with the native
        kernels built); False keeps the eager reference path."""
        self.cfg = cfg
        self.attention: Attention = attention or TorchAttention()
        t = dict(tensors)
        layers = []
        expert_w: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            attn = [f"{p}self_attn.{n}_proj.weight" for n in "qkvo"]
            norms = [f"{p}input_layernorm.weight", f"{p}post_attention_layernorm.weight"]
            require(t, attn + norms, cfg.name)
            bias = None
            if cfg.attention_bias:
                bnames = [f"{p}self_attn.{n}_proj.bias" for n in "qkv"]
                require(t, bnames, cfg.name)
                bias = torch.cat([t.pop(n) for n in bnames])
            gate_up = down = router = None
            if cfg.is_moe and experts is not None:  # remote or custom executor: the router only
                router = _router_weight(t, cfg, i)
            elif cfg.is_moe:
                router, gu, dn = _expert_weights(t, cfg, i)
                expert_w.append((gu, dn))
            else:
                mlp = [f"{p}mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
                require(t, mlp, cfg.name)
                gate_up = torch.cat([t.pop(mlp[0]), t.pop(mlp[1])])
                down = t.pop(mlp[2])
            layers.append(Layer(
                input_norm=t.pop(norms[0]), post_norm=t.pop(norms[1]),
                qkv=torch.cat([t.pop(n) for n in attn[:3]]), qkv_bias=bias, o=t.pop(attn[3]),
                gate_up=gate_up, down=down, router=router,
            ))
        require(t, ["model.embed_tokens.weight", "model.norm.weight"], cfg.name)
        self.layers = layers
        self.embed = t.pop("model.embed_tokens.weight")
        self.norm = t.pop("model.norm.weight")
        if cfg.tie_word_embeddings or "lm_head.weight" not in t:
            if not cfg.tie_word_embeddings:
                raise ModelError(f"{cfg.name}: checkpoint is missing tensors: lm_head.weight")
            self.lm_head = self.embed
        else:
            self.lm_head = t.pop("lm_head.weight")
        if self.embed.shape != (cfg.vocab_size, cfg.hidden_size):
            raise ModelError(f"{cfg.name}: embed_tokens has shape {tuple(self.embed.shape)}, config says "
                             f"({cfg.vocab_size}, {cfg.hidden_size})")
        self.experts: MoEExecutor | None = None
        if cfg.is_moe:
            self.experts = experts or default_experts(expert_w)
        self.inv_freq = rope_inv_freq(cfg)
        self.scale = cfg.head_dim ** -0.5
        applies = L.can_pack(self.embed) and native.available()  # float32 on the CPU, oneDNN, the kernels built
        if fast and not applies:
            raise ModelError("the fast path needs a float32 model on the CPU and the native kernels")
        self.fast = applies if fast is None else fast
        if self.fast:
            self._pack()

    def _pack(self) -> None:
        """Reorder every dense weight into oneDNN's layout once (the embedding keeps its own for lookups)."""
        for layer in self.layers:
            layer.qkv, layer.o = L.pack(layer.qkv), L.pack(layer.o)
            if layer.gate_up is not None and layer.down is not None:
                layer.gate_up, layer.down = L.pack(layer.gate_up), L.pack(layer.down)
        self.lm_head = L.pack(self.lm_head)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMeta,
                kv: list[tuple[torch.Tensor, torch.Tensor]], logits_index: torch.Tensor) -> torch.Tensor:
        """Run one step; return fp32 logits [len(logits_index), vocab] for the selected tokens."""
        if self.fast:
            return self._forward_fast(input_ids, positions, meta, kv, logits_index)
        cfg = self.cfg
        n_q, n_kv, d = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.head_dim
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, None, :].to(self.dtype), emb.sin()[:, None, :].to(self.dtype)
        h = F.embedding(input_ids, self.embed)
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer.input_norm, cfg.rms_norm_eps)
            qkv = F.linear(x, layer.qkv, layer.qkv_bias)
            q = rotate(qkv[:, :n_q].view(-1, cfg.num_heads, d), cos, sin)
            k = rotate(qkv[:, n_q:n_q + n_kv].view(-1, cfg.num_kv_heads, d), cos, sin)
            v = qkv[:, n_q + n_kv:].view(-1, cfg.num_kv_heads, d)
            o = self.attention(q, k, v, kv[i][0], kv[i][1], meta, self.scale)
            h = h + F.linear(o.reshape(-1, n_q), layer.o)
            x = rms_norm(h, layer.post_norm, cfg.rms_norm_eps)
            h = h + self._mlp(i, layer, x)
        h = rms_norm(h[logits_index], self.norm, cfg.rms_norm_eps)
        return F.linear(h, self.lm_head).float()

    def _forward_fast(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMeta,
                      kv: list[tuple[torch.Tensor, torch.Tensor]], logits_index: torch.Tensor) -> torch.Tensor:
        """The reference forward's function with packed matmuls and fused pointwise kernels (float32, CPU).

        `residual` carries the running hidden state; each `add_rms_norm` adds the previous block's output
        to it in place and normalizes, as the reference's `h = h + ...; rms_norm(h)` pair does.
        """
        cfg = self.cfg
        n_q, n_kv, d = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.head_dim
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        cos, sin = freqs.cos(), freqs.sin()
        residual = F.embedding(input_ids, self.embed)
        delta: torch.Tensor | None = None
        eps = cfg.rms_norm_eps
        for i, layer in enumerate(self.layers):
            x = native.add_rms_norm(delta, residual, layer.input_norm, eps)
            qkv = L.linear(x, layer.qkv, layer.qkv_bias)
            native.rotary(qkv, cos, sin, cfg.num_heads + cfg.num_kv_heads, d)
            q = qkv[:, :n_q].view(-1, cfg.num_heads, d)
            k = qkv[:, n_q:n_q + n_kv].view(-1, cfg.num_kv_heads, d)
            v = qkv[:, n_q + n_kv:].view(-1, cfg.num_kv_heads, d)
            o = self.attention(q, k, v, kv[i][0], kv[i][1], meta, self.scale)
            x = native.add_rms_norm(L.linear(o.reshape(-1, n_q), layer.o), residual, layer.post_norm, eps)
            if layer.router is None:
                assert layer.gate_up is not None and layer.down is not None
                delta = L.linear(native.silu_mul(L.linear(x, layer.gate_up)), layer.down)
            else:
                delta = self._mlp(i, layer, x)
        assert delta is not None
        residual.add_(delta)
        h = native.add_rms_norm(None, residual[logits_index], self.norm, eps)
        return L.linear(h, self.lm_head)

    def _mlp(self, i: int, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        if layer.router is None:
            assert layer.gate_up is not None and layer.down is not None
            gate, up = F.linear(x, layer.gate_up).chunk(2, dim=-1)
            return F.linear(F.silu(gate) * up, layer.down)
        assert self.experts is not None
        probs = torch.softmax(F.linear(x, layer.router).float(), dim=-1)
        weights, ids = torch.topk(probs, self.cfg.num_experts_per_tok, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        return self.experts(i, x, ids, weights)


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32,
               attention: Attention | None = None, experts: MoEExecutor | None = None,
               device: str = "cpu", fast: bool | None = None) -> Model:
    """Load a Hugging Face checkpoint directory into a `Model`."""
    cfg = load_config(model_dir)
    # With an executor given, the experts' weights live elsewhere (shards): do not even read them.
    keep = (lambda name: not is_expert_tensor(name)) if experts is not None else (lambda name: True)
    tensors = load_tensors(model_dir, keep=keep, dtype=dtype)
    if device != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return Model(cfg, tensors, experts=experts, attention=attention, fast=fast)
