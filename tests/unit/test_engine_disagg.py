"""Engine hooks for disaggregation and replay: prefill-only, reservations, handoff, resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from brigade.engine.engine import Engine, EngineConfig, InvalidRequest, RequestOutput
from brigade.engine.sampling import SamplingParams

PROMPT = "The quick brown fox jumps over the lazy dog. " * 3


def _engine(tiny_models: dict[str, Path], **kw: object) -> Engine:
    return Engine(EngineConfig(model=str(tiny_models["llama"]), num_blocks=64, **kw))  # type: ignore[arg-type]


def _run(engine: Engine) -> list[RequestOutput]:
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    return outs


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=20, temperature=1.0, seed=7, ignore_eos=True),
])
def test_handoff_continues_exactly(tiny_models: dict[str, Path], params: SamplingParams) -> None:
    ref_engine = _engine(tiny_models)
    [ref] = ref_engine.generate([PROMPT], params)

    prefill, decode = _engine(tiny_models), _engine(tiny_models, chunked_prefill=False)
    prefill.add_request("r", PROMPT, params, prefill_only=True)
    [first] = _run(prefill)
    assert first.finish_reason == "handoff" and first.new_token_ids == ref.token_ids[:1]
    held = prefill.held["r"]
    prompt_ids = held.token_ids[:held.num_prompt]
    blocks = decode.reserve("r", len(prompt_ids), lease_s=10)
    assert blocks is not None
    src = held.block_ids[:len(blocks)]
    decode.runner.blocks()[:, :, blocks] = prefill.runner.blocks()[:, :, src]
    assert prefill.release("r") and prefill.pool.num_used == 0
    decode.add_prefilled("r", prompt_ids, first.new_token_ids[0], params, text_sent=len(first.new_text))
    rest = _run(decode)
    assert first.new_token_ids + [t for o in rest for t in o.new_token_ids] == ref.token_ids
    assert first.new_text + "".join(o.new_text for o in rest) == ref.text
    assert decode.pool.num_used == 0


def test_prefill_only_request_that_ends_at_first_token_is_not_held(tiny_models: dict[str, Path]) -> None:
    eng = _engine(tiny_models)
    eng.add_request("r", PROMPT, SamplingParams(max_tokens=1, temperature=0), prefill_only=True)
    [out] = _run(eng)
    assert out.finish_reason == "length" and not eng.held and eng.pool.num_used == 0


def test_reservation_lease_expires_and_frees_blocks(tiny_models: dict[str, Path]) -> None:
    eng = _engine(tiny_models)
    blocks = eng.reserve("r", 40, lease_s=5)
    assert blocks is not None and len(blocks) == 3 and eng.pool.num_used == 3
    assert eng.expire_reservations(now=0.0) == []
    assert eng.expire_reservations(now=1e12) == ["r"]
    assert eng.pool.num_used == 0
    with pytest.raises(InvalidRequest, match="no reservation"):
        eng.add_prefilled("r", [5] * 40, 7, SamplingParams())
    assert eng.reserve("big", 64 * 16 + 1, lease_s=5) is None


def test_abort_frees_held_and_reserved(tiny_models: dict[str, Path]) -> None:
    eng = _engine(tiny_models)
    eng.add_request("h", PROMPT, SamplingParams(max_tokens=5, temperature=0), prefill_only=True)
    _run(eng)
    assert "h" in eng.held and eng.pool.num_used > 0
    assert eng.reserve("x", 20, lease_s=5)
    assert eng.abort("h") and eng.abort("x")
    assert eng.pool.num_used == 0 and not eng.held and not eng.reserved


def test_resume_with_output_ids_matches_uninterrupted(tiny_models: dict[str, Path]) -> None:
    eng = _engine(tiny_models)
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    [ref] = eng.generate([PROMPT], greedy)
    eng.add_request("again", PROMPT, greedy, output_ids=ref.token_ids[:5])
    rest = [t for o in _run(eng) for t in o.new_token_ids]
    assert ref.token_ids[:5] + rest == ref.token_ids


def _stop_across(engine: Engine, cut: int) -> tuple[SamplingParams, str]:
    """A stop string that begins in the text of the first `cut` output tokens and ends after it, and the
    text the request should return with it (everything before the stop)."""
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    engine.add_request("probe", PROMPT, greedy)
    deltas = [o.new_text for o in _run(engine)]
    text, head = "".join(deltas), len("".join(deltas[:cut]))
    never = "<|never seen|>"  # long: the engine withholds len - 1 chars, more than the short stop's start
    assert never not in text
    for a in range(head - 1, max(head - 4, -1), -1):
        for b in range(head + 1, min(head + 4, len(text)) + 1):
            if text.find(text[a:b]) == a:
                return SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[never, text[a:b]]), text[:a]
    raise AssertionError(f"no stop string spans token {cut} of {deltas!r}")


def _until(engine: Engine, request_id: str, tokens: int) -> tuple[list[int], str]:
    """Step until `request_id` has `tokens` output tokens; its tokens and the text it emitted so far."""
    ids: list[int] = []
    text = ""
    while len(ids) < tokens:
        for o in engine.step():
            if o.request_id == request_id:
                ids += o.new_token_ids
                text += o.new_text
                assert not o.finished
    return ids, text


@pytest.mark.parametrize("cut", [2, 5])
def test_replay_cut_inside_a_stop_string(tiny_models: dict[str, Path], cut: int) -> None:
    """The worker that died had withheld the start of a stop string: the new one still emits the text
    before it, finds the stop across the cut, and emits nothing of it."""
    first = _engine(tiny_models)
    params, expected = _stop_across(first, cut)
    first.add_request("r", PROMPT, params)
    ids, sent = _until(first, "r", cut)
    assert len(sent) < len(expected) and expected.startswith(sent)  # text before the stop was withheld too
    second = _engine(tiny_models)
    second.add_request("r2", PROMPT, params, output_ids=ids, text_sent=len(sent))
    rest = _run(second)
    assert sent + "".join(o.new_text for o in rest) == expected
    assert rest[-1].finish_reason == "stop" and rest[-1].stop_reason == params.stop[1]
    assert second.pool.num_used == 0


def test_handoff_cut_inside_a_stop_string(tiny_models: dict[str, Path]) -> None:
    prefill, decode = _engine(tiny_models), _engine(tiny_models, chunked_prefill=False)
    params, expected = _stop_across(prefill, 1)
    prefill.add_request("r", PROMPT, params, prefill_only=True)
    [first] = _run(prefill)
    assert first.finish_reason == "handoff" and expected.startswith(first.new_text)
    held = prefill.held["r"]
    prompt_ids = held.token_ids[:held.num_prompt]
    blocks = decode.reserve("r", len(prompt_ids), lease_s=10)
    assert blocks is not None
    decode.runner.blocks()[:, :, blocks] = prefill.runner.blocks()[:, :, held.block_ids[:len(blocks)]]
    decode.add_prefilled("r", prompt_ids, first.new_token_ids[0], params, text_sent=len(first.new_text))
    rest = _run(decode)
    assert first.new_text + "".join(o.new_text for o in rest) == expected
    assert rest[-1].finish_reason == "stop"


def test_a_resumed_request_with_every_token_ends_at_once(tiny_models: dict[str, Path]) -> None:
    """A replay after only the last message was lost: no step runs the model for it, and the text the first
    worker still withheld comes out with finish_reason length."""
    eng = _engine(tiny_models)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    [ref] = eng.generate([PROMPT], params)
    steps = eng.num_steps
    eng.add_request("again", PROMPT, params, output_ids=ref.token_ids, text_sent=len(ref.text) - 3)
    [out] = _run(eng)
    assert (out.finished, out.finish_reason, out.new_token_ids, out.new_text) == (True, "length", [], ref.text[-3:])
    assert eng.num_steps == steps and eng.pool.num_used == 0 and not eng.seqs
    with pytest.raises(InvalidRequest, match="more than max_tokens"):
        eng.add_request("over", PROMPT, params, output_ids=ref.token_ids + [1])


def test_a_replayed_request_hands_off_with_its_earlier_tokens(tiny_models: dict[str, Path]) -> None:
    """A replay lands on a prefill worker with the tokens it had: their KV moves too, and the decode worker carries
    on after them (positions, the text the client already has, max_tokens) exactly as one engine would."""
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    [ref] = _engine(tiny_models).generate([PROMPT], params)
    earlier = ref.token_ids[:7]
    prefill, decode = _engine(tiny_models), _engine(tiny_models, chunked_prefill=False)
    prefill.add_request("r", PROMPT, params, output_ids=earlier, prefill_only=True, text_sent=3)
    [first] = _run(prefill)
    assert first.finish_reason == "handoff" and first.new_token_ids == ref.token_ids[7:8]
    held = prefill.held["r"]
    prompt_ids = held.token_ids[:held.num_prompt]
    blocks = decode.reserve("r", held.num_computed, lease_s=10)
    assert blocks is not None
    decode.runner.blocks()[:, :, blocks] = prefill.runner.blocks()[:, :, held.block_ids[:len(blocks)]]
    prefill.release("r")
    decode.add_prefilled("r", prompt_ids, first.new_token_ids[0], params, text_sent=len(first.new_text),
                         output_ids=earlier, earlier_sent=3)
    rest = _run(decode)
    assert ref.token_ids[:8] + [t for o in rest for t in o.new_token_ids] == ref.token_ids
    assert ref.text[:3] + first.new_text + "".join(o.new_text for o in rest) == ref.text
    assert rest[-1].num_output_tokens == 20 and decode.pool.num_used == 0
