"""Gemma 2 and Gemma 3 (text) forward over the paged KV cache: the Llama layout with Gemma's own arithmetic.

What differs from `llama.Model`: RMSNorm multiplies by (1 + w) in fp32; four norms per layer (the attention and
MLP outputs are normalized before they join the residual); embeddings scaled by sqrt(hidden); a tanh-GELU MLP;
queries scaled by `query_pre_attn_scalar ** -0.5`; sliding-window layers alternating with global ones (Gemma 3's
local layers with their own rotary theta); q/k norms (Gemma 3); tanh soft-capping of attention logits and of the
output logits (Gemma 2). Only the reference path: `fast=None` picks it, `fast=True` is refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from brigade.kernels.attention import Attention, AttnMeta, write_kv
from brigade.kernels.moe import MoEExecutor
from brigade.model.config import ModelConfig, ModelError
from brigade.model.families import Rotary, accepts_window
from brigade.model.llama import KV, Model
from brigade.model.loader import require


def gemma_norm(x: torch.Tensor, weight1: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: `weight1` is 1 + w in fp32, multiplied before the cast back (as transformers does)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight1).to(x.dtype)


def _plus_one(w: torch.Tensor) -> torch.Tensor:
    return 1.0 + w.float()


class GemmaModel(Model):
    """Gemma 2 / Gemma 3 text models; built by `load_model` for those archs."""

    def __init__(self, cfg: ModelConfig, tensors: dict[str, torch.Tensor],
                 experts: MoEExecutor | None = None, attention: Attention | None = None,
                 fast: bool | None = None) -> None:
        if fast:
            raise ModelError(f"{cfg.name}: the fast path does not cover {cfg.arch}; use the reference path")
        super().__init__(cfg, tensors, experts=experts, attention=attention, fast=False)
        self.ff_norms: list[tuple[torch.Tensor, torch.Tensor]] = []  # (pre, post) feed-forward norms, 1 + w
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            names = [f"{p}pre_feedforward_layernorm.weight", f"{p}post_feedforward_layernorm.weight"]
            require(tensors, names, cfg.name)
            self.ff_norms.append((_plus_one(tensors[names[0]]), _plus_one(tensors[names[1]])))
            layer.input_norm, layer.post_norm = _plus_one(layer.input_norm), _plus_one(layer.post_norm)
            if layer.q_norm is not None and layer.k_norm is not None:
                layer.q_norm, layer.k_norm = _plus_one(layer.q_norm), _plus_one(layer.k_norm)
        self.norm = _plus_one(self.norm)
        self.local_rope = Rotary(cfg, self.embed.device, local=True) if cfg.rope_local_theta else self.rope
        self.embed_scale = torch.tensor(cfg.hidden_size ** 0.5, dtype=self.dtype)

    def _attention(self, attention: Attention) -> Attention:
        """Soft-capped logits, or windows on a backend without them: the eager attention below."""
        if self.cfg.attn_softcap or (self.cfg.sliding_window and not accepts_window(attention)):
            return EagerPagedAttention(self.cfg.attn_softcap)
        return attention

    def head_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return gemma_norm(x, weight, self.cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMeta, kv: KV,
                logits_index: torch.Tensor) -> torch.Tensor:
        """Run one step; return fp32 logits [len(logits_index), vocab] for the selected tokens."""
        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        tables = {"full": self.full_cos_sin(self.rope, positions, meta)}
        tables["local"] = tables["full"] if self.local_rope is self.rope else self.full_cos_sin(
            self.local_rope, positions, meta)
        h = F.embedding(input_ids, self.embed) * self.embed_scale
        for i, layer in enumerate(self.layers):
            cos, sin = tables["local" if cfg.window(i) else "full"]
            x = gemma_norm(h, layer.input_norm, eps)
            q, k, v = self.split_heads(F.linear(x, layer.qkv, layer.qkv_bias), layer, cos, sin)
            o = self.attention(q, k, v, kv[i][0], kv[i][1], meta, self.scale, **self.attn_kw[i])
            h = h + gemma_norm(F.linear(o.reshape(-1, cfg.num_heads * cfg.head_dim), layer.o), layer.post_norm, eps)
            pre, post = self.ff_norms[i]
            assert layer.gate_up is not None and layer.down is not None
            gate, up = F.linear(gemma_norm(h, pre, eps), layer.gate_up).chunk(2, dim=-1)
            h = h + gemma_norm(F.linear(F.gelu(gate, approximate="tanh") * up, layer.down), post, eps)
        logits = F.linear(gemma_norm(h[logits_index], self.norm, eps), self.lm_head)
        if cfg.final_softcap:
            logits = torch.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        return logits.float()


class EagerPagedAttention:
    """Paged attention in plain torch with what the kernels lack: tanh soft-capping of the logits (Gemma 2), and
    sliding windows (each query sees the last `window` positions, itself included, as transformers' mask does)
    for backends without them. Correctness first: every chunk's scores are materialized."""

    reads_tables = False  # so the runner builds the padded decode groups read here

    def __init__(self, softcap: float = 0.0) -> None:
        self.softcap = softcap

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: AttnMeta, scale: float, window: int = 0) -> torch.Tensor:
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        _, kvh, d = k_cache.shape
        for g in meta.decode_groups:
            n, nb = g.blocks.shape
            length = g.mask.shape[-1]
            idx = g.blocks.reshape(-1)
            ks = k_cache.view(-1, length // nb, kvh, d).index_select(0, idx).view(n, length, kvh, d)
            vs = v_cache.view(-1, length // nb, kvh, d).index_select(0, idx).view(n, length, kvh, d)
            valid = g.mask.view(n, length)
            if window:
                last = valid.sum(-1, keepdim=True) - 1  # the query's own position
                valid = valid & (torch.arange(length, device=q.device)[None, :] > last - window)
            out[g.start:g.end] = self._attend(q[g.start:g.end, None], ks, vs, valid[:, None, :], scale)[:, 0]
        for p in meta.prefills:
            end = p.q_start + p.q_len
            if p.slots is None:
                ks, vs = k[p.q_start:end], v[p.q_start:end]
                mask = torch.ones(p.q_len, p.q_len, dtype=torch.bool, device=q.device).tril()
            else:
                assert p.mask is not None
                ks, vs, mask = k_cache[p.slots], v_cache[p.slots], p.mask
            if window:  # keys from position k_start on (the runner may leave out keys before every window)
                q_pos = torch.arange(p.ctx_len - p.q_len, p.ctx_len, device=q.device)[:, None]
                k_pos = torch.arange(p.ctx_len - ks.shape[0], p.ctx_len, device=q.device)[None, :]
                mask = mask & (k_pos > q_pos - window)
            out[p.q_start:end] = self._attend(q[None, p.q_start:end], ks[None], vs[None], mask[None], scale)[0]
        return out

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                scale: float) -> torch.Tensor:
        """q [n, Lq, H, D] over k/v [n, Lk, KVH, D] where mask [n, Lq, Lk] allows -> [n, Lq, H, D]."""
        rep = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        s = torch.einsum("nqhd,nkhd->nhqk", q, k) * scale
        if self.softcap:
            s = torch.tanh(s / self.softcap) * self.softcap
        s = s.masked_fill(~mask[:, None], float("-inf"))
        return torch.einsum("nhqk,nkhd->nqhd", torch.softmax(s.float(), dim=-1).to(q.dtype), v)
