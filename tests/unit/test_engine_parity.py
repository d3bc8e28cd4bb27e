"""The engine against Hugging Face transformers on the same checkpoints (CPU, float32)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch

from brigade.engine.engine import Engine, EngineConfig
from brigade.engine.sampling import SamplingParams

ARCHS = ["llama", "qwen2", "mixtral", "qwen3", "qwen3_moe", "phi3", "gemma2", "gemma3"]
REFERENCE_ONLY = {"gemma2", "gemma3"}  # no fast path: fast_path=True runs the reference one
NEW_TOKENS = 48
PREFIX = "You are a helpful assistant that answers questions about the Python standard library. "
PROMPTS = [
    "def fibonacci(n):",
    "The quick brown fox jumps over the lazy dog.",
    "import os\nimport sys\n\nclass Config:",
    "Hello",
    "What is the capital of France? Answer:",
    "for i in range(10):\n    print(",
    "Once upon a time, in a land far away,",
    "SELECT name FROM users WHERE",
    "1, 2, 3, 4, 5, 6, 7, 8,",
    "The exception is raised when a mapping key is not found in the set of existing keys.",
    PREFIX + "How do I read a file?",
    PREFIX + "What does functools.cache do?",
]
# min_tokens masks EOS like HF min_new_tokens does, so both run the full 48 tokens.
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0.0)


@cache
def _hf(model_dir: Path) -> tuple[object, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@cache
def _reference(model_dir: Path) -> list[list[int]]:
    """HF greedy continuations of every prompt (EOS masked by min_new_tokens)."""
    model, tok = _hf(model_dir)
    out = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=0)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def _engine(model_dir: Path, **kw: object) -> Engine:
    return Engine(EngineConfig(model=str(model_dir), **kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(tiny_models: dict[str, Path], arch: str, fast: bool) -> None:
    ref = _reference(tiny_models[arch])
    eng = _engine(tiny_models[arch], num_blocks=512, fast_path=fast)
    assert eng.model.fast is (fast and arch not in REFERENCE_ONLY)
    outs = eng.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == ref


@pytest.mark.parametrize("arch", ARCHS)
def test_first_step_logits_close(tiny_models: dict[str, Path], arch: str) -> None:
    model, tok = _hf(tiny_models[arch])
    eng = _engine(tiny_models[arch], num_blocks=64)
    for prompt in PROMPTS[:4]:
        ids = tok(prompt).input_ids
        eng.add_request(prompt, ids, GREEDY)
        logits, _ = eng.runner.run(eng.scheduler.schedule())
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0, -1]
        rel = (logits[0] - want).abs().max() / want.abs().max()
        assert rel <= 1e-4, rel
        eng.abort(prompt)
    assert eng.pool.num_used == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_cache_hits_change_nothing(tiny_models: dict[str, Path], arch: str) -> None:
    ref = _reference(tiny_models[arch])
    eng = _engine(tiny_models[arch], num_blocks=512)
    eng.generate(PROMPTS[-2:], GREEDY)  # warms the shared system prefix (and both prompts)
    hits = eng.pool.stats.prefix_hits
    outs = eng.generate(PROMPTS, GREEDY)
    assert eng.pool.stats.prefix_hits - hits >= 2 * 16, "the second pass should be served from cache"
    assert [o.token_ids for o in outs] == ref
    assert any(o.num_cached_tokens > 0 for o in outs)


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_changes_nothing(tiny_models: dict[str, Path], arch: str) -> None:
    ref = _reference(tiny_models[arch])
    eng = _engine(tiny_models[arch], num_blocks=512, max_num_batched_tokens=5)
    outs = eng.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == ref


@pytest.mark.parametrize("arch", ARCHS)
def test_preemption_changes_nothing(tiny_models: dict[str, Path], arch: str) -> None:
    ref = _reference(tiny_models[arch])
    # 12 prompts of ~5-30 tokens + 48 new ones need ~60 blocks at once; 14 force preemption.
    eng = _engine(tiny_models[arch], num_blocks=14, max_num_batched_tokens=64)
    outs = eng.generate(PROMPTS, GREEDY)
    assert eng.pool.stats.preemptions > 0
    assert [o.token_ids for o in outs] == ref
    assert eng.pool.num_used == 0


def test_no_prefix_caching_no_chunking_matches(tiny_models: dict[str, Path]) -> None:
    ref = _reference(tiny_models["llama"])
    eng = _engine(tiny_models["llama"], num_blocks=512, prefix_caching=False, chunked_prefill=False)
    outs = eng.generate(PROMPTS + PROMPTS[-2:], GREEDY)
    assert [o.token_ids for o in outs] == ref + ref[-2:]
    assert eng.pool.stats.prefix_hits == 0
