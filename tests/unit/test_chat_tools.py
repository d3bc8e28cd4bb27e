"""Chat requests with tools: how they are rendered for templates with and without tool support, the
constraint that tool_choice sets, and the tool_calls bodies, whole and streamed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from brigade import openai_api as api
from brigade.model.tokenizer import Tokenizer
from brigade.protocol import TokenChunk

MODEL = "tiny"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "required": ["city"],
                                                           "properties": {"city": {"type": "string"}}}}}
# A template that renders tools itself (the shape of Qwen's and Hermes' templates, cut down).
TOOLS_TEMPLATE = ("{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}"
                  "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
                  "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}:{{ c.function.arguments.city }}"
                  "</tool_call>{% endfor %}{% endfor %}<assistant>")


@pytest.fixture(scope="module")
def tok(tiny_models: dict[str, Path]) -> Tokenizer:
    return Tokenizer(tiny_models["llama"])


def chat(tok: Tokenizer, messages: list[dict[str, Any]] | None = None, **body: Any) -> api.ApiRequest:
    msgs = messages or [{"role": "user", "content": "Weather in Paris?"}]
    return api.parse_chat(json.dumps({"model": MODEL, "messages": msgs, "tools": [WEATHER], **body}), tok, MODEL,
                          4096)


def prompt_text(tok: Tokenizer, req: api.ApiRequest) -> str:
    return tok.decode(req.prompts[0].ids, skip_special_tokens=False)


def test_a_template_without_tools_gets_them_in_the_system_message(tok: Tokenizer) -> None:
    assert "tools" not in (tok.chat_template or "")
    req = chat(tok)
    text = prompt_text(tok, req)
    assert "<tools>" in text and "get_weather" in text and "<tool_call>" in text
    assert req.tools is not None and req.tools.mode == "auto" and req.tool_parser == "hermes"
    assert req.params.structured is None  # auto: free output, parsed afterwards
    plain = chat(tok, tool_choice="none")
    assert "get_weather" not in prompt_text(tok, plain)


def test_a_template_with_tools_renders_them_and_the_history(tok: Tokenizer) -> None:
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    req = chat(tok, history, chat_template=TOOLS_TEMPLATE)
    text = prompt_text(tok, req)
    # Arguments reach the template as a mapping (it reads .city), the tool result as the tool's message.
    assert "<tools>get_weather;</tools>" in text and "<tool_call>get_weather:Paris</tool_call>" in text
    assert "<tool>sunny" in text
    fallback = prompt_text(tok, chat(tok, history))  # the same history for a template without tools
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in fallback
    assert "<tool_response>\nsunny\n</tool_response>" in fallback


def test_tool_choice_sets_the_constraint(tok: Tokenizer) -> None:
    named = chat(tok, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.params.structured is not None
    kind, spec = named.params.structured
    assert kind == "json" and json.loads(spec) == WEATHER["function"]["parameters"]
    required = chat(tok, tool_choice="required", parallel_tool_calls=False)
    schema = json.loads(required.params.structured[1])  # type: ignore[index]
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1


def _chunk(text: str, finish: str | None = None) -> TokenChunk:
    return TokenChunk("r", [1], text, finish, completion_tokens=1)


@pytest.mark.parametrize(("tool_choice", "text"), [
    ("auto", 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
    ({"type": "function", "function": {"name": "get_weather"}}, '{"city": "Paris"}'),
    ("required", '[{"name": "get_weather", "parameters": {"city": "Paris"}}]'),
])
def test_calls_come_back_whole_and_streamed(tok: Tokenizer, tool_choice: Any, text: str) -> None:
    req = chat(tok, tool_choice=tool_choice)
    choices = api.new_choices(req)
    choices[0].add(_chunk(text, "stop"))
    [choice] = api.final_body(req, "id", 0, choices, str)["choices"]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert choice["message"]["content"] == ("Let me look." if tool_choice == "auto" else None)

    fmt = api.StreamFormatter(req, "id", 0, str)
    events = fmt.start()
    for i in range(0, len(text), 5):
        events += fmt.on_chunk(0, _chunk(text[i:i + 5], "stop" if i + 5 >= len(text) else None))
    deltas = [e["choices"][0]["delta"] for e in events]
    pieces = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert pieces[0]["id"].startswith("call_") and pieces[0]["function"]["name"] == "get_weather"
    assert json.loads("".join(p["function"].get("arguments", "") for p in pieces)) == {"city": "Paris"}
    assert "".join(d.get("content") or "" for d in deltas) == (choice["message"]["content"] or "")
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_plain_answers_stay_content(tok: Tokenizer) -> None:
    req = chat(tok)
    choices = api.new_choices(req)
    choices[0].add(_chunk("It is sunny.", "stop"))
    [choice] = api.final_body(req, "id", 0, choices, str)["choices"]
    assert choice["message"] == {"role": "assistant", "content": "It is sunny."}
    assert choice["finish_reason"] == "stop"
