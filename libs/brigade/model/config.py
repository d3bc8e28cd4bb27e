"""The model's shape, read from a Hugging Face `config.json` (transformers v4 and v5 layouts)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MixtralForCausalLM": "mixtral",
}


class ModelError(ValueError):
    """A checkpoint we cannot serve: unsupported architecture, missing or corrupt file."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything the forward pass needs to know about a checkpoint."""

    arch: str  # llama | qwen2 | mixtral (Mistral runs as llama)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    attention_bias: bool
    num_experts: int = 0
    num_experts_per_tok: int = 0
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    name: str = ""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Return (theta, scaling) from either layout: v4 `rope_theta`+`rope_scaling`, v5 `rope_parameters`."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
        scaling = params
    else:
        theta = float(raw.get("rope_theta", 10000.0))
        scaling = raw.get("rope_scaling") or {}
    # One normal form for both layouts: the type under "rope_type", theta kept outside.
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    rest = {k: v for k, v in scaling.items() if k not in ("rope_theta", "type", "rope_type")}
    return theta, {**rest, "rope_type": kind}


def load_config(model_dir: str | Path) -> ModelConfig:
    """Parse `config.json` in `model_dir`; raise ModelError naming what is wrong."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelError(f"{model_dir}: no config.json (is this a Hugging Face model directory?)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    archs = raw.get("architectures") or []
    arch = next((SUPPORTED[a] for a in archs if a in SUPPORTED), None)
    if arch is None:
        raise ModelError(
            f"{path}: unsupported architecture {archs or raw.get('model_type')!r}; "
            f"supported: {', '.join(sorted(SUPPORTED))}"
        )
    try:
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        theta, scaling = _rope(raw)
        if raw.get("sliding_window") and raw.get("use_sliding_window", arch != "qwen2"):
            window = int(raw["sliding_window"])
            if window < int(raw.get("max_position_embeddings", 0)):
                raise ModelError(f"{path}: sliding-window attention ({window}) is not supported")
        cfg = ModelConfig(
            arch=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            max_position=int(raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or bool(raw.get("attention_bias", False)),
            num_experts=int(raw.get("num_local_experts", 0)) if arch == "mixtral" else 0,
            num_experts_per_tok=int(raw.get("num_experts_per_tok", 0)) if arch == "mixtral" else 0,
            eos_token_ids=_ids(raw.get("eos_token_id")),
            bos_token_id=raw.get("bos_token_id"),
            name=Path(model_dir).resolve().name,
            raw=raw,
        )
        rope_inv_freq(cfg)  # fail now on an unsupported or incomplete rope setting
    except KeyError as e:
        raise ModelError(f"{path}: missing field {e.args[0]!r}") from e
    except (TypeError, ValueError, AttributeError) as e:
        if isinstance(e, ModelError):
            raise
        raise ModelError(f"{path}: malformed config ({e})") from e
    if cfg.num_heads % cfg.num_kv_heads:
        raise ModelError(f"{path}: num_attention_heads {heads} not a multiple of num_key_value_heads")
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelError(f"{path}: activation {raw.get('hidden_act')!r} is not supported (silu only)")
    return cfg


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse rotary frequencies [head_dim/2], with linear or llama3 scaling applied."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = cfg.rope_scaling
    if not s:
        return inv
    kind = s["rope_type"]
    if kind == "linear":
        return inv / float(s["factor"])
    if kind == "llama3":
        factor = float(s["factor"])
        low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_len = float(s["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ModelError(f"rope scaling type {kind!r} is not supported (default, linear, llama3)")
