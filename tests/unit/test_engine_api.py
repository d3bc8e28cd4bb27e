"""Engine API behaviour: validation, abort, stop conditions, seeds, logprobs, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from brigade.engine.engine import Engine, EngineConfig, InvalidRequest
from brigade.engine.sampling import SamplingParams
from brigade.model.config import ModelError, load_config


@pytest.fixture(scope="module")
def engine(tiny_models: dict[str, Path]) -> Engine:
    return Engine(EngineConfig(model=str(tiny_models["llama"]), num_blocks=128))


def _state(e: Engine) -> tuple[int, int, int, int]:
    return len(e.seqs), len(e.scheduler.waiting), len(e.scheduler.running), e.pool.num_used


@pytest.mark.parametrize(
    ("prompt", "params", "param", "words"),
    [
        ("x " * 600, SamplingParams(max_tokens=4), "prompt", "context"),
        ("hello", SamplingParams(max_tokens=0), "max_tokens", "max_tokens"),
        ("hello", SamplingParams(max_tokens=600), "max_tokens", "context"),
        ("hello", SamplingParams(top_p=0.0), "top_p", "top_p"),
        ("hello", SamplingParams(top_p=1.5), "top_p", "top_p"),
        ("hello", SamplingParams(temperature=-1.0), "temperature", "temperature"),
        ([], SamplingParams(), "prompt", "empty"),
        ([5, 10**6], SamplingParams(), "prompt", "vocabulary"),
    ],
)
def test_bad_input_raises_clear_error_and_leaves_state(engine: Engine, prompt: object, params: SamplingParams,
                                                       param: str, words: str) -> None:
    before = _state(engine)
    with pytest.raises(InvalidRequest) as err:
        engine.add_request("bad", prompt, params)  # type: ignore[arg-type]
    assert err.value.param == param
    assert words in str(err.value)
    assert _state(engine) == before


def test_duplicate_request_id_rejected(engine: Engine) -> None:
    engine.add_request("dup", "hello", SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequest, match="already in use"):
        engine.add_request("dup", "hello", SamplingParams(max_tokens=2))
    assert engine.abort("dup")
    assert not engine.abort("dup")
    assert _state(engine) == (0, 0, 0, 0)


def test_unknown_architecture_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelError, match="unsupported architecture.*GPT2LMHeadModel"):
        load_config(tmp_path)


def test_abort_mid_generation_frees_blocks(engine: Engine) -> None:
    for i in range(4):
        engine.add_request(f"a{i}", "some prompt text " * 5, SamplingParams(max_tokens=100, ignore_eos=True))
    for _ in range(5):
        engine.step()
    assert engine.pool.num_used > 0
    for i in range(4):
        assert engine.abort(f"a{i}")
    assert _state(engine) == (0, 0, 0, 0)


def test_max_tokens_and_length_finish(engine: Engine) -> None:
    [out] = engine.generate(["hello"], SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 7
    assert out.finish_reason == "length"


def test_stop_token_ids_and_strings(engine: Engine) -> None:
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    [ref] = engine.generate(["def main():"], greedy)
    gen = ref.token_ids
    # Stop on the 5th generated token id (its first occurrence).
    stop_id = gen[4]
    first = gen.index(stop_id)
    [out] = engine.generate(["def main():"], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                             stop_token_ids=(stop_id,)))
    assert out.token_ids == gen[:first + 1]
    assert out.finish_reason == "stop"
    # A stop string taken from the middle of the greedy text: output is cut before it, not emitted.
    text = ref.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), "the tiny model's text should have visible characters"
    [cut] = engine.generate(["def main():"], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                             stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert cut.text == text[:text.index(stop)]
    assert stop not in cut.text
    # include_stop_str_in_output (vLLM's): the same cut, with the stop string kept at the end.
    [kept] = engine.generate(["def main():"], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                              stop=(stop,), include_stop_str_in_output=True))
    assert kept.finish_reason == "stop" and kept.text == text[:text.index(stop)] + stop


def test_seed_reproducible_whatever_the_batch(engine: Engine) -> None:
    p = SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
    [alone] = engine.generate(["tell me a story"], p)
    noisy = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    outs = engine.generate(["other", "tell me a story", "x y z"], [noisy, p, noisy])
    assert outs[1].token_ids == alone.token_ids
    [other] = engine.generate(["tell me a story"], SamplingParams(max_tokens=16, temperature=1.0, seed=99,
                                                                   ignore_eos=True))
    assert other.token_ids != alone.token_ids


def test_logprobs_returned_per_token(engine: Engine) -> None:
    [out] = engine.generate(["hello"], SamplingParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True))
    assert len(out.logprobs) == 5
    for lp, tok in zip(out.logprobs, out.token_ids, strict=True):
        assert lp.token_id == tok
        assert lp.top_logprobs is not None and len(lp.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert lp.top_logprobs[0][0] == tok and lp.logprob == pytest.approx(lp.top_logprobs[0][1])


def test_eos_stops_unless_ignored(tiny_models: dict[str, Path]) -> None:
    eng = Engine(EngineConfig(model=str(tiny_models["llama"]), num_blocks=64))
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    [ref] = eng.generate(["def main():"], greedy)
    # Declare the 3rd generated token an end-of-sequence token: the request must end right there.
    eos = ref.token_ids[2]
    eng.eos_token_ids = frozenset({eos})
    [out] = eng.generate(["def main():"], SamplingParams(max_tokens=12, temperature=0))
    assert out.token_ids == ref.token_ids[:ref.token_ids.index(eos) + 1]
    assert out.finish_reason == "stop"
    [cont] = eng.generate(["def main():"], greedy)
    assert cont.token_ids == ref.token_ids and cont.finish_reason == "length"


def test_cli_generate_json(tiny_models: dict[str, Path]) -> None:
    cmd = [sys.executable, "-m", "brigade.cli", "generate", "--model", str(tiny_models["qwen2"]), "--prompt",
           "Hello there", "--max-tokens", "6", "--ignore-eos", "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    data = json.loads(res.stdout)
    assert len(data["token_ids"]) == 6 and isinstance(data["text"], str)
    eng = Engine(EngineConfig(model=str(tiny_models["qwen2"]), num_blocks=32))
    [ref] = eng.generate(["Hello there"], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert data["token_ids"] == ref.token_ids


def test_cli_reports_bad_input(tiny_models: dict[str, Path]) -> None:
    cmd = [sys.executable, "-m", "brigade.cli", "generate", "--model", str(tiny_models["llama"]), "--prompt",
           "hi", "--max-tokens", "100000", "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "exceeds this model's context" in res.stderr


def test_sibling_waits_for_in_flight_prefix_instead_of_recomputing(tiny_models: dict[str, Path]) -> None:
    """Two requests with the same long prefix arriving together: the second reuses the first's blocks."""
    eng = Engine(EngineConfig(model=str(tiny_models["llama"]), num_blocks=128, max_num_batched_tokens=32))
    doc = list(range(20, 20 + 160))  # 10 full blocks
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    outs = eng.generate([doc + [5, 6, 7], doc + [8, 9]], greedy)
    assert outs[0].num_cached_tokens == 0
    assert outs[1].num_cached_tokens == 160  # waited for the sibling's prefill, then hit every block
    alone = Engine(EngineConfig(model=str(tiny_models["llama"]), num_blocks=128)).generate([doc + [8, 9]], greedy)
    assert outs[1].token_ids == alone[0].token_ids
    assert not eng.kv.inflight and eng.pool.num_used == 0
