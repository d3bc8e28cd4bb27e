"""A tiny Mistral v0.1-style checkpoint (every layer slides, window 16) served end to end against transformers:
prompts and generations far longer than the window, chunked prefill, prefix caching, preemption, and the KV
blocks that left the window going back to the pool."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch

from brigade.engine.engine import Engine, EngineConfig
from brigade.engine.sampling import SamplingParams
from brigade.kv.manager import NULL_BLOCK

WINDOW, BLOCK = 16, 4
NEW = 40
GREEDY = SamplingParams(max_tokens=NEW, min_tokens=NEW, temperature=0.0)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama checkpoint recast as Mistral (same tensor names) with a 16-token window."""
    from brigade.model.make import make_model

    out = make_model("llama", "tiny", tmp_path_factory.mktemp("mistral") / "mistral", seed=1)
    cfg = json.loads((out / "config.json").read_text())
    for key in ("mlp_bias", "pretraining_tp"):
        cfg.pop(key, None)
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=WINDOW,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@cache
def _hf(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert type(model).__name__ == "MistralForCausalLM" and model.config.sliding_window == WINDOW
    return model


def _prompts(n: int, lengths: tuple[int, ...] = (37, 50, 21, 64)) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(5, 1000, (24,), generator=g).tolist()  # a prefix two prompts share
    out = []
    for i in range(n):
        tail = torch.randint(5, 1000, (lengths[i % len(lengths)],), generator=g).tolist()
        out.append(shared + tail if i % 2 else tail)
    return out


@cache
def _reference(model_dir: Path, prompts: tuple[tuple[int, ...], ...]) -> list[list[int]]:
    model = _hf(model_dir)
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=4)
        out.append(gen[0, len(p):].tolist())
    return out


def _run(eng: Engine, prompts: list[list[int]]) -> list[list[int]]:
    """Generate; at every step, check that no sequence holds a block its window no longer reaches (decode
    then holds at most ceil(window / block) + 1 blocks) and that the pool is all free at the end."""
    ids = [f"r{i}-{eng.num_steps}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts, strict=True):
        eng.add_request(rid, p, GREEDY)
    bound = -(-WINDOW // BLOCK) + 1
    run = eng.runner.run

    def checked(batch):  # noqa: ANN001, ANN202
        for seq, n in zip(batch.seqs, batch.num_new, strict=True):
            first = max(0, seq.num_computed - WINDOW + 1) // BLOCK  # the first block the next query sees
            assert seq.block_ids[:first] == [NULL_BLOCK] * first
            assert NULL_BLOCK not in seq.block_ids[first:]
            if n == 1:
                assert len(seq.block_ids) - first <= bound
        return run(batch)

    eng.runner.run = checked  # type: ignore[method-assign]
    out: dict[str, list[int]] = {rid: [] for rid in ids}
    while eng.has_unfinished():
        for o in eng.step():
            out[o.request_id].extend(o.new_token_ids)
    eng.runner.run = run  # type: ignore[method-assign]
    assert eng.pool.num_used == 0  # every block back in the pool
    return [out[rid] for rid in ids]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("budget", [12, 256], ids=["chunked", "whole-prompt"])
def test_greedy_matches_transformers(mistral: Path, fast: bool, budget: int) -> None:
    prompts = _prompts(6)
    want = _reference(mistral, tuple(map(tuple, prompts)))
    eng = Engine(EngineConfig(model=str(mistral), block_size=BLOCK, num_blocks=256, fast_path=fast,
                              max_num_batched_tokens=budget, long_prefill_tokens=0))
    assert eng.window == WINDOW and eng.model.fast is fast
    got = _run(eng, prompts)
    assert got == want
    # Again: the prompts' blocks are cached now (the early ones freed long ago, some evicted by then); the
    # window-aware match revives only the blocks the first uncached position's window reaches.
    hits = eng.pool.stats.prefix_hits
    got = _run(eng, prompts)
    assert got == want
    assert eng.pool.stats.prefix_hits > hits


def test_preemption_with_a_small_cache(mistral: Path) -> None:
    """16 blocks of 4 for 4 long requests: generations much longer than the cache, preempted and recomputed."""
    prompts = _prompts(4, (30, 20, 23, 12))
    assert max(map(len, prompts)) + NEW > 16 * BLOCK
    want = _reference(mistral, tuple(map(tuple, prompts)))
    eng = Engine(EngineConfig(model=str(mistral), block_size=BLOCK, num_blocks=16, max_num_batched_tokens=12,
                              long_prefill_tokens=0))
    got = _run(eng, prompts)
    assert got == want
    assert eng.pool.stats.preemptions > 0


def test_logits_close_at_every_step(mistral: Path) -> None:
    """The engine's logits at each sampled position against one full transformers forward of the sequence."""
    prompt = _prompts(2, (45,))[1]
    eng = Engine(EngineConfig(model=str(mistral), block_size=BLOCK, num_blocks=64, max_num_batched_tokens=10))
    seen: list[torch.Tensor] = []
    run = eng.runner.run

    def record(batch):  # noqa: ANN001, ANN202
        logits, samplers = run(batch)
        seen.extend(logits[i] for i, s in enumerate(samplers))
        return logits, samplers

    eng.runner.run = record  # type: ignore[method-assign]
    (out,) = eng.generate([prompt], GREEDY)
    full = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        want = _hf(mistral)(full).logits[0, len(prompt) - 1:-1]
    got = torch.stack(seen)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_triton_backend(mistral: Path) -> None:
    """The Triton decode kernel (the interpreter on the CPU) in the same windowed run."""
    from brigade.kernels import triton_attention as ta

    if not ta.available() or torch.cuda.is_available() or not ta.interpreter_mode():
        pytest.skip("needs triton's interpreter (TRITON_INTERPRET=1 before triton's first import)")
    prompts = _prompts(2)  # the interpreter costs real CPU time per program
    want = _reference(mistral, tuple(map(tuple, prompts)))
    eng = Engine(EngineConfig(model=str(mistral), block_size=BLOCK, num_blocks=64, attention="triton",
                              max_num_batched_tokens=12, long_prefill_tokens=0))
    assert type(eng.model.attention).__name__ == "TritonAttention"
    assert _run(eng, prompts) == want
