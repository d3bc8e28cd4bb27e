"""load_config (HF config.json, transformers v4 and v5 rope layouts), rope_inv_freq and the safetensors loader."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from brigade.model.config import ModelConfig, ModelError, load_config, rope_inv_freq
from brigade.model.loader import checkpoint_files, load_tensors

BASE: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": [1, 2],
}

# head_dim 16 and theta 5e5 give wavelengths ~6, 32, 167, 862, ... so with original_max_position_embeddings 256
# (high_wavelen 64, low_wavelen 256) the llama3 rule leaves some frequencies alone, smooths some and divides the rest.
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
LINEAR = {"factor": 4.0}


def write_config(root: Path, cfg: dict[str, Any] | str) -> Path:
    """Write config.json into root/m (same directory name everywhere, so ModelConfig.name matches)."""
    model_dir = root / "m"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return model_dir


def v4(kind: str | None, params: dict[str, Any], theta: float, legacy_key: bool = False) -> dict[str, Any]:
    cfg = {**BASE, "rope_theta": theta}
    if kind is not None:
        cfg["rope_scaling"] = {("type" if legacy_key else "rope_type"): kind, **params}
    return cfg


def v5(kind: str | None, params: dict[str, Any], theta: float) -> dict[str, Any]:
    return {**BASE, "rope_parameters": {"rope_type": kind or "default", "rope_theta": theta, **params}}


def normalized(cfg: ModelConfig) -> ModelConfig:
    """Drop the keys that only say the same thing twice (`rope_theta` inside v5 params, legacy `type`)."""
    if cfg.rope_scaling is None:
        return cfg
    scaling = {k: v for k, v in cfg.rope_scaling.items() if k not in ("rope_theta", "type")}
    return dataclasses.replace(cfg, rope_scaling=scaling)


# ---------------------------------------------------------------------------------------------------------------
# load_config: v4 vs v5 layouts
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "params", "legacy_key"),
    [
        (None, {}, False),
        ("linear", LINEAR, False),
        ("linear", LINEAR, True),  # old v4 configs spell it "type"
        ("llama3", LLAMA3, False),
    ],
    ids=["default", "linear", "linear-legacy-type", "llama3"],
)
def test_v4_and_v5_layouts_agree(tmp_path: Path, kind: str | None, params: dict[str, Any], legacy_key: bool) -> None:
    theta = 500000.0
    a = load_config(write_config(tmp_path / "v4", v4(kind, params, theta, legacy_key)))
    b = load_config(write_config(tmp_path / "v5", v5(kind, params, theta)))
    assert normalized(a) == normalized(b)
    assert a.rope_theta == b.rope_theta == theta
    if kind is None:
        assert a.rope_scaling is None and b.rope_scaling is None
    else:
        assert a.rope_scaling is not None and b.rope_scaling is not None
        assert a.rope_scaling["rope_type"] == b.rope_scaling["rope_type"] == kind
    assert torch.equal(rope_inv_freq(a), rope_inv_freq(b))
    # The rest of the shape comes through unchanged.
    assert (a.arch, a.vocab_size, a.hidden_size, a.intermediate_size, a.num_layers) == ("llama", 128, 64, 96, 2)
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.max_position) == (4, 2, 16, 4096)
    assert a.eos_token_ids == (1, 2) and a.bos_token_id == 0 and a.rms_norm_eps == 1e-5


def test_v4_and_v5_scaling_dicts_identical(tmp_path: Path) -> None:
    a = load_config(write_config(tmp_path / "v4", v4("llama3", LLAMA3, 500000.0)))
    b = load_config(write_config(tmp_path / "v5", v5("llama3", LLAMA3, 500000.0)))
    assert a == b


def test_default_rope_type_in_v4_scaling_means_none(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, {**BASE, "rope_theta": 1e4, "rope_scaling": {"rope_type": "default"}}))
    assert cfg.rope_scaling is None
    expected = 1.0 / (1e4 ** (torch.arange(0, 16, 2).float() / 16))
    torch.testing.assert_close(rope_inv_freq(cfg), expected)


def test_missing_rope_theta_defaults_to_10000(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path / "a", BASE)).rope_theta == 10000.0
    v5_no_theta = {**BASE, "rope_parameters": {"rope_type": "linear", "factor": 2.0}}
    assert load_config(write_config(tmp_path / "b", v5_no_theta)).rope_theta == 10000.0


# ---------------------------------------------------------------------------------------------------------------
# rope_inv_freq against transformers
# ---------------------------------------------------------------------------------------------------------------


def _hf_inv_freq(kind: str, theta: float, head_dim: int, params: dict[str, Any]) -> torch.Tensor:
    # Imported here: transformers pulls in triton, which test_triton_attention wants to import first.
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                     max_position_embeddings=131072,
                     rope_parameters={"rope_type": kind, "rope_theta": theta, **params})
    inv, _ = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    return inv


@pytest.mark.parametrize(
    ("theta", "head_dim", "params"),
    [
        (500000.0, 16, LLAMA3),
        # Llama 3.1 8B's own values.
        (500000.0, 128, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}),
        # Llama 3.2 style: factor 32.
        (500000.0, 64, {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}),
    ],
    ids=["tiny", "llama3.1", "llama3.2"],
)
def test_llama3_inv_freq_matches_transformers(tmp_path: Path, theta: float, head_dim: int,
                                              params: dict[str, Any]) -> None:
    cfg = load_config(write_config(tmp_path, {**v5("llama3", params, theta), "head_dim": head_dim}))
    ours = rope_inv_freq(cfg)
    assert ours.shape == (head_dim // 2,)
    torch.testing.assert_close(ours, _hf_inv_freq("llama3", theta, head_dim, params), rtol=1e-6, atol=0)


def test_llama3_scaling_covers_all_three_bands(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, v4("llama3", LLAMA3, 500000.0)))
    plain = 1.0 / (500000.0 ** (torch.arange(0, 16, 2).float() / 16))
    ratio = plain / rope_inv_freq(cfg)
    assert torch.isclose(ratio, torch.tensor(1.0)).any()  # high frequencies untouched
    assert torch.isclose(ratio, torch.tensor(8.0)).any()  # low frequencies divided by factor
    assert ((ratio > 1.01) & (ratio < 7.99)).any()  # smoothed band in between


def test_linear_inv_freq_matches_transformers(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, v4("linear", LINEAR, 10000.0)))
    torch.testing.assert_close(rope_inv_freq(cfg), _hf_inv_freq("linear", 10000.0, 16, LINEAR), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# load_config: architectures and errors
# ---------------------------------------------------------------------------------------------------------------


def test_supported_architectures(tmp_path: Path) -> None:
    mistral = load_config(write_config(tmp_path / "mistral", {**BASE, "architectures": ["MistralForCausalLM"],
                                                              "sliding_window": None}))
    assert mistral.arch == "llama" and not mistral.attention_bias
    qwen = load_config(write_config(tmp_path / "qwen", {**BASE, "architectures": ["Qwen2ForCausalLM"],
                                                        "sliding_window": 1024, "use_sliding_window": False,
                                                        "eos_token_id": 7}))
    assert qwen.arch == "qwen2" and qwen.attention_bias and qwen.eos_token_ids == (7,)
    moe = load_config(write_config(tmp_path / "moe", {**BASE, "architectures": ["MixtralForCausalLM"],
                                                      "num_local_experts": 4, "num_experts_per_tok": 2}))
    assert moe.arch == "mixtral" and moe.is_moe and (moe.num_experts, moe.num_experts_per_tok) == (4, 2)
    mha = {k: v for k, v in BASE.items() if k != "num_key_value_heads"}
    assert load_config(write_config(tmp_path / "mha", mha)).num_kv_heads == 4


def _error(model_dir: Path) -> str:
    with pytest.raises(ModelError) as info:
        load_config(model_dir)
    return str(info.value)


def test_unknown_architecture(tmp_path: Path) -> None:
    msg = _error(write_config(tmp_path / "a", {**BASE, "architectures": ["GPT2LMHeadModel"]}))
    assert "unsupported architecture" in msg and "GPT2LMHeadModel" in msg and "LlamaForCausalLM" in msg
    no_arch = {k: v for k, v in BASE.items() if k != "architectures"} | {"model_type": "gpt2"}
    assert "'gpt2'" in _error(write_config(tmp_path / "b", no_arch))


def test_missing_config_json(tmp_path: Path) -> None:
    msg = _error(tmp_path)
    assert "no config.json" in msg and str(tmp_path) in msg
    assert "no config.json" in _error(tmp_path / "does-not-exist")


def test_invalid_json(tmp_path: Path) -> None:
    model_dir = write_config(tmp_path, '{"architectures": ["LlamaForCausalLM"], ')
    msg = _error(model_dir)
    assert "not valid JSON" in msg and "config.json" in msg
    (model_dir / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    assert "not valid JSON" in _error(model_dir)


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads"])
def test_missing_field(tmp_path: Path, field: str) -> None:
    cfg = {k: v for k, v in BASE.items() if k != field}
    msg = _error(write_config(tmp_path, cfg))
    assert "missing field" in msg and repr(field) in msg


@pytest.mark.parametrize(
    "cfg",
    [
        v4("yarn", {"factor": 4.0, "original_max_position_embeddings": 1024}, 1e4),
        v5("dynamic", {"factor": 2.0}, 1e4),
        v4("dynamic", {"factor": 2.0}, 1e4),
    ],
    ids=["v4-yarn", "v5-dynamic", "v4-dynamic"],
)
def test_unsupported_rope_type(tmp_path: Path, cfg: dict[str, Any]) -> None:
    kind = (cfg.get("rope_scaling") or cfg.get("rope_parameters"))["rope_type"]
    msg = _error(write_config(tmp_path, cfg))
    assert "rope scaling type" in msg and repr(kind) in msg


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"num_key_value_heads": 3}, "not a multiple"),
        ({"hidden_act": "gelu"}, "'gelu'"),
    ],
    ids=["gqa-ratio", "activation"],
)
def test_other_unsupported_shapes(tmp_path: Path, change: dict[str, Any], words: str) -> None:
    assert words in _error(write_config(tmp_path, {**BASE, **change}))


def test_sliding_window(tmp_path: Path) -> None:
    """Mistral v0.1: every layer slides; Qwen2 only with use_sliding_window, from layer max_window_layers on;
    a window as long as the context is no window."""
    mistral = load_config(write_config(tmp_path / "m", {**BASE, "architectures": ["MistralForCausalLM"],
                                                        "sliding_window": 1024}))
    assert mistral.sliding_window == 1024 and [mistral.window(i) for i in range(2)] == [1024, 1024]
    long = load_config(write_config(tmp_path / "l", {**BASE, "architectures": ["MistralForCausalLM"],
                                                     "sliding_window": 4096}))
    assert [long.window(i) for i in range(2)] == [0, 0]
    qwen = {**BASE, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 512}
    off = load_config(write_config(tmp_path / "q0", qwen))  # use_sliding_window defaults to False for Qwen2
    assert [off.window(i) for i in range(2)] == [0, 0]
    qwen = load_config(write_config(tmp_path / "q1", {**qwen, "use_sliding_window": True, "max_window_layers": 1}))
    assert [qwen.window(i) for i in range(2)] == [0, 512]


@pytest.mark.parametrize(
    "cfg",
    [
        v4("llama3", {"factor": 8.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 256}, 5e5),
        v5("linear", {}, 1e4),
        {**BASE, "vocab_size": "many"},
        [BASE],
    ],
    ids=["llama3-missing-low_freq_factor", "linear-missing-factor", "non-numeric-field", "top-level-list"],
)
def test_malformed_config_is_model_error(tmp_path: Path, cfg: Any) -> None:
    model_dir = write_config(tmp_path, json.dumps(cfg))
    try:
        load_config(model_dir)
    except ModelError:
        return
    except Exception as e:  # report what escaped instead of ModelError
        pytest.fail(f"{type(e).__name__} instead of ModelError: {e}")
    pytest.fail("no error")


# ---------------------------------------------------------------------------------------------------------------
# Loader: single file, shards, corruption
# ---------------------------------------------------------------------------------------------------------------


def tiny_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(8, 4, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4, generator=g).to(torch.float16),
        "model.layers.1.mlp.up_proj.weight": torch.randn(6, 4, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.ones(4),
        "lm_head.weight": torch.randn(8, 4, generator=g),
    }


SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def write_sharded(model_dir: Path, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    model_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    weight_map = {name: SHARDS[0] if i < 3 else SHARDS[1] for i, name in enumerate(names)}
    for shard in SHARDS:
        save_file({n: tensors[n] for n in names if weight_map[n] == shard}, str(model_dir / shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    return weight_map


def write_single(model_dir: Path, tensors: dict[str, torch.Tensor]) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / "model.safetensors"
    save_file(tensors, str(path))
    return path


def test_sharded_loads_same_tensors_as_single_file(tmp_path: Path) -> None:
    tensors = tiny_tensors()
    write_single(tmp_path / "single", tensors)
    write_sharded(tmp_path / "sharded", tensors)
    assert checkpoint_files(tmp_path / "sharded") == [tmp_path / "sharded" / s for s in SHARDS]
    single = load_tensors(tmp_path / "single")
    sharded = load_tensors(tmp_path / "sharded")
    assert set(single) == set(sharded) == set(tensors)
    for name, t in tensors.items():
        assert sharded[name].dtype == torch.float32
        assert torch.equal(single[name], sharded[name]) and torch.equal(sharded[name], t.float())


def test_keep_filter_and_dtype(tmp_path: Path) -> None:
    tensors = tiny_tensors()
    write_sharded(tmp_path, tensors)
    layer1 = load_tensors(tmp_path, keep=lambda n: ".layers.1." in n or n == "lm_head.weight", dtype=torch.bfloat16)
    assert set(layer1) == {"model.layers.1.mlp.up_proj.weight", "lm_head.weight"}
    assert all(t.dtype == torch.bfloat16 for t in layer1.values())
    assert torch.equal(layer1["model.layers.1.mlp.up_proj.weight"], tensors["model.layers.1.mlp.up_proj.weight"])


def test_unindexed_shards_are_globbed(tmp_path: Path) -> None:
    tensors = tiny_tensors()
    write_sharded(tmp_path, tensors)
    (tmp_path / "model.safetensors.index.json").unlink()
    assert set(load_tensors(tmp_path)) == set(tensors)


def test_index_naming_missing_shard(tmp_path: Path) -> None:
    write_sharded(tmp_path, tiny_tensors())
    (tmp_path / SHARDS[1]).unlink()
    with pytest.raises(ModelError) as info:
        load_tensors(tmp_path)
    assert SHARDS[1] in str(info.value) and "missing" in str(info.value)
    assert SHARDS[0] not in str(info.value)


def test_corrupt_index(tmp_path: Path) -> None:
    write_sharded(tmp_path, tiny_tensors())
    index = tmp_path / "model.safetensors.index.json"
    index.write_text("{not json")
    with pytest.raises(ModelError, match="model.safetensors.index.json"):
        checkpoint_files(tmp_path)
    index.write_text(json.dumps({"metadata": {}}))  # no weight_map
    with pytest.raises(ModelError, match="corrupt index"):
        checkpoint_files(tmp_path)


def test_no_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no \\*.safetensors"):
        load_tensors(tmp_path)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 16])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}!!")


def _huge_header(path: Path) -> None:
    path.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("corrupt", [_truncate, _garbage, _huge_header, _empty],
                         ids=["truncated", "garbage-header", "huge-header-length", "empty"])
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_corrupt_safetensors_names_the_file(tmp_path: Path, corrupt: Any, layout: str) -> None:
    tensors = tiny_tensors()
    if layout == "single":
        bad = write_single(tmp_path, tensors)
    else:
        write_sharded(tmp_path, tensors)
        bad = tmp_path / SHARDS[1]
    corrupt(bad)
    with pytest.raises(ModelError) as info:
        load_tensors(tmp_path)
    assert str(bad) in str(info.value) and "cannot read safetensors" in str(info.value)
