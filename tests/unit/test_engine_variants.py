"""Other families and backends through the same engine: Mistral, v4 config layout, Triton attention."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from brigade.engine.engine import Engine, EngineConfig
from brigade.engine.sampling import SamplingParams

PROMPTS = ["def fibonacci(n):", "The quick brown fox", "import os\nimport sys\n", "Hello"]


def _hf_greedy(model_dir: Path, prompts: list[str], n: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def _greedy(model_dir: Path, prompts: list[str], n: int, **kw: object) -> list[list[int]]:
    eng = Engine(EngineConfig(model=str(model_dir), num_blocks=128, **kw))  # type: ignore[arg-type]
    return [o.token_ids for o in eng.generate(prompts, SamplingParams(max_tokens=n, min_tokens=n, temperature=0))]


def test_mistral_v4_layout_matches_transformers(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """A Mistral checkpoint whose config.json uses the transformers v4 keys (rope_theta, torch_dtype)."""
    d = tmp_path / "mistral"
    shutil.copytree(tiny_models["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.pop("rope_scaling", None)
    cfg.pop("dtype", None)
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", rope_theta=10000.0,
               torch_dtype="float32", sliding_window=None)
    (d / "config.json").write_text(json.dumps(cfg))
    assert _greedy(d, PROMPTS, 24) == _hf_greedy(d, PROMPTS, 24)


def test_llama_v4_rope_scaling_layout_matches(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """The same llama3-scaled checkpoint with its config rewritten in the v4 layout gives the same tokens."""
    d = tmp_path / "llama-v4"
    shutil.copytree(tiny_models["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (d / "config.json").write_text(json.dumps(cfg))
    assert rope["rope_type"] == "llama3"
    assert _greedy(d, PROMPTS, 16) == _greedy(tiny_models["llama"], PROMPTS, 16)


def test_triton_attention_backend_matches_torch(tiny_models: dict[str, Path]) -> None:
    """The engine with the Triton decode kernel (interpreted on CPU) produces the torch path's tokens."""
    from brigade.kernels import triton_attention

    if not triton_attention.available():
        pytest.skip("triton cannot run here (no CUDA and not in interpreter mode)")
    prompts = PROMPTS[:2]
    assert _greedy(tiny_models["llama"], prompts, 6, attention="triton") == _greedy(
        tiny_models["llama"], prompts, 6, attention="torch")
