"""The newer families for `make.make_model`: Qwen3, Qwen3-MoE, Phi-3 (longrope, partial rotary), Gemma 2 and 3.

Their weights start as the Llama-style dict `make.make_state_dict` draws, then take each family's own names and
extra tensors here (`family_layout`); their configs use settings small enough that tests exercise every option:
head_dim != hidden / heads, q/k norms, dense layers inside an MoE, longrope switching inside a generation, sliding
windows shorter than the test prompts, soft-capping that changes the logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from brigade.model.make import ModelSpec

FAMILY_ARCHS: tuple[str, ...] = ("qwen3", "qwen3_moe", "phi3", "gemma2", "gemma3")
ARCH_CLASS = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "phi3": "Phi3ForCausalLM",
              "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
QK_NORM = ("qwen3", "qwen3_moe", "gemma3")
GEMMA = ("gemma2", "gemma3")

# Tiny-size settings. Phi-3: longrope's short factors up to 128 positions, long ones past that (the parity tests'
# prompts and generations stay under it: transformers recomputes a sequence's whole cache with the long factors
# when it first crosses, which Brigade does not, see families.Rotary); 0.75 of each head rotates (Phi-4-mini's
# share). Gemma: a 16-token window.
PARTIAL_ROTARY = 0.75
LONGROPE_ORIGINAL = 128
WINDOW = 16


def family_spec(arch: str, size: str, make: Callable[..., ModelSpec], base: dict[str, Any]) -> ModelSpec:
    """The spec for one of FAMILY_ARCHS (`make` is ModelSpec, `base` the size's common shape)."""
    tiny = size == "tiny"
    if arch == "qwen3":  # head_dim 32 with hidden 64 / 4 heads, tied like Qwen3-0.6B
        return make(arch, rope_theta=1e6, tied=True, head_size=32 if tiny else 128, rms_norm_eps=1e-6, **base)
    if arch == "qwen3_moe":  # the middle layer dense (mlp_only_layers)
        layers = 3 if tiny else base["layers"]
        return make(arch, **{**base, "layers": layers}, rope_theta=1e6, head_size=32 if tiny else 128,
                    experts=4 if tiny else 8, experts_per_tok=2, moe_intermediate=64 if tiny else 512,
                    dense_layers=(1,), rms_norm_eps=1e-6)
    if arch == "phi3":
        return make(arch, rope_theta=10000.0, **base)
    return make(arch, rope_theta=10000.0, tied=True, head_size=32 if tiny else 128, rms_norm_eps=1e-6, **base)


def _longrope(spec: ModelSpec) -> dict[str, Any]:
    pairs = int(spec.head_dim * PARTIAL_ROTARY) // 2
    g = torch.Generator().manual_seed(7)
    # Short factors near 1 (as trained), long ones growing towards the low frequencies, like Phi-3's own.
    short = (1.0 + 0.2 * torch.rand(pairs, generator=g)).tolist()
    long = (torch.linspace(1.0, 8.0, pairs) * (1.0 + 0.1 * torch.rand(pairs, generator=g))).tolist()
    return {"rope_type": "longrope", "rope_theta": spec.rope_theta, "short_factor": short, "long_factor": long,
            "partial_rotary_factor": PARTIAL_ROTARY}


def family_config(spec: ModelSpec, common: dict[str, Any]) -> PretrainedConfig:
    """The transformers config for a FAMILY_ARCHS spec; `common` holds the fields every family shares."""
    import transformers as tf

    c = {**common}
    tiny = spec.max_positions <= 512
    if spec.arch == "qwen3":
        cfg = tf.Qwen3Config(head_dim=spec.head_dim, attention_bias=False, use_sliding_window=False, **c)
    elif spec.arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(head_dim=spec.head_dim, num_experts=spec.experts,
                                num_experts_per_tok=spec.experts_per_tok, moe_intermediate_size=spec.moe_intermediate,
                                mlp_only_layers=list(spec.dense_layers), decoder_sparse_step=1,
                                norm_topk_prob=False, use_sliding_window=False, **c)
    elif spec.arch == "phi3":
        c["rope_parameters"] = _longrope(spec)
        original = LONGROPE_ORIGINAL if tiny else spec.max_positions // 4
        cfg = tf.Phi3Config(original_max_position_embeddings=original, sliding_window=None, **c)
    else:
        window = WINDOW if tiny else 512
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(spec.layers)]
        gemma = dict(head_dim=spec.head_dim, query_pre_attn_scalar=24, sliding_window=window, layer_types=layer_types,
                     hidden_activation="gelu_pytorch_tanh")
        if spec.arch == "gemma2":
            # Caps small enough to change random-weight logits (the real models' 50 and 30 barely would).
            cfg = tf.Gemma2Config(attn_logit_softcapping=1.5, final_logit_softcapping=10.0, **gemma, **c)
        else:
            c["rope_parameters"] = {
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            }
            cfg = tf.Gemma3TextConfig(**gemma, **c)
    cfg.architectures = [ARCH_CLASS[spec.arch]]
    return cfg


def family_layout(spec: ModelSpec, sd: dict[str, torch.Tensor],
                  rand: Callable[..., torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and add tensors of the Llama-style `sd` into the family's published layout (in place too)."""
    arch = spec.arch
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        if arch in QK_NORM:
            sd[p + "self_attn.q_norm.weight"] = 1.0 + rand(spec.head_dim, std=0.1)
            sd[p + "self_attn.k_norm.weight"] = 1.0 + rand(spec.head_dim, std=0.1)
        if arch in GEMMA:
            sd[p + "pre_feedforward_layernorm.weight"] = 1.0 + rand(spec.hidden, std=0.1)
            sd[p + "post_feedforward_layernorm.weight"] = 1.0 + rand(spec.hidden, std=0.1)
        if arch == "phi3":  # fused projections, in q, k, v and gate, up order
            a, m = p + "self_attn.", p + "mlp."
            sd[a + "qkv_proj.weight"] = torch.cat([sd.pop(f"{a}{n}_proj.weight") for n in "qkv"])
            sd[m + "gate_up_proj.weight"] = torch.cat([sd.pop(m + "gate_proj.weight"), sd.pop(m + "up_proj.weight")])
        if arch == "qwen3_moe" and i not in spec.dense_layers:  # Mixtral names -> Qwen3-MoE's
            old, new = p + "block_sparse_moe.", p + "mlp."
            sd[new + "gate.weight"] = sd.pop(old + "gate.weight")
            for e in range(spec.experts):
                for w, name in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                    sd[f"{new}experts.{e}.{name}.weight"] = sd.pop(f"{old}experts.{e}.{w}.weight")
    if arch in GEMMA:
        # Gemma's RMSNorm multiplies by (1 + w): store w - 1 so the effective weights follow the common recipe.
        for name in [n for n in sd if n.endswith("norm.weight")]:
            sd[name] = sd[name] - 1.0
    return sd
