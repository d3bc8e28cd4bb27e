"""Schemathesis against a live stack (gateway, router, one colocated worker): generated requests over real HTTP.

The schema is `brigade.openapi_schema.openapi` with its costs capped for fuzzing (max_tokens <= 8 and required,
n <= 2, short strings and lists, token ids inside the tiny vocabulary); the served document keeps the server's
real limits. Positive cases follow that schema, negative ones break it. Every answer must be a 2xx (a JSON body
of the documented shape, or server-sent events ending with [DONE] and no server-side error in-band) or an
OpenAI error body with a documented 4xx: never a 5xx. BRIGADE_FUZZ_SCALE=10 runs ten times the cases.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from helpers import free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from brigade.config import default_served_names
from brigade.launcher import Up, UpConfig
from brigade.openapi_schema import openapi

VOCAB = 1024  # the tiny checkpoints' vocabulary
MAX_TOKENS = 8
MAX_STRING = 32
MAX_ITEMS = 3
CASE_TIMEOUT_S = 20.0  # one request, streamed or not
DEADLINE_MS = 10_000  # hypothesis: one case (request and checks)
SCALE = float(os.environ.get("BRIGADE_FUZZ_SCALE", "1"))

# (path, mode, examples): 1,000 cases on the two generation endpoints (plus one per GET endpoint).
PLAN = [
    ("/v1/completions", GenerationMode.POSITIVE, 350),
    ("/v1/completions", GenerationMode.NEGATIVE, 150),
    ("/v1/chat/completions", GenerationMode.POSITIVE, 350),
    ("/v1/chat/completions", GenerationMode.NEGATIVE, 150),
]
GETS = ("/v1/models", "/health", "/metrics")
MIN_OK_SHARE = 0.2  # of positive cases answered 200: below it, the schema has drifted from what the server takes
IN_BAND_SERVER_ERRORS = {"server_error", "service_unavailable_error", "timeout_error"}
REQUEST_SCHEMAS = ("CompletionRequest", "ChatCompletionRequest", "Prompt", "Message", "TextPart", "Choices",
                   "ResponseFormat", "Function", "Tool", "ToolChoice")  # capped for fuzzing; responses are not


PATTERN_SAMPLES = {"^[a-zA-Z0-9_-]{1,64}$": ["f", "get_weather", "tool-2"], "^[0-9]+$": ["0", "7", "42"]}


def fuzz_schema(doc: dict[str, Any]) -> dict[str, Any]:
    """A copy of `doc` whose cases are cheap: short strings and lists, few tokens, few choices, no auth."""
    doc = copy.deepcopy(doc)

    def cap(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                cap(item)
            return
        if not isinstance(node, dict):
            return
        if isinstance(node.get("pattern"), str):
            # hypothesis compiles patterns through ast.parse, which CPython 3.11.7 fails ("AST constructor
            # recursion depth mismatch") at the depth schemathesis generates from: sample strings instead.
            node["enum"] = PATTERN_SAMPLES.get(node.pop("pattern"), ["x"])
        kinds = node.get("type")
        kinds = kinds if isinstance(kinds, list) else [kinds]
        if "string" in kinds:
            node["maxLength"] = min(node.get("maxLength", MAX_STRING), MAX_STRING)
        if "array" in kinds:
            node["maxItems"] = min(node.get("maxItems", MAX_ITEMS), MAX_ITEMS)
        if node.get("maxProperties", 0) > MAX_ITEMS:
            node["maxProperties"] = MAX_ITEMS
        for value in node.values():
            cap(value)

    schemas = doc["components"]["schemas"]
    cap([schemas[name] for name in REQUEST_SCHEMAS])
    for ids in (schemas["Prompt"]["anyOf"][1], schemas["Prompt"]["anyOf"][2]["items"]["anyOf"][1]):
        ids["items"]["maximum"] = VOCAB - 1  # prompts inside the vocabulary (other token ids stay unbounded)
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        props["max_tokens"] = {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS}
        schemas[name]["required"].append("max_tokens")  # chat's default is the whole context
        for field, hi in (("n", 2), ("best_of", 2), ("min_tokens", MAX_TOKENS), ("max_completion_tokens", MAX_TOKENS)):
            if field in props:
                props[field]["maximum"] = hi
    for path in doc["paths"].values():
        for op in path.values():
            op.pop("security", None)
    doc["components"].pop("securitySchemes")
    return doc


def _whole_as_int(value: Any) -> Any:
    """`value` with whole floats as ints. JSON Schema's integer admits 2.0, and schemathesis sends it for integer
    fields; the server answers 400 (it wants JSON integers), so half the positive cases send ints only."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [_whole_as_int(v) for v in value]
    if isinstance(value, dict):
        return {k: _whole_as_int(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def up(tiny_models: dict[str, Path]) -> Iterator[Up]:
    with Up(UpConfig(model=str(tiny_models["llama"]), port=free_port(), worker_args=("--num-blocks", "128"))) as u:
        yield u


@pytest.fixture(scope="module")
def schema(up: Up) -> schemathesis.BaseSchema:
    loaded = schemathesis.openapi.from_dict(fuzz_schema(openapi(default_served_names(up.cfg.model))))
    loaded.config.update(base_url=up.url, request_timeout=CASE_TIMEOUT_S)
    loaded.config.max_stream_events = 10_000  # read every stream to its end (the default stops at 20 events)
    loaded.config.output.sanitization.enabled = False  # failures show the body as sent ("max_tokens" is no secret)
    return loaded


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


def _report(case: schemathesis.Case, response: schemathesis.Response, why: str) -> str:
    return (f"{why}\nrequest: {case.method} {case.path}\nbody: {json.dumps(case.body, ensure_ascii=True)}\n"
            f"response {response.status_code}: {response.text[:2000]}")


def check_answer(case: schemathesis.Case, response: schemathesis.Response) -> None:
    """An OpenAI error body with any non-2xx, and SSE streams that end with [DONE] and carry no server-side error
    (their status went out before the error). A JSON 2xx was checked against the document already."""
    kind = (response.headers.get("content-type") or [""])[0]
    if response.status_code >= 300:
        body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        assert isinstance(error, dict) and isinstance(error.get("message"), str) \
            and isinstance(error.get("type"), str) and {"param", "code"} <= error.keys(), \
            _report(case, response, "not an OpenAI error body")
        return
    if not kind.startswith("text/event-stream"):
        return
    assert not response.stream_cut_short, _report(case, response, f"the stream took over {CASE_TIMEOUT_S} s")
    # SSE lines end at CR or LF only: str.splitlines would also cut at \x1c, \x85 or U+2028, which JSON
    # carries unescaped inside a random model's text.
    lines = response.text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", _report(case, response, "the stream does not end with [DONE]")
    for event in events[:-1]:
        error = json.loads(event).get("error")
        assert not (isinstance(error, dict) and error.get("type") in IN_BAND_SERVER_ERRORS), \
            _report(case, response, "a server-side error in-band")


def fuzz(schema: schemathesis.BaseSchema, session: requests.Session, path: str, method: str,
         mode: GenerationMode, examples: int) -> Counter[int]:
    """Send `examples` generated cases of one operation and check every answer; returns the status counts."""
    op = schema[path][method]
    statuses: Counter[int] = Counter()
    checks = [not_a_server_error, response_schema_conformance, status_code_conformance]

    @settings(max_examples=examples, deadline=DEADLINE_MS, database=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode), whole=st.booleans())
    def one(case: schemathesis.Case, whole: bool) -> None:
        if whole and mode is GenerationMode.POSITIVE:
            case.body = _whole_as_int(case.body)
        response = case.call(session=session)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=checks)  # raises with a curl line that reproduces the case
        check_answer(case, response)

    one()
    return statuses


