"""Qwen3, Qwen3-MoE, Phi-3, Gemma 2 and 3: made checkpoints, config parsing against transformers, longrope, remote
experts, and what the engine refuses. Greedy parity on every path is in test_engine_parity (ARCHS)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from test_engine_parity import GREEDY, PROMPTS, _engine, _hf, _reference

from brigade.engine.engine import Engine, EngineConfig
from brigade.kernels.attention import AttnMeta
from brigade.kernels.moe import LocalExperts
from brigade.model.config import ModelError, load_config, rope_attention_scale, rope_inv_freq
from brigade.model.experts import is_expert_tensor, load_expert_weights
from brigade.model.gemma import EagerPagedAttention, GemmaModel
from brigade.model.llama import Model, load_model
from brigade.model.loader import load_tensors
from brigade.model.make_families import FAMILY_ARCHS


def _names(path: Path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_made_checkpoint_is_the_published_layout(tiny_models: dict[str, Path], arch: str) -> None:
    """transformers loads every tensor (none missing, none unexpected); the family's own names are there."""
    from transformers import AutoModelForCausalLM

    path = tiny_models[arch]
    _, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    names, cfg = _names(path), load_config(path)
    p = "model.layers.0."
    want = {
        "qwen3": {p + "self_attn.q_norm.weight", p + "self_attn.k_proj.weight"},
        "qwen3_moe": {p + "mlp.gate.weight", p + "mlp.experts.3.up_proj.weight", "model.layers.1.mlp.gate_proj.weight"},
        "phi3": {p + "self_attn.qkv_proj.weight", p + "mlp.gate_up_proj.weight"},
        "gemma2": {p + "pre_feedforward_layernorm.weight", p + "post_feedforward_layernorm.weight"},
        "gemma3": {p + "self_attn.k_norm.weight", p + "post_feedforward_layernorm.weight"},
    }[arch]
    assert want <= names
    assert cfg.arch == arch
    if arch in ("qwen3", "qwen3_moe", "gemma2", "gemma3"):
        assert cfg.head_dim == 32 != cfg.hidden_size // cfg.num_heads
    if arch == "qwen3_moe":
        assert (cfg.num_experts, cfg.dense_layers, cfg.norm_topk_prob) == (4, (1,), False)
        assert cfg.expert_intermediate_size == 64 != cfg.intermediate_size
        assert not any("experts.0" in n for n in names if n.startswith("model.layers.1."))
    if arch == "phi3":
        assert cfg.rotary_dim == 12 and cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "longrope"
    if arch in ("gemma2", "gemma3"):
        assert cfg.sliding_window == 16 and [cfg.window(i) for i in range(2)] == [16, 0]


# ---------------------------------------------------------------- config parsing


def _write(root: Path, raw: dict[str, Any]) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(raw))
    return root


PHI3 = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 128, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 8192, "original_max_position_embeddings": 512, "rope_theta": 10000.0}


def _hf_longrope(raw: dict[str, Any], seq_len: int | None) -> tuple[torch.Tensor, float]:
    from transformers import Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = Phi3Config(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
    return ROPE_INIT_FUNCTIONS["longrope"](hf, "cpu", seq_len=seq_len)


@pytest.mark.parametrize("extra", [{}, {"attention_factor": 1.5}, {"factor": 4.0}], ids=["default", "attn", "factor"])
@pytest.mark.parametrize("partial", [1.0, 0.75])
def test_longrope_matches_transformers(tmp_path: Path, partial: float, extra: dict[str, Any]) -> None:
    """Short/long inverse frequencies and the cos/sin factor, from Phi-3's v4 layout and its older "su" name."""
    pairs = int(16 * partial) // 2
    g = torch.Generator().manual_seed(0)
    short, long = (1 + torch.rand(pairs, generator=g)).tolist(), (1 + 9 * torch.rand(pairs, generator=g)).tolist()
    raw = {**PHI3, "partial_rotary_factor": partial,
           "rope_scaling": {"type": "su", "short_factor": short, "long_factor": long, **extra}}
    cfg = load_config(_write(tmp_path / "m", raw))
    assert cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "longrope"
    hf_raw = {**raw, "rope_scaling": {**raw["rope_scaling"], "type": "longrope"}}
    want_short, factor = _hf_longrope(hf_raw, None)
    want_long, _ = _hf_longrope(hf_raw, 513)
    torch.testing.assert_close(rope_inv_freq(cfg), want_short, rtol=0, atol=0)
    torch.testing.assert_close(rope_inv_freq(cfg, long=True), want_long, rtol=0, atol=0)
    assert rope_attention_scale(cfg) == pytest.approx(factor, rel=1e-12) and factor > 1.0


def test_longrope_factor_length_is_checked(tmp_path: Path) -> None:
    raw = {**PHI3, "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 8}}
    with pytest.raises(ModelError, match="short_factor has 3 entries"):
        load_config(_write(tmp_path / "m", raw))


GEMMA3 = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 128, "hidden_size": 64,
          "intermediate_size": 96, "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 1,
          "head_dim": 32, "sliding_window": 512, "rope_theta": 1e6, "rope_local_base_freq": 10000.0,
          "rope_scaling": {"rope_type": "linear", "factor": 8.0}}


def test_gemma3_v4_config(tmp_path: Path) -> None:
    """Published Gemma 3 configs: no layer_types (every 6th layer global), local theta apart, defaults filled."""
    cfg = load_config(_write(tmp_path / "m", GEMMA3))
    assert [cfg.window(i) for i in range(7)] == [512] * 5 + [0, 512]
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.qk_norm, cfg.tie_word_embeddings) == (1e6, 1e4, True, True)
    assert cfg.attn_scale == 256 ** -0.5 and cfg.hidden_act == "gelu_pytorch_tanh" and cfg.final_softcap == 0.0
    plain = 1.0 / (1e4 ** (torch.arange(0, 32, 2).float() / 32))
    torch.testing.assert_close(rope_inv_freq(cfg, local=True), plain)
    torch.testing.assert_close(rope_inv_freq(cfg), 1.0 / (1e6 ** (torch.arange(0, 32, 2).float() / 32)) / 8)
    two = load_config(_write(tmp_path / "g2", {**GEMMA3, "architectures": ["Gemma2ForCausalLM"], "rope_scaling": None}))
    assert (two.attn_softcap, two.final_softcap) == (50.0, 30.0)  # Gemma2Config's defaults
    assert [two.window(i) for i in range(3)] == [512, 0, 512]


