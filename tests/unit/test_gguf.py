"""GGUF files converted to HF checkpoints: same model as transformers' own GGUF loading, cached, race-safe."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from brigade.engine.engine import Engine, EngineConfig
from brigade.engine.sampling import SamplingParams
from brigade.model import gguf as bgguf
from brigade.model.config import ModelError, load_config
from brigade.model.resolve import resolve, resolve_model
from brigade.model.tokenizer import Tokenizer

NEW_TOKENS = 24
PROMPTS = ["def fibonacci(n):", "The quick brown fox", "import os\nimport sys\n"]
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0.0)


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BRIGADE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny llama (untied, permuted q/k) and qwen2 (tied, q/k/v bias) GGUFs with Q8_0 weights."""
    from gguf_data import write_gguf

    from brigade.model.make import make_model

    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for arch in ("llama", "qwen2"):
        folder = root / arch
        folder.mkdir(parents=True)
        src = make_model(arch, "tiny", root / f"{arch}-src", seed=1)
        out[arch] = write_gguf(src, folder / f"tiny-{arch}.Q8_0.gguf")
    return out


def _hf_greedy(gguf: Path, prompts: list[list[int]]) -> list[list[int]]:
    """transformers' own GGUF loading (it needs accelerate for that, Brigade's conversion does not)."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    out = []
    for ids in prompts:
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=0)
        out.append(gen[0, len(ids):].tolist())
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_converted_gguf_matches_transformers(ggufs: dict[str, Path], arch: str, _cache: Path) -> None:
    from transformers import AutoTokenizer

    path = resolve_model(ggufs[arch])
    assert path.parent == _cache / "gguf" and path.name.startswith(f"tiny-{arch}.Q8_0-")
    raw = json.loads((path / "config.json").read_text())
    assert raw["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]]
    assert "quantization_config" not in raw
    cfg = load_config(path)
    assert cfg.arch == arch and cfg.tie_word_embeddings == (arch == "qwen2")
    tok = Tokenizer(path)
    want = AutoTokenizer.from_pretrained(str(ggufs[arch].parent), gguf_file=ggufs[arch].name)
    prompts = [tok.encode(p) for p in PROMPTS]
    assert prompts == [want.encode(p) for p in PROMPTS]
    assert tok.chat([{"role": "user", "content": "hi"}]) == want.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True, return_dict=False)
    got = Engine(EngineConfig(model=str(path), num_blocks=64)).generate(prompts, GREEDY)
    assert [c.token_ids for c in got] == _hf_greedy(ggufs[arch], prompts)


def test_second_resolve_is_a_cache_hit(ggufs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    first = resolve(ggufs["qwen2"])
    assert first.name == "tiny-qwen2.Q8_0"
    stamp = (first.path / "model.safetensors").stat().st_mtime_ns

    def fail(*a: object, **k: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(bgguf, "convert_gguf", fail)
    assert resolve(ggufs["qwen2"]) == first
    assert (first.path / "model.safetensors").stat().st_mtime_ns == stamp
    # A directory holding the one GGUF resolves to the same conversion.
    assert resolve_model(ggufs["qwen2"].parent) == first.path


def test_key_follows_file_and_dtype(ggufs: dict[str, Path]) -> None:
    a = bgguf.cache_name(ggufs["qwen2"], "float32")
    assert bgguf.cache_name(ggufs["qwen2"], "bfloat16") != a
    bf16 = resolve_model(ggufs["qwen2"], dtype="bfloat16")
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    assert bf16 != resolve_model(ggufs["qwen2"], dtype="auto")  # auto stores float32
    st = ggufs["qwen2"].stat()
    os.utime(ggufs["qwen2"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # "rewritten": a new entry
    try:
        assert bgguf.cache_name(ggufs["qwen2"], "float32") != a
    finally:
        os.utime(ggufs["qwen2"], ns=(st.st_atime_ns, st.st_mtime_ns))


def test_concurrent_resolves_convert_once(ggufs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    real = bgguf.convert_gguf

    def slow(gguf: Path, out: Path, dtype: str = "float32") -> None:
        calls.append(out)
        time.sleep(0.3)  # hold the lock long enough for the other thread to queue on it
        real(gguf, out, dtype)

    monkeypatch.setattr(bgguf, "convert_gguf", slow)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model(ggufs["llama"]))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]
    assert load_config(results[0]).arch == "llama"
    assert not [p for p in results[0].parent.iterdir() if p.is_dir() and p.name.startswith(".")]  # no temp left


def test_broken_entry_is_replaced(ggufs: dict[str, Path], _cache: Path) -> None:
    final = _cache / "gguf" / bgguf.cache_name(ggufs["qwen2"], "float32")
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # an interrupted copy from an older layout: no marker
    assert resolve_model(ggufs["qwen2"]) == final
    assert load_config(final).arch == "qwen2"


def test_bad_gguf_is_a_model_error(tmp_path: Path) -> None:
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelError, match="junk.gguf"):
        resolve_model(bad)
    assert not (tmp_path / "cache" / "gguf").exists() or not any(
        p for p in (tmp_path / "cache" / "gguf").iterdir() if p.is_dir())


def test_gguf_only_hub_repo_offline(ggufs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hub_data import hub_cache

    files = {"tiny.Q8_0.gguf": ggufs["qwen2"], "tiny.F32.gguf": ggufs["llama"], "README.md": ggufs["qwen2"]}
    hub_cache(tmp_path / "hub", "acme/tiny-GGUF", files)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    got = resolve("acme/tiny-GGUF:Q8_0")
    assert got.name == "acme/tiny-GGUF:Q8_0" and got.path.name.startswith("tiny.Q8_0-")
    assert load_config(got.path).arch == "qwen2"
    with pytest.raises(ModelError, match=r"holds 2 .gguf files .*acme/tiny-GGUF:QUANT"):
        resolve("acme/tiny-GGUF")
