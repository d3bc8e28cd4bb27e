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
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Phi3ForCausalLM": "phi3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
}
# Families whose sliding-window layers are served (the others still refuse a window, see load_config). "llama"
# covers Mistral v0.1, whose every layer slides.
WINDOWED = ("llama", "qwen2", "mixtral", "qwen3", "qwen3_moe", "phi3", "gemma2", "gemma3")
# The transformers config classes' defaults that matter here: a config.json saved as a diff omits them.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen3": {"head_dim": 128, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768},
    "qwen3_moe": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "num_experts": 128,
                  "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": False},
    "phi3": {"max_position_embeddings": 4096, "original_max_position_embeddings": 4096},
    "gemma2": {"head_dim": 256, "rms_norm_eps": 1e-6, "max_position_embeddings": 8192, "tie_word_embeddings": True,
               "sliding_window": 4096, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh"},
    "gemma3": {"head_dim": 256, "rms_norm_eps": 1e-6, "max_position_embeddings": 131072, "tie_word_embeddings": True,
               "sliding_window": 4096, "query_pre_attn_scalar": 256, "rope_theta": 1e6,
               "hidden_activation": "gelu_pytorch_tanh"},
}


class ModelError(ValueError):
    """A checkpoint we cannot serve: unsupported architecture, missing or corrupt file."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything the forward pass needs to know about a checkpoint."""

    arch: str  # llama | qwen2 | mixtral | qwen3 | qwen3_moe | phi3 | gemma2 | gemma3 (Mistral runs as llama)
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
    # Family options; the defaults are Llama's.
    hidden_act: str = "silu"  # silu | gelu_pytorch_tanh (Gemma)
    qk_norm: bool = False  # per-head RMSNorm of q and k before rotary (Qwen3, Gemma 3)
    partial_rotary: float = 1.0  # fraction of head_dim that is rotated (Phi-4-mini: 0.75)
    norm_topk_prob: bool = True  # renormalize the top-k router weights (Mixtral always; Qwen3-MoE per config)
    moe_intermediate_size: int = 0  # the experts' width where it differs from the dense MLP's (Qwen3-MoE)
    dense_layers: tuple[int, ...] = ()  # layers of an MoE model with a dense MLP (Qwen3-MoE mlp_only_layers)
    sliding_window: int = 0  # attention window of the sliding layers (0: none), HF's convention
    layer_types: tuple[str, ...] = ()  # per layer "sliding_attention" | "full_attention"; (): all sliding
    rope_local_theta: float = 0.0  # theta of the sliding layers' rotary (Gemma 3); 0 = rope_theta
    attn_scale: float = 0.0  # query scale; 0 = head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    attn_softcap: float = 0.0  # tanh soft-capping of attention logits (Gemma 2); 0 = none
    final_softcap: float = 0.0  # tanh soft-capping of the output logits (Gemma 2); 0 = none
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def expert_intermediate_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary)

    def window(self, layer: int) -> int:
        """Layer `layer`'s attention window: each query attends to the last `window` positions (0: all)."""
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return 0
        return self.sliding_window


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope(raw: dict[str, Any], arch: str = "llama") -> tuple[float, dict[str, Any] | None]:
    """Return (theta, scaling) from either layout: v4 `rope_theta`+`rope_scaling`, v5 `rope_parameters`."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]  # rope per layer type (Gemma 3): the global layers'; see _local_theta
    if isinstance(params, dict) and params:
        theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
        scaling = params
    else:
        theta = float(raw.get("rope_theta", 10000.0))
        scaling = raw.get("rope_scaling") or {}
    # One normal form for both layouts: the type under "rope_type", theta kept outside.
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "su" or (arch == "phi3" and kind == "yarn"):
        kind = "longrope"  # Phi-3's older names for it (transformers renames them alike)
    if kind == "default":
        return theta, None
    rest = {k: v for k, v in scaling.items() if k not in ("rope_theta", "type", "rope_type", "partial_rotary_factor")}
    if kind == "longrope":
        # Phi-3 keeps the pretraining length outside the rope dict, and there it wins (as in transformers).
        old = raw.get("original_max_position_embeddings") or rest.get("original_max_position_embeddings")
        rest["original_max_position_embeddings"] = old or raw.get("max_position_embeddings", 2048)
    return theta, {**rest, "rope_type": kind}


def _partial_rotary(raw: dict[str, Any]) -> float:
    params = raw.get("rope_parameters")
    params = params if isinstance(params, dict) else {}
    return float(params.get("partial_rotary_factor") or raw.get("partial_rotary_factor") or 1.0)


def _local_theta(raw: dict[str, Any]) -> float:
    """Gemma 3's sliding layers' rotary theta: v5 `rope_parameters.sliding_attention`, v4 `rope_local_base_freq`."""
    params = raw.get("rope_parameters")
    local = params.get("sliding_attention") if isinstance(params, dict) else None
    if isinstance(local, dict):
        if local.get("rope_type", "default") != "default":
            raise ModelError(f"rope scaling type {local['rope_type']!r} on sliding layers is not supported")
        return float(local.get("rope_theta", 10000.0))
    return float(raw.get("rope_local_base_freq", 10000.0))


def _layer_types(arch: str, raw: dict[str, Any], layers: int) -> tuple[str, ...]:
    """Per-layer attention kind: the config's `layer_types`, else each family's default pattern."""
    if raw.get("layer_types"):
        types = tuple(str(t) for t in raw["layer_types"])
        if len(types) != layers or set(types) - {"sliding_attention", "full_attention"}:
            raise ModelError(f"layer_types {list(types)} do not name {layers} full/sliding layers")
        return types
    if arch == "gemma2":  # alternating, local first
        return tuple("sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers))
    if arch == "gemma3":  # every `sliding_window_pattern`-th layer global
        every = int(raw.get("sliding_window_pattern", 6))
        return tuple("sliding_attention" if (i + 1) % every else "full_attention" for i in range(layers))
    if arch in ("qwen2", "qwen3"):  # the first max_window_layers layers stay full
        first = int(raw.get("max_window_layers", 28))
        return tuple("sliding_attention" if i >= first else "full_attention" for i in range(layers))
    return ()  # qwen3_moe, phi3: every layer windowed


def _family(arch: str, raw: dict[str, Any], layers: int, max_position: int) -> dict[str, Any]:
    """The ModelConfig fields that only some families set."""
    out: dict[str, Any] = {"partial_rotary": _partial_rotary(raw)}
    gemma = arch in ("gemma2", "gemma3")
    if arch in ("mixtral", "qwen3_moe"):
        # transformers v5 writes Qwen3-MoE's `num_experts` under Mixtral's name.
        out["num_experts"] = int(raw.get("num_local_experts") or raw["num_experts"])
        out["num_experts_per_tok"] = int(raw["num_experts_per_tok"])
    window = raw.get("sliding_window") or 0
    if not raw.get("use_sliding_window", arch not in ("qwen2", "qwen3", "qwen3_moe")):
        window = 0
    if arch in WINDOWED and 0 < int(window) < max_position:
        out["sliding_window"] = int(window)
        out["layer_types"] = _layer_types(arch, raw, layers)
    if arch in ("qwen3", "qwen3_moe", "gemma3"):
        out["qk_norm"] = True
    if arch == "qwen3_moe":
        out["norm_topk_prob"] = bool(raw.get("norm_topk_prob", False))
        out["moe_intermediate_size"] = int(raw["moe_intermediate_size"])
        step = int(raw.get("decoder_sparse_step", 1))
        only = set(raw.get("mlp_only_layers") or ())
        out["dense_layers"] = tuple(i for i in range(layers) if i in only or (i + 1) % step)
    if gemma:
        out["hidden_act"] = str(raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh")
        out["attn_scale"] = float(raw["query_pre_attn_scalar"]) ** -0.5
        out["attn_softcap"] = float(raw.get("attn_logit_softcapping") or 0.0)
        out["final_softcap"] = float(raw.get("final_logit_softcapping") or 0.0)
    else:
        out["hidden_act"] = str(raw.get("hidden_act", "silu"))
    if arch == "gemma3":
        out["rope_local_theta"] = _local_theta(raw)
    return out


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
    raw = {**_DEFAULTS.get(arch, {}), **raw}
    try:
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        theta, scaling = _rope(raw, arch)
        if arch not in WINDOWED and raw.get("sliding_window") and raw.get("use_sliding_window", arch != "qwen2"):
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
            eos_token_ids=_ids(raw.get("eos_token_id")),
            bos_token_id=raw.get("bos_token_id"),
            name=Path(model_dir).resolve().name,
            raw=raw,
            **_family(arch, raw, int(raw["num_hidden_layers"]), int(raw.get("max_position_embeddings", 2048))),
        )
        rope_inv_freq(cfg)  # fail now on an unsupported or incomplete rope setting
        if is_long_rope(cfg):
            rope_inv_freq(cfg, long=True)
    except KeyError as e:
        raise ModelError(f"{path}: missing field {e.args[0]!r}") from e
    except (TypeError, ValueError, AttributeError) as e:
        if isinstance(e, ModelError):
            raise
        raise ModelError(f"{path}: malformed config ({e})") from e
    if cfg.num_heads % cfg.num_kv_heads:
        raise ModelError(f"{path}: num_attention_heads {heads} not a multiple of num_key_value_heads")
    act = "gelu_pytorch_tanh" if arch in ("gemma2", "gemma3") else "silu"
    if cfg.hidden_act != act:
        raise ModelError(f"{path}: activation {cfg.hidden_act!r} is not supported ({act} only for {arch})")
    return cfg


def rope_inv_freq(cfg: ModelConfig, long: bool = False, local: bool = False) -> torch.Tensor:
    """Inverse rotary frequencies [rotary_dim/2], with linear, llama3 or longrope scaling applied.

    `long`: longrope's long-context factors (else its short ones); `local`: the sliding layers' own plain
    rotary (Gemma 3's `rope_local_base_freq`).
    """
    dim = cfg.rotary_dim
    theta = cfg.rope_local_theta if local and cfg.rope_local_theta else cfg.rope_theta
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv = 1.0 / (theta ** exponent)
    s = None if local else cfg.rope_scaling
    if not s:
        return inv
    kind = s["rope_type"]
    if kind == "longrope":
        factors = [float(f) for f in s["long_factor" if long else "short_factor"]]
        if len(factors) != dim // 2:
            raise ModelError(f"longrope {'long' if long else 'short'}_factor has {len(factors)} entries, "
                             f"the rotary dimension {dim} needs {dim // 2}")
        return 1.0 / (torch.tensor(factors, dtype=torch.float32) * theta ** exponent)
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
    raise ModelError(f"rope scaling type {kind!r} is not supported (default, linear, llama3, longrope)")


def rope_attention_scale(cfg: ModelConfig) -> float:
    """The factor longrope multiplies cos and sin by (1 elsewhere): sqrt(1 + ln(s) / ln(L0)) for
    s = max_position / L0 by default, where L0 is the pretraining length."""
    s = cfg.rope_scaling
    if not s or s["rope_type"] != "longrope":
        return 1.0
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    old = float(s["original_max_position_embeddings"])
    factor = float(s["factor"]) if s.get("factor") is not None else cfg.max_position / old
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old))


def is_long_rope(cfg: ModelConfig) -> bool:
    return bool(cfg.rope_scaling) and cfg.rope_scaling["rope_type"] == "longrope"  # type: ignore[index]
