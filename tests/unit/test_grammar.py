"""Constrained decoding in the engine: masks in the batched sampler, grammar state across resume, handoff and
preemption, logit_bias, and the request fields that carry a constraint."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from brigade import constraints
from brigade.api_errors import ApiError
from brigade.engine import grammar
from brigade.engine.engine import Engine, EngineConfig, InvalidRequest, RequestOutput
from brigade.engine.sampling import SamplingParams

PROMPT = "The quick brown fox jumps over the lazy dog. " * 3
# A finite language: a random-weight model cannot wander inside an unbounded string until max_tokens.
SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["colour", "n", "ok", "tags"],
    "properties": {"colour": {"enum": ["red", "green", "blue"]}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
                   "ok": {"type": "boolean"},
                   "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3}}}
JSON = ("json", json.dumps(SCHEMA))


def _engine(tiny_models: dict[str, Path], **kw: Any) -> Engine:
    return Engine(EngineConfig(model=str(tiny_models["llama"]), **{"num_blocks": 64, **kw}))


def _run(engine: Engine) -> list[RequestOutput]:
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    return outs


def _params(structured: tuple[str, str] | None, **kw: Any) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 80, "temperature": 0, "structured": structured, **kw})


@pytest.fixture(scope="module")
def engine(tiny_models: dict[str, Path]) -> Engine:
    return _engine(tiny_models)


def test_constrained_and_free_requests_share_a_batch(engine: Engine) -> None:
    free = _params(None, max_tokens=12, ignore_eos=True)
    [alone] = engine.generate([PROMPT], free)
    cases = [_params(JSON), _params(JSON, temperature=1.0, seed=3), _params(("regex", r"[0-9]{3}-[a-c]{2}")),
             _params(("choice", json.dumps(["yes", "no", "maybe"])), temperature=0.9),
             _params(("json_object", ""), max_tokens=200), free]
    outs = engine.generate([PROMPT] * len(cases), cases)
    for out in outs[:2]:
        jsonschema.validate(json.loads(out.text), SCHEMA)
        assert out.finish_reason == "stop"
    assert re.fullmatch(r"[0-9]{3}-[a-c]{2}", outs[2].text) and outs[2].finish_reason == "stop"
    assert outs[3].text in ("yes", "no", "maybe")
    if outs[4].finish_reason == "stop":  # any object: a random model may still be inside it at max_tokens
        assert isinstance(json.loads(outs[4].text), dict)
    assert outs[4].text.startswith("{")
    assert outs[5].token_ids == alone.token_ids  # the masks touched only the constrained rows
    assert engine.pool.num_used == 0


def test_seeded_constrained_sampling_repeats(engine: Engine) -> None:
    p = _params(JSON, temperature=1.2, seed=11)
    a, b = engine.generate([PROMPT, PROMPT], [p, p])
    assert a.token_ids == b.token_ids
    jsonschema.validate(json.loads(a.text), SCHEMA)


def test_resume_rebuilds_the_grammar_from_the_tokens_so_far(engine: Engine) -> None:
    """A replay (or the decode side of a handoff) gets output_ids and carries on exactly."""
    p = _params(JSON)
    [ref] = engine.generate([PROMPT], p)
    prompt_ids = engine.tokenizer.encode(PROMPT)
    out_ids = ref.token_ids
    cut = len(out_ids) // 2
    engine.add_request("resumed", prompt_ids, p, output_ids=out_ids[:cut], text_sent=0)
    rest = _run(engine)
    assert out_ids[:cut] + [t for o in rest for t in o.new_token_ids] == out_ids
    assert "".join(o.new_text for o in rest) == ref.text
    with pytest.raises(InvalidRequest, match="do not follow"):
        engine.add_request("bad", prompt_ids, p, output_ids=engine.tokenizer.encode("not json"))
    assert "bad" not in engine.seqs


def test_handoff_mid_grammar(tiny_models: dict[str, Path], engine: Engine) -> None:
    p = _params(JSON, temperature=0.8, seed=5)
    [ref] = engine.generate([PROMPT], p)
    prefill, decode = engine, _engine(tiny_models)
    prefill.add_request("h", PROMPT, p, prefill_only=True)
    [first] = _run(prefill)
    held = prefill.held["h"]
    prompt_ids = held.token_ids[:held.num_prompt]
    blocks = decode.reserve("h", len(prompt_ids), lease_s=10)
    assert blocks is not None
    decode.runner.blocks()[:, :, blocks] = prefill.runner.blocks()[:, :, held.block_ids[:len(blocks)]]
    prefill.release("h")
    decode.add_prefilled("h", prompt_ids, first.new_token_ids[0], p, text_sent=len(first.new_text))
    rest = _run(decode)
    assert first.new_text + "".join(o.new_text for o in rest) == ref.text
    assert decode.pool.num_used == 0 and prefill.pool.num_used == 0


def test_preemption_keeps_the_grammar_state(tiny_models: dict[str, Path], engine: Engine) -> None:
    cases = [_params(JSON, seed=i, temperature=1.0) for i in range(6)]
    ref = engine.generate([PROMPT] * 6, cases)
    small = _engine(tiny_models, num_blocks=14)  # six prompts of ~40 tokens cannot all stay resident
    outs = small.generate([PROMPT] * 6, cases)
    assert small.pool.stats.preemptions > 0
    assert [o.text for o in outs] == [o.text for o in ref]


def test_grammar_wins_over_min_tokens(engine: Engine) -> None:
    [out] = engine.generate([PROMPT], _params(("choice", '["done"]'), min_tokens=8))
    assert out.text == "done" and out.finish_reason == "stop"


def test_compiled_once_per_spec(tiny_models: dict[str, Path]) -> None:
    eng = _engine(tiny_models)
    eng.generate([PROMPT] * 3, _params(("regex", "[ab]{4}")))
    eng.generate([PROMPT], _params(("regex", "[ab]{4}")))
    assert eng.grammars.compiles == 1


def test_logit_bias_moves_the_argmax(engine: Engine) -> None:
    [ref] = engine.generate([PROMPT], _params(None, max_tokens=1))
    first = ref.token_ids[-1]
    forced = (first + 7) % engine.model.cfg.vocab_size
    [up] = engine.generate([PROMPT], _params(None, max_tokens=1, logit_bias=((forced, 100.0),)))
    [down] = engine.generate([PROMPT], _params(None, max_tokens=1, logit_bias={str(first): -100}))
    assert up.token_ids[-1] == forced and down.token_ids[-1] != first
    with pytest.raises(InvalidRequest, match="vocabulary"):
        engine.add_request("x", PROMPT, _params(None, logit_bias=((10**6, 1.0),)))


def test_check_names_the_problem() -> None:
    assert grammar.check("json", json.dumps(SCHEMA)) is None
    assert "foo" in (grammar.check("json", '{"type": "foo"}') or "")
    assert grammar.check("regex", "[a-") and grammar.check("grammar", "start: nothing |")
    assert grammar.check("choice", "[]") and grammar.check("json", "[1]") and grammar.check("nope", "x")
    assert grammar.check("grammar", 'root ::= "yes" | "no"') is None  # GBNF as llama.cpp writes it


@pytest.mark.parametrize(("body", "expected"), [
    ({"response_format": {"type": "json_object"}}, ("json_object", "")),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA, "strict": True}}},
     ("json", json.dumps(SCHEMA))),
    ({"response_format": {"type": "text"}}, None),
    ({"structured_outputs": {"regex": "a+", "disable_fallback": True}}, ("regex", "a+")),
    ({"structured_outputs": {"choice": ["x", "y"]}}, ("choice", '["x", "y"]')),
    ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, ("json", json.dumps(SCHEMA))),
    ({"guided_json": SCHEMA, "guided_decoding_backend": "xgrammar"}, ("json", json.dumps(SCHEMA))),
    ({"guided_choice": ["a"]}, ("choice", '["a"]')),
    ({"guided_grammar": 'start: "a"'}, ("grammar", 'start: "a"')),
    ({}, None),
])
def test_request_fields(body: dict[str, Any], expected: tuple[str, str] | None) -> None:
    c = constraints.parse_constraint(body)
    assert (None if c is None else (c.kind, c.spec)) == expected


@pytest.mark.parametrize(("body", "param"), [
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}},
     "response_format.json_schema.schema"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": ""}, "guided_regex"),
    ({"guided_choice": "a"}, "guided_choice"),
    ({"structured_outputs": {"grammar": "start: ("}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs.choice"),
    ({"guided_regex": "a" * 70_000}, "guided_regex"),
])
def test_bad_constraints_are_400s_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as info:
        constraints.parse_constraint(body)
    assert info.value.status == 400 and info.value.param == param


def test_structured_bench_runs_the_same_tokens_both_ways(tiny_models: dict[str, Path]) -> None:
    from brigade.bench import structured

    report = structured.bench(str(tiny_models["llama"]), requests=3, max_tokens=12, rounds=1)
    assert report["same_tokens"] and report["output_tokens"] > 0 and report["ratio"] > 0
    assert set(report["compile"]) == set(structured.SCHEMAS)
    assert all(c["cached_p50_ms"] < c["uncached_p50_ms"] for c in report["compile"].values())
    assert "ratio" in structured.summary(report)