@pytest.mark.parametrize(("path", "mode", "examples"), PLAN, ids=[f"{p}-{m.value}" for p, m, _ in PLAN])
def test_generation_endpoints_never_answer_5xx(schema: schemathesis.BaseSchema, session: requests.Session,
                                               path: str, mode: GenerationMode, examples: int) -> None:
    t0 = time.monotonic()
    statuses = fuzz(schema, session, path, "POST", mode, round(examples * SCALE))
    sent = sum(statuses.values())
    print(f"\n{path} {mode.value}: {sent} requests in {time.monotonic() - t0:.1f} s, statuses {dict(statuses)}")
    assert sent >= examples * SCALE * 0.9  # hypothesis stops early only when the space is used up
    if mode is GenerationMode.POSITIVE:
        assert statuses[200] >= MIN_OK_SHARE * sent, statuses


def test_get_endpoints_never_answer_5xx(schema: schemathesis.BaseSchema, session: requests.Session) -> None:
    for path in GETS:
        statuses = fuzz(schema, session, path, "GET", GenerationMode.POSITIVE, 5)
        assert set(statuses) == {200}, (path, statuses)


# Beside the fuzzing (random strings do not reach them): a client's chat_template that raises anything at all is
# the client's error, a 400 naming chat_template.
RAISING_TEMPLATES = ["{{ 1/0 }}",  # ZeroDivisionError
                     "{% for i in range(100001) %}{% endfor %}x",  # OverflowError: the sandbox's MAX_RANGE
                     "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"]  # RecursionError


@pytest.mark.parametrize("template", RAISING_TEMPLATES)
def test_a_chat_template_that_raises_is_a_400(up: Up, template: str) -> None:
    body = {"model": default_served_names(up.cfg.model)[-1], "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2, "chat_template": template}
    r = requests.post(f"{up.url}/v1/chat/completions", json=body, timeout=CASE_TIMEOUT_S)
    assert r.status_code == 400, (r.status_code, r.text)
    assert r.json()["error"]["param"] == "chat_template"
