"""Make small random-weight HF checkpoints (Llama, Qwen2, Mixtral, and the families in `make_families`: Qwen3,
Qwen3-MoE, Phi-3, Gemma 2 and 3) with a real trained BPE tokenizer.

Used by `brigade make-model`, by tests and benchmarks, and for the built-in `demo` model. The output is a
plain Hugging Face checkpoint directory that `transformers` loads, with tensors in the canonical published
layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sysconfig
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from brigade.model.make_families import ARCH_CLASS, FAMILY_ARCHS, family_config, family_layout, family_spec

if TYPE_CHECKING:
    from transformers import PretrainedConfig

ARCHS: tuple[str, ...] = ("llama", "qwen2", "mixtral", *FAMILY_ARCHS)
SIZES: tuple[str, ...] = ("tiny", "bench")

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
# Listed first in the trainer, so they take ids 0..4 in this order.
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, IM_START, IM_END, PAD_TOKEN)

# ChatML. Content may also be a list of OpenAI-style parts; only text parts are rendered.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2's split (GPT-4 style): letters runs, single digits, punctuation runs, newlines, spaces.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# Bump when the corpus recipe or trainer settings change, so disk-cached tokenizers are not reused.
_TOKENIZER_RECIPE = "bpe-qwen2-pipeline-v1"

_ARCH_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM",
               **ARCH_CLASS}


@dataclass(frozen=True)
class ModelSpec:
    """Everything that determines a made checkpoint's shape and config."""

    arch: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    max_positions: int
    vocab: int
    rope_theta: float
    rope_scaling: dict[str, float | int | str] | None = None
    tied: bool = False
    qkv_bias: bool = False
    experts: int = 0
    experts_per_tok: int = 0
    rms_norm_eps: float = 1e-5
    head_size: int = 0  # head_dim where it is not hidden / heads
    moe_intermediate: int = 0  # the experts' width where it is not `intermediate`
    dense_layers: tuple[int, ...] = ()  # dense-MLP layers of an MoE model

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden // self.heads


def model_spec(arch: str, size: str) -> ModelSpec:
    """The spec for an arch/size pair; ValueError for unknown names."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: expected one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: expected one of {', '.join(SIZES)}")
    if size == "tiny":
        base = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, max_positions=512, vocab=1024)
        if arch in FAMILY_ARCHS:
            return family_spec(arch, size, ModelSpec, base)
        if arch == "llama":
            # original_max_position_embeddings=64 puts the llama3 wavelength cut-offs (16 and 64 positions)
            # inside head_dim 16's band, so the scaling really changes most frequencies.
            scaling = {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
            return ModelSpec(arch, rope_theta=10000.0, rope_scaling=scaling, **base)
        if arch == "qwen2":
            return ModelSpec(arch, rope_theta=1e6, tied=True, qkv_bias=True, **base)
        return ModelSpec(arch, rope_theta=1e6, experts=4, experts_per_tok=2, **base)
    base = dict(
        hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=2, max_positions=8192, vocab=32000,
        rope_theta=500000.0,
    )
    if arch in FAMILY_ARCHS:
        return family_spec(arch, size, ModelSpec, {k: v for k, v in base.items() if k != "rope_theta"})
    if arch == "llama":
        return ModelSpec(arch, **base)
    if arch == "qwen2":
        return ModelSpec(arch, tied=True, qkv_bias=True, **base)
    return ModelSpec(arch, experts=8, experts_per_tok=2, **base)


# ---------------------------------------------------------------- tokenizer


def cache_dir() -> Path:
    """Brigade's cache root: $BRIGADE_CACHE_DIR, else ~/.cache/brigade."""
    env = os.environ.get("BRIGADE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "brigade"


def tokenizer_corpus() -> list[str]:
    """Training text that ships with every CPython: pydoc topics, then stdlib sources in sorted path order."""
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        parts = path.relative_to(root).parts
        # Third-party packages differ per machine; test suites are mostly odd strings, not code people write.
        if parts[0] == "site-packages" or "test" in parts or "tests" in parts:
            continue
        try:
            texts.append(path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError):
            continue  # a few legacy-encoded files; skipping them is deterministic
    return texts


def train_tokenizer(vocab_size: int, corpus: list[str] | None = None) -> Tokenizer:
    """Train a byte-level BPE (no cache). Deterministic: same corpus and size give the same tokenizer.json."""
    tok = Tokenizer(models.BPE())
    # Qwen2's pipeline exactly: transformers 5 forces its own Qwen2Tokenizer pipeline on every qwen2
    # checkpoint whatever tokenizer.json says, so using it for all archs keeps transformers and
    # tokenizer.json in step.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # No template: nothing (no BOS) is added on encode, as with Qwen.
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols up front, so any UTF-8 text encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus if corpus is not None else tokenizer_corpus(), trainer)
    if tok.get_vocab_size() < vocab_size:
        warnings.warn(
            f"tokenizer corpus reached only {tok.get_vocab_size()} of {vocab_size} tokens; using that",
            stacklevel=2,
        )
    return tok


@lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    """Serialized trained tokenizer, cached in-process and on disk (training 32k merges takes seconds)."""
    import tokenizers  # for its version only

    corpus = tokenizer_corpus()
    h = hashlib.sha256(f"{_TOKENIZER_RECIPE}|{tokenizers.__version__}|{vocab_size}".encode())
    for text in corpus:
        h.update(text.encode("utf-8"))
        h.update(b"\0")
    path = cache_dir() / "tokenizers" / f"bpe-{vocab_size}-{h.hexdigest()[:16]}.json"
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        pass
    text = train_tokenizer(vocab_size, corpus).to_str(pretty=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tok-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)  # atomic: a racing reader sees the old or the whole new file
    except OSError as e:  # a read-only home must not stop make-model
        warnings.warn(f"could not cache tokenizer at {path}: {e}", stacklevel=2)
    return text


def get_tokenizer(vocab_size: int) -> Tokenizer:
    """A fresh `tokenizers.Tokenizer` of the given size (trained once per process, cached on disk)."""
    return Tokenizer.from_str(_tokenizer_json(vocab_size))


def _write_tokenizer(out: Path, vocab_size: int, max_positions: int) -> dict[str, int]:
    """Write tokenizer.json + tokenizer_config.json; return the special-token ids."""
    text = _tokenizer_json(vocab_size)
    (out / "tokenizer.json").write_text(text, encoding="utf-8")
    tok = Tokenizer.from_str(text)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    cfg = {
        # The generic class: a model-specific one (LlamaTokenizer, Qwen2Tokenizer) may rebuild the pipeline.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "add_bos_token": False,
        "add_eos_token": False,
        # Cleanup would turn " ." into "." and break decode(encode(s)) == s.
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_positions,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return ids


# ---------------------------------------------------------------- weights and config


def make_state_dict(spec: ModelSpec, seed: int) -> dict[str, torch.Tensor]:
    """Random float32 weights under canonical HF names, deterministic for `seed`.

    Scales are fan-in based (unit-variance activations) rather than HF's 0.02, and the output embedding is
    large enough that last-position logits have std around 3: random models otherwise give near-tied
    logits, and exact-greedy comparisons between implementations flip on rounding noise.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float32) * std

    def norm(n: int) -> torch.Tensor:
        # Not all ones, so a loader that ignores norm weights is caught.
        return 1.0 + rand(n, std=0.1)

    h, inter, hd = spec.hidden, spec.intermediate, spec.head_dim
    q_out, kv_out = spec.heads * hd, spec.kv_heads * hd
    sd: dict[str, torch.Tensor] = {}
    out_std = 3.0 / h**0.5
    # Tied: one matrix is both, so it takes the output scale.
    sd["model.embed_tokens.weight"] = rand(spec.vocab, h, std=out_std if spec.tied else 1.0)
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = norm(h)
        sd[p + "self_attn.q_proj.weight"] = rand(q_out, h, std=h**-0.5)
        sd[p + "self_attn.k_proj.weight"] = rand(kv_out, h, std=h**-0.5)
        sd[p + "self_attn.v_proj.weight"] = rand(kv_out, h, std=h**-0.5)
        if spec.qkv_bias:
            sd[p + "self_attn.q_proj.bias"] = rand(q_out, std=0.1)
            sd[p + "self_attn.k_proj.bias"] = rand(kv_out, std=0.1)
            sd[p + "self_attn.v_proj.bias"] = rand(kv_out, std=0.1)
        sd[p + "self_attn.o_proj.weight"] = rand(h, q_out, std=q_out**-0.5)
        sd[p + "post_attention_layernorm.weight"] = norm(h)
        if spec.experts and i not in spec.dense_layers:
            m, ei = p + "block_sparse_moe.", spec.moe_intermediate or inter
            sd[m + "gate.weight"] = rand(spec.experts, h, std=h**-0.5)
            for e in range(spec.experts):
                # Mixtral's names: w1 = gate, w3 = up, w2 = down.
                sd[f"{m}experts.{e}.w1.weight"] = rand(ei, h, std=h**-0.5)
                sd[f"{m}experts.{e}.w2.weight"] = rand(h, ei, std=ei**-0.5)
                sd[f"{m}experts.{e}.w3.weight"] = rand(ei, h, std=h**-0.5)
        else:
            sd[p + "mlp.gate_proj.weight"] = rand(inter, h, std=h**-0.5)
            sd[p + "mlp.up_proj.weight"] = rand(inter, h, std=h**-0.5)
            sd[p + "mlp.down_proj.weight"] = rand(h, inter, std=inter**-0.5)
    # Tied: the residual keeps the input token's own embedding, so E @ norm(h) favours that token and greedy
    # decoding collapses into repeating one token. A zero-mean final norm weight cancels that self-similarity.
    sd["model.norm.weight"] = rand(h, std=1.0) if spec.tied else norm(h)
    if not spec.tied:
        sd["lm_head.weight"] = rand(spec.vocab, h, std=out_std)
    return family_layout(spec, sd, rand) if spec.arch in FAMILY_ARCHS else sd


def make_config(spec: ModelSpec, token_ids: dict[str, int]) -> PretrainedConfig:
    """The transformers config object for a spec (saved in transformers' v5 layout)."""
    from transformers import LlamaConfig, MixtralConfig, Qwen2Config

    rope: dict[str, float | int | str] = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling:
        rope = {**spec.rope_scaling, "rope_theta": spec.rope_theta}
    common = dict(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions,
        rms_norm_eps=spec.rms_norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=spec.tied,
        bos_token_id=token_ids[BOS_TOKEN],
        eos_token_id=[token_ids[EOS_TOKEN], token_ids[IM_END]],
        pad_token_id=token_ids[PAD_TOKEN],
    )
    if spec.arch in FAMILY_ARCHS:
        cfg = family_config(spec, common)
    elif spec.arch == "llama":
        cfg = LlamaConfig(head_dim=spec.head_dim, attention_bias=False, mlp_bias=False, **common)
    elif spec.arch == "qwen2":
        # Qwen2Config has no head_dim field (always hidden / heads); q/k/v bias is built into the arch.
        cfg = Qwen2Config(use_sliding_window=False, sliding_window=None, **common)
    else:
        cfg = MixtralConfig(
            head_dim=spec.head_dim,
            num_local_experts=spec.experts,
            num_experts_per_tok=spec.experts_per_tok,
            router_jitter_noise=0.0,
            sliding_window=None,
            **common,
        )
    cfg.architectures = [_ARCH_CLASS[spec.arch]]
    cfg.dtype = "float32"
    return cfg


def make_model(arch: str, size: str, out: str | Path, seed: int = 0, vocab: int | None = None) -> Path:
    """Write an HF checkpoint for `arch`/`size` with random weights from `seed` into `out`; return its path.

    `vocab` overrides the size's vocabulary (the tokenizer is trained to it): the LM head's width decides much
    of a CPU step's cost, so benchmarks pick it to match the model they stand in for.

    Files: config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json.
    The same arguments always give byte-identical files.
    """
    from transformers import GenerationConfig

    spec = model_spec(arch, size)  # validates before touching the disk
    if vocab is not None:
        if vocab < 256:
            raise ValueError(f"vocab must be at least 256, got {vocab}")
        spec = dataclasses.replace(spec, vocab=vocab)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = _write_tokenizer(out, spec.vocab, spec.max_positions)
    vocab = get_tokenizer(spec.vocab).get_vocab_size()
    if vocab != spec.vocab:  # corpus fell short of the target: the model follows the tokenizer
        spec = dataclasses.replace(spec, vocab=vocab)
    cfg = make_config(spec, ids)
    cfg.to_json_file(out / "config.json", use_diff=True)
    gen = GenerationConfig(
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id
    )
    gen.to_json_file(out / "generation_config.json", use_diff=True)
    # Written by hand rather than via save_pretrained: names and bytes then depend on this file alone.
    save_file(make_state_dict(spec, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
