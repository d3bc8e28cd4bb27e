"""Llama-family forward (Llama, Mistral, Qwen2, Mixtral, Qwen3, Qwen3-MoE, Phi-3) over a paged KV cache.

Plain tensors and functional ops, no nn.Module: a step's tokens arrive flattened ([T]) with their
positions, attention metadata says which cache slots each token writes and reads. What differs between the
families (tensor layouts, q/k norms, partial and long rotary) lives in `families`; Gemma has its own forward
(`gemma`), and `load_model` picks the class by the config's arch.

Two paths compute the same function. The reference path is eager torch, op by op as Hugging Face does it. The
fast path (float32 on the CPU, `fast=True`) multiplies by oneDNN-prepacked weights and runs the pointwise steps
as fused native kernels: residual add + RMSNorm in one pass, rotary in place on the fused qkv rows, SiLU-and-mul.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from brigade.kernels import linear as L
from brigade.kernels import native
from brigade.kernels.attention import Attention, AttnMeta, TorchAttention
from brigade.kernels.moe import MoEExecutor, default_experts
from brigade.model.config import ModelConfig, ModelError, load_config
from brigade.model.experts import is_expert_tensor
from brigade.model.families import Layer, Rotary, accepts_window, load_layers, rms_norm, rotate
from brigade.model.loader import load_tensors, require

__all__ = ["Layer", "Model", "load_model", "rms_norm", "rotate"]

KV = list[tuple[torch.Tensor, torch.Tensor]]


class Model:
    """Weights plus `forward`; built by `load_model`."""

    def __init__(self, cfg: ModelConfig, tensors: dict[str, torch.Tensor],
                 experts: MoEExecutor | None = None, attention: Attention | None = None,
                 fast: bool | None = None) -> None:
        """`fast`: use the fast path (None: wherever it applies, i.e. float32 on the CPU with the native
        kernels built); False keeps the eager reference path."""
        self.cfg = cfg
        t = dict(tensors)
        self.layers, expert_w = load_layers(t, cfg, remote_experts=experts is not None)
        require(t, ["model.embed_tokens.weight", "model.norm.weight"], cfg.name)
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
        self.rope = Rotary(cfg, self.embed.device)
        self.scale = cfg.attn_scale or cfg.head_dim ** -0.5
        self.attention: Attention = self._attention(attention or TorchAttention())
        # Keyword arguments of each layer's attention call: a window only where the layer has one.
        self.attn_kw: list[dict[str, int]] = [{"window": w} if (w := cfg.window(i)) else {}
                                              for i in range(cfg.num_layers)]
        applies = self._fast_applies()
        if fast and not applies:
            raise ModelError("the fast path needs a float32 model on the CPU and the native kernels")
        self.fast = applies if fast is None else fast
        if self.fast:
            self._pack()

    def _attention(self, attention: Attention) -> Attention:
        """The attention backend to use; a model with sliding layers needs one that takes `window=`."""
        if self.cfg.sliding_window and not accepts_window(attention):
            raise ModelError(f"{self.cfg.name}: sliding-window attention ({self.cfg.sliding_window}) needs an "
                             f"attention backend with windows; {type(attention).__name__} has none")
        return attention

    def _fast_applies(self) -> bool:
        return L.can_pack(self.embed) and native.available()  # float32 on the CPU, oneDNN, the kernels built

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

    def split_heads(self, qkv: torch.Tensor, layer: Layer, cos: torch.Tensor, sin: torch.Tensor,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [T, heads, D] from the fused projection: per-head q/k norm where the family has it, then
        rotary (cos/sin [T, 1, rotary_dim], the full form)."""
        cfg = self.cfg
        n_q, n_kv, d = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.head_dim
        q = qkv[:, :n_q].view(-1, cfg.num_heads, d)
        k = qkv[:, n_q:n_q + n_kv].view(-1, cfg.num_kv_heads, d)
        v = qkv[:, n_q + n_kv:].view(-1, cfg.num_kv_heads, d)
        if layer.q_norm is not None and layer.k_norm is not None:
            q, k = self.head_norm(q, layer.q_norm), self.head_norm(k, layer.k_norm)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def head_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, weight, self.cfg.rms_norm_eps)

    def full_cos_sin(self, rope: Rotary, positions: torch.Tensor, meta: AttnMeta,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [T, 1, rotary_dim] in the model's dtype, the reference path's form."""
        cos, sin = rope.cos_sin(positions, meta)
        return (torch.cat((cos, cos), -1)[:, None, :].to(self.dtype),
                torch.cat((sin, sin), -1)[:, None, :].to(self.dtype))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMeta, kv: KV,
                logits_index: torch.Tensor) -> torch.Tensor:
        """Run one step; return fp32 logits [len(logits_index), vocab] for the selected tokens."""
        if self.fast:
            return self._forward_fast(input_ids, positions, meta, kv, logits_index)
        cfg = self.cfg
        cos, sin = self.full_cos_sin(self.rope, positions, meta)
        h = F.embedding(input_ids, self.embed)
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer.input_norm, cfg.rms_norm_eps)
            q, k, v = self.split_heads(F.linear(x, layer.qkv, layer.qkv_bias), layer, cos, sin)
            o = self.attention(q, k, v, kv[i][0], kv[i][1], meta, self.scale, **self.attn_kw[i])
            h = h + F.linear(o.reshape(-1, cfg.num_heads * cfg.head_dim), layer.o)
            x = rms_norm(h, layer.post_norm, cfg.rms_norm_eps)
            h = h + self._mlp(i, layer, x)
        h = rms_norm(h[logits_index], self.norm, cfg.rms_norm_eps)
        return F.linear(h, self.lm_head).float()

    def _forward_fast(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMeta, kv: KV,
                      logits_index: torch.Tensor) -> torch.Tensor:
        """The reference forward's function with packed matmuls and fused pointwise kernels (float32, CPU).

        `residual` carries the running hidden state; each `add_rms_norm` adds the previous block's output
        to it in place and normalizes, as the reference's `h = h + ...; rms_norm(h)` pair does.
        """
        cfg = self.cfg
        n_q, n_kv, d = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.head_dim
        cos, sin = self.rope.cos_sin(positions, meta)
        residual = F.embedding(input_ids, self.embed)
        delta: torch.Tensor | None = None
        eps = cfg.rms_norm_eps
        for i, layer in enumerate(self.layers):
            x = native.add_rms_norm(delta, residual, layer.input_norm, eps)
            qkv = L.linear(x, layer.qkv, layer.qkv_bias)
            q = qkv[:, :n_q].view(-1, cfg.num_heads, d)
            k = qkv[:, n_q:n_q + n_kv].view(-1, cfg.num_kv_heads, d)
            v = qkv[:, n_q + n_kv:].view(-1, cfg.num_kv_heads, d)
            self._norm_rotate_fast(qkv, q, k, layer, cos, sin)
            o = self.attention(q, k, v, kv[i][0], kv[i][1], meta, self.scale, **self.attn_kw[i])
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

    def _norm_rotate_fast(self, qkv: torch.Tensor, q: torch.Tensor, k: torch.Tensor, layer: Layer,
                          cos: torch.Tensor, sin: torch.Tensor) -> None:
        """q/k norm and rotary, in place on the fused qkv rows (cos/sin [T, rotary_dim / 2])."""
        if layer.q_norm is not None and layer.k_norm is not None:
            q.copy_(rms_norm(q, layer.q_norm, self.cfg.rms_norm_eps))
            k.copy_(rms_norm(k, layer.k_norm, self.cfg.rms_norm_eps))
        if cos.shape[-1] * 2 == self.cfg.head_dim:
            native.rotary(qkv, cos, sin, self.cfg.num_heads + self.cfg.num_kv_heads, self.cfg.head_dim)
            return
        # Partial rotary: the kernel rotates whole heads, so rotate the leading dims in torch.
        full_cos, full_sin = torch.cat((cos, cos), -1)[:, None, :], torch.cat((sin, sin), -1)[:, None, :]
        r = full_cos.shape[-1]
        for x in (q, k):
            x[..., :r] = rotate(x[..., :r], full_cos, full_sin)

    def _mlp(self, i: int, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        if layer.router is None:
            assert layer.gate_up is not None and layer.down is not None
            gate, up = F.linear(x, layer.gate_up).chunk(2, dim=-1)
            return F.linear(F.silu(gate) * up, layer.down)
        assert self.experts is not None
        probs = torch.softmax(F.linear(x, layer.router).float(), dim=-1)
        weights, ids = torch.topk(probs, self.cfg.num_experts_per_tok, dim=-1)
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return self.experts(i, x, ids, weights.to(x.dtype))


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32,
               attention: Attention | None = None, experts: MoEExecutor | None = None,
               device: str = "cpu", fast: bool | None = None) -> Model:
    """Load a Hugging Face checkpoint directory into a `Model` (a `GemmaModel` for Gemma 2 and 3)."""
    cfg = load_config(model_dir)
    # With an executor given, the experts' weights live elsewhere (shards): do not even read them.
    keep = (lambda name: not is_expert_tensor(name)) if experts is not None else (lambda name: True)
    tensors = load_tensors(model_dir, keep=keep, dtype=dtype)
    if device != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    cls: type[Model] = Model
    if cfg.arch in ("gemma2", "gemma3"):
        from brigade.model.gemma import GemmaModel  # imports this module

        cls = GemmaModel
    return cls(cfg, tensors, experts=experts, attention=attention, fast=fast)
