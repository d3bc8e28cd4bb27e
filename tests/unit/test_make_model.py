"""brigade.model.make: tiny checkpoints transformers loads, canonical tensor names, determinism, tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from brigade.model import make
from brigade.model.make import ARCHS, CHAT_TEMPLATE, make_model, train_tokenizer

FILES = (
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
)
SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|pad|>")


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the tokenizer disk cache out of the developer's home during tests."""
    old = os.environ.get("BRIGADE_CACHE_DIR")
    os.environ["BRIGADE_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("BRIGADE_CACHE_DIR", None)
    else:
        os.environ["BRIGADE_CACHE_DIR"] = old


# The first families; the later ones (make_families) are checked in test_model_families.
BASE_ARCHS = [a for a in ARCHS if a in ("llama", "qwen2", "mixtral")]


@pytest.fixture(scope="module", params=BASE_ARCHS)
def made(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    arch = request.param
    return arch, make_model(arch, "tiny", tmp_path_factory.mktemp(arch), seed=0)


def _load(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, "checkpoint and transformers' model disagree"
    return model.eval()


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _expected_names(arch: str, layers: int = 2, experts: int = 4) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if arch != "qwen2":  # qwen2 tiny is tied: no lm_head tensor
        names.add("lm_head.weight")
    for i in range(layers):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        names |= {f"{p}self_attn.{x}_proj.weight" for x in "qkvo"}
        if arch == "qwen2":
            names |= {f"{p}self_attn.{x}_proj.bias" for x in "qkv"}
        if arch == "mixtral":
            names.add(p + "block_sparse_moe.gate.weight")
            moe = p + "block_sparse_moe."
            names |= {f"{moe}experts.{e}.w{w}.weight" for e in range(experts) for w in (1, 2, 3)}
        else:
            names |= {f"{p}mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
    return names


def test_unknown_arch_or_size_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown arch"):
        make_model("gpt2", "tiny", tmp_path / "a")
    with pytest.raises(ValueError, match="unknown size"):
        make_model("llama", "huge", tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_files_and_tensor_names(made: tuple[str, Path]) -> None:
    arch, path = made
    for name in FILES:
        assert (path / name).is_file(), name
    tensors = _tensors(path)
    assert set(tensors) == _expected_names(arch)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert tensors["model.embed_tokens.weight"].shape == (1024, 64)
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)  # 2 KV heads x 16
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_config_fields(made: tuple[str, Path]) -> None:
    arch, path = made
    cfg = json.loads((path / "config.json").read_text())
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    assert cfg["model_type"] == arch
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (64, 128, 2)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (4, 2)
    assert cfg.get("head_dim", 16) == 16
    assert cfg["max_position_embeddings"] == 512 and cfg["rms_norm_eps"] == 1e-5
    assert cfg["vocab_size"] == tok.get_vocab_size() == 1024
    assert cfg["bos_token_id"] == ids["<|begin_of_text|>"]
    assert cfg["eos_token_id"] == [ids["<|end_of_text|>"], ids["<|im_end|>"]]
    assert cfg["pad_token_id"] == ids["<|pad|>"]
    assert len(set(ids.values())) == 5
    gen = json.loads((path / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (
        cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]
    )
    rope = cfg["rope_parameters"]
    if arch == "llama":
        assert rope == {
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        }
        assert cfg["tie_word_embeddings"] is False and cfg["attention_bias"] is False
    elif arch == "qwen2":
        assert rope["rope_theta"] == 1e6 and rope["rope_type"] == "default"
        assert cfg["tie_word_embeddings"] is True and cfg["use_sliding_window"] is False
    else:
        assert rope["rope_theta"] == 1e6 and rope["rope_type"] == "default"
        assert (cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (4, 2)
        assert cfg["router_jitter_noise"] == 0.0
        assert cfg["sliding_window"] is None and cfg["tie_word_embeddings"] is False


def test_transformers_loads_and_logits_are_spread(made: tuple[str, Path]) -> None:
    arch, path = made
    model = _load(path)
    tensors = _tensors(path)
    # Loaded weights are the file's (lm_head shares the embedding when tied).
    head = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])
    assert torch.equal(model.lm_head.weight, head)
    with torch.no_grad():
        logits = model(torch.tensor([[5, 300, 17, 900, 42, 7]])).logits[0, -1]
    # Random-init models with 0.02 scales give near-tied logits; exact-greedy tests need a real spread.
    assert logits.std() > 1.0
    top2 = logits.topk(2).values
    assert (top2[0] - top2[1]) > 1e-3


def test_llama3_rope_scaling_changes_frequencies(tmp_path: Path) -> None:
    model = _load(make_model("llama", "tiny", tmp_path))
    inv_freq = model.model.rotary_emb.inv_freq
    plain = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    assert inv_freq.shape == plain.shape
    assert torch.allclose(inv_freq[0], plain[0])  # highest frequency: untouched
    assert torch.allclose(inv_freq[-1], plain[-1] / 8)  # lowest: divided by the factor
    assert (~torch.isclose(inv_freq, plain)).sum() >= 4


def test_mixtral_expert_names_mean_what_mixtral_means(tmp_path: Path) -> None:
    """w1 = gate, w3 = up, w2 = down; softmax router, top-2 renormalised; as transformers' block computes."""
    path = make_model("mixtral", "tiny", tmp_path)
    model = _load(path)
    t = _tensors(path)
    p = "model.layers.1.block_sparse_moe."
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(3))
    probs = torch.softmax(x @ t[p + "gate.weight"].T, dim=-1)
    top_w, top_i = probs.topk(2, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    want = torch.zeros_like(x)
    for row in range(x.shape[0]):
        for w, e in zip(top_w[row], top_i[row].tolist(), strict=True):
            gate = torch.nn.functional.silu(x[row] @ t[f"{p}experts.{e}.w1.weight"].T)
            up = x[row] @ t[f"{p}experts.{e}.w3.weight"].T
            want[row] += w * ((gate * up) @ t[f"{p}experts.{e}.w2.weight"].T)
    with torch.no_grad():
        got = model.model.layers[1].mlp(x[None])[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path) -> None:
    a = make_model("mixtral", "tiny", tmp_path / "a", seed=0)
    b = make_model("mixtral", "tiny", tmp_path / "b", seed=0)
    c = make_model("mixtral", "tiny", tmp_path / "c", seed=1)
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_tokenizer_training_is_deterministic() -> None:
    # The made checkpoints' tokenizer came from the cache; a fresh training must reproduce it exactly.
    assert train_tokenizer(1024).to_str(pretty=True) == make.get_tokenizer(1024).to_str(pretty=True)


TEXTS = (
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n\treturn x ** 2  # trailing  spaces   \n\n",
    "Grüße aus Köln — naïve café, 東京タワー, Привет, 🙂🚀 emoji!",
    "  leading spaces, 12345 digits, and <tags>&amp;",
)


def test_tokenizer_round_trips_and_adds_no_bos(made: tuple[str, Path]) -> None:
    from transformers import AutoTokenizer

    _, path = made
    hf = AutoTokenizer.from_pretrained(path)
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert len(hf) == 1024
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>")
    for text in TEXTS:
        ids = hf.encode(text)
        assert hf.decode(ids) == text
        assert ids == raw.encode(text).ids  # transformers and tokenizer.json agree (qwen2 gets its own class)
        assert hf.bos_token_id not in ids
    for special in SPECIALS:
        assert hf.encode(special) == [raw.token_to_id(special)]


def test_chat_template_is_chatml(made: tuple[str, Path]) -> None:
    from transformers import AutoTokenizer

    _, path = made
    hf = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ✓"}]
    want = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi ✓<|im_end|>\n"
    assert hf.apply_chat_template(messages, tokenize=False) == want
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        want + "<|im_start|>assistant\n"
    )
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert hf.apply_chat_template(parts, tokenize=False) == "<|im_start|>user\nab<|im_end|>\n"
    # The template lives in tokenizer_config.json, where non-transformers loaders look for it.
    assert json.loads((path / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE


def test_vocab_override(tmp_path: Path) -> None:
    """--vocab sets the tokenizer's and the model's vocabulary together (benchmarks pick the LM head's width)."""
    out = make_model("llama", "tiny", tmp_path / "m", vocab=512)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 512
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_shape()[0] == 512
    with pytest.raises(ValueError, match="vocab"):
        make_model("llama", "tiny", tmp_path / "bad", vocab=8)