def test_qwen3_moe_config_names(tmp_path: Path) -> None:
    base = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "moe_intermediate_size": 32, "num_experts_per_tok": 2}
    published = load_config(_write(tmp_path / "a", {**base, "num_experts": 6, "decoder_sparse_step": 2}))
    assert (published.num_experts, published.dense_layers, published.norm_topk_prob) == (6, (0, 2), False)
    v5 = load_config(_write(tmp_path / "b", {**base, "num_local_experts": 5, "mlp_only_layers": [3],
                                             "norm_topk_prob": True}))
    assert (v5.num_experts, v5.dense_layers, v5.norm_topk_prob) == (5, (3,), True)


# ---------------------------------------------------------------- longrope's long factors end to end


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_phi3_long_prompts_match_transformers(tiny_models: dict[str, Path], tmp_path: Path, fast: bool) -> None:
    """Prompts longer than original_max_position_embeddings take the long factors throughout, as in transformers.
    (The parity tests' sequences all stay under it, on the short factors.)"""
    path = shutil.copytree(tiny_models["phi3"], tmp_path / "phi3-short-context")
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, "original_max_position_embeddings": 16}))
    _, tok = _hf(path)
    prompts = [p for p in PROMPTS if len(tok(p).input_ids) > 16]
    assert len(prompts) >= 5
    ref = [r for p, r in zip(PROMPTS, _reference(path), strict=True) if p in prompts]
    eng = _engine(path, num_blocks=512, fast_path=fast)
    assert eng.model.rope.long is not None
    assert [o.token_ids for o in eng.generate(prompts, GREEDY)] == ref


# ---------------------------------------------------------------- Qwen3-MoE with its experts elsewhere


def test_qwen3_moe_remote_experts_match_local(tiny_models: dict[str, Path]) -> None:
    """The worker reads no expert tensor (Qwen3-MoE's names); shard-style loading gives the same experts."""
    path = tiny_models["qwen3_moe"]
    cfg = load_config(path)
    assert is_expert_tensor("model.layers.0.mlp.experts.3.down_proj.weight")
    assert not is_expert_tensor("model.layers.0.mlp.gate.weight")
    assert not is_expert_tensor("model.layers.1.mlp.gate_proj.weight")  # the dense layer's MLP
    held = [list(range(cfg.num_experts))] * cfg.num_layers
    weights = load_expert_weights(path, held)
    assert weights[1][0].shape[0] == 0  # the dense layer holds no experts
    full = load_model(path)
    for layer in (0, 2):
        assert torch.equal(weights[layer][0], full.experts.weights[layer][0])  # type: ignore[union-attr]
        assert torch.equal(weights[layer][1], full.experts.weights[layer][1])  # type: ignore[union-attr]
    remote = LocalExperts(weights)
    engine = Engine(EngineConfig(model=str(path), num_blocks=64), experts=remote)
    layers = engine.model.layers
    assert layers[0].gate_up is None and layers[0].router is not None and layers[1].gate_up is not None
    prompts = PROMPTS[:3]
    want = [r for r in _reference(path)[:3]]
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == want


# ---------------------------------------------------------------- what is chosen or refused


def test_gemma_runs_the_reference_path(tiny_models: dict[str, Path]) -> None:
    path = tiny_models["gemma2"]
    model = load_model(path)
    assert isinstance(model, GemmaModel) and model.fast is False
    assert isinstance(model.attention, EagerPagedAttention) and model.attention.softcap == 1.5
    with pytest.raises(ModelError, match="fast path does not cover gemma2"):
        load_model(path, fast=True)


class _NoWindow:
    reads_tables = False

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: AttnMeta, scale: float) -> torch.Tensor:
        raise AssertionError("not called")


def test_windowed_layers_need_a_backend_with_windows(tiny_models: dict[str, Path]) -> None:
    path = tiny_models["gemma3"]
    cfg, tensors = load_config(path), load_tensors(path)
    with pytest.raises(ModelError, match="needs an attention backend with windows"):
        Model(cfg, tensors, attention=_NoWindow())  # type: ignore[arg-type]
    # Gemma falls back to its own eager attention instead.
    assert isinstance(GemmaModel(cfg, tensors, attention=_NoWindow()).attention,  # type: ignore[arg-type]
                      EagerPagedAttention)


def test_cli_makes_every_family() -> None:
    from brigade.cli import parser

    for arch in FAMILY_ARCHS:
        assert parser().parse_args(["make-model", "--arch", arch, "--out", "x"]).arch == arch
