"""Tool calling: request validation, constraint schemas, output parsers, streaming, chat history."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest

from brigade import tool_calls as tc
from brigade.api_errors import ApiError

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
PING = {"type": "function", "function": {"name": "ping"}}  # no parameters: the empty object schema
TOOLS = [WEATHER, ADD, PING]
AUTO = tc.ToolRequest(tuple(TOOLS), "auto")
REQUIRED = tc.ToolRequest(tuple(TOOLS), "required")
NAMED = tc.ToolRequest(tuple(TOOLS), "named", "add")
NONE = tc.ToolRequest(tuple(TOOLS), "none")
CALL_ID = re.compile(r"call_[0-9a-f]{24}")


def error_of(data: dict[str, Any]) -> ApiError:
    with pytest.raises(ApiError) as info:
        tc.parse_tools(data)
    assert info.value.status == 400
    return info.value


def calls_of(parsed: tc.Parsed) -> list[tuple[str, Any]]:
    return [(c.name, json.loads(c.arguments)) for c in parsed.calls]


# ---- parse_tools --------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [{}, {"tools": None}, {"tools": []}, {"tools": [], "tool_choice": "none"},
                                  {"tool_choice": None}, {"functions": [], "function_call": "none"}])
def test_no_tools_is_none(data: dict[str, Any]) -> None:
    assert tc.parse_tools(data) is None


@pytest.mark.parametrize("choice", ["auto", "required", {"type": "function", "function": {"name": "add"}}])
def test_tool_choice_without_tools_is_an_error(choice: Any) -> None:
    assert error_of({"tool_choice": choice}).param == "tool_choice"
    assert error_of({"tools": [], "tool_choice": choice}).param == "tool_choice"


def test_defaults_keep_the_tools_as_given() -> None:
    req = tc.parse_tools({"tools": TOOLS})
    assert req == tc.ToolRequest(tuple(TOOLS), "auto", None, True)
    assert req.tools[2] == PING and "parameters" not in req.tools[2]["function"]  # not filled in
    assert tc.parse_tools({"tools": TOOLS, "parallel_tool_calls": False}).parallel is False


@pytest.mark.parametrize(("choice", "mode", "name"), [
    ("none", "none", None), ("auto", "auto", None), ("required", "required", None),
    ({"type": "function", "function": {"name": "get_weather"}}, "named", "get_weather")])
def test_tool_choice_modes(choice: Any, mode: str, name: str | None) -> None:
    req = tc.parse_tools({"tools": TOOLS, "tool_choice": choice})
    assert (req.mode, req.name, req.tools) == (mode, name, tuple(TOOLS))  # "none" keeps the tools


def _tool(name: str, **fn: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, **fn}}


@pytest.mark.parametrize(("data", "param"), [
    ({"tools": {"name": "x"}}, "tools"),
    ({"tools": [_tool(f"f{i}") for i in range(129)]}, "tools"),
    ({"tools": [ADD, "add"]}, "tools[1]"),
    ({"tools": [{"type": "code", "function": ADD["function"]}]}, "tools[0].type"),
    ({"tools": [{"function": ADD["function"]}]}, "tools[0].type"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [ADD, _tool("has space")]}, "tools[1].function.name"),
    ({"tools": [ADD, _tool("x" * 65)]}, "tools[1].function.name"),
    ({"tools": [ADD, _tool("")]}, "tools[1].function.name"),
    ({"tools": [ADD, {"type": "function", "function": {"name": 7}}]}, "tools[1].function.name"),
    ({"tools": [ADD, WEATHER, ADD]}, "tools[2].function.name"),
    ({"tools": [ADD, WEATHER, _tool("p", parameters=["a"])]}, "tools[2].function.parameters"),
    ({"tools": [_tool("p", parameters="{}")]}, "tools[0].function.parameters"),
    ({"tools": [_tool("p", description=3)]}, "tools[0].function.description"),
    ({"tools": [_tool("p", strict="yes")]}, "tools[0].function.strict"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "add"}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "other", "function": {"name": "add"}}}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ({"tools": TOOLS, "functions": [ADD["function"]]}, "functions"),
    ({"functions": ADD["function"]}, "functions"),
    ({"functions": [ADD["function"], {"name": "a b"}]}, "functions[1].name"),
    ({"functions": ["add"]}, "functions[0]"),
    ({"functions": [{"name": "f", "parameters": 1}]}, "functions[0].parameters"),
    ({"functions": [ADD["function"]], "function_call": "required"}, "function_call"),
    ({"functions": [ADD["function"]], "function_call": {"name": "nope"}}, "function_call"),
    ({"function_call": {"name": "add"}}, "function_call"),
])
def test_request_errors_name_the_field(data: dict[str, Any], param: str) -> None:
    e = error_of(data)
    assert e.param == param, e.message
    assert e.type == "invalid_request_error" and e.message


def test_at_most_128_tools_and_name_charset() -> None:
    req = tc.parse_tools({"tools": [_tool(f"f_{i}-X") for i in range(128)]})
    assert len(req.tools) == 128
    assert tc.parse_tools({"tools": [_tool("a" * 64, parameters=None, description=None, strict=True)]})


def test_functions_and_function_call_convert_to_tools() -> None:
    fns = [WEATHER["function"], ADD["function"]]
    req = tc.parse_tools({"functions": fns})
    assert req == tc.ToolRequest((WEATHER, ADD), "auto")
    assert tc.parse_tools({"functions": fns, "function_call": "none"}).mode == "none"
    assert tc.parse_tools({"functions": fns, "function_call": "auto"}).mode == "auto"
    named = tc.parse_tools({"functions": fns, "function_call": {"name": "add"}})
    assert (named.mode, named.name) == ("named", "add")
    # tool_choice wins over the deprecated field
    assert tc.parse_tools({"tools": TOOLS, "tool_choice": "required", "function_call": "none"}).mode == "required"


# ---- constraint ---------------------------------------------------------------------------------------


def conforms(value: Any, schema: dict[str, Any], root: dict[str, Any] | None = None) -> bool:
    """The subset of JSON schema the constraints use (jsonschema is not a dependency)."""
    root = schema if root is None else root
    if "$ref" in schema:
        node: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        return conforms(value, node, root)
    kinds = {"object": dict, "array": list, "string": str, "integer": int}
    if "type" in schema and not isinstance(value, kinds[schema["type"]]):
        return False
    if "const" in schema and value != schema["const"]:
        return False
    if "anyOf" in schema and not any(conforms(value, s, root) for s in schema["anyOf"]):
        return False
    if isinstance(value, dict):
        props = schema.get("properties", {})
        if any(k not in value for k in schema.get("required", ())):
            return False
        if schema.get("additionalProperties") is False and set(value) - set(props):
            return False
        return all(conforms(v, props[k], root) for k, v in value.items() if k in props)
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            return False
        return all(conforms(v, schema.get("items", {}), root) for v in value)
    return True


def test_constraint_free_modes_and_named() -> None:
    assert tc.constraint(AUTO) is None and tc.constraint(NONE) is None
    assert tc.constraint(NAMED) == ADD["function"]["parameters"]
    assert tc.constraint(tc.ToolRequest(tuple(TOOLS), "named", "ping")) == {"type": "object", "properties": {}}


@pytest.mark.parametrize("parallel", [True, False])
def test_constraint_required(parallel: bool) -> None:
    schema = tc.constraint(tc.ToolRequest(tuple(TOOLS), "required", parallel=parallel))
    assert schema["type"] == "array" and schema["minItems"] == 1
    assert schema.get("maxItems") == (None if parallel else 1)
    items = schema["items"]["anyOf"]
    assert [i["properties"]["name"]["const"] for i in items] == ["get_weather", "add", "ping"]
    assert all(i["required"] == ["name", "parameters"] and i["additionalProperties"] is False for i in items)
    one = [{"name": "get_weather", "parameters": {"city": "Oslo"}}]
    two = one + [{"name": "ping", "parameters": {}}]
    assert conforms(one, schema)
    assert conforms(two, schema) is parallel
    for bad in ([], [{"name": "nope", "parameters": {}}], [{"name": "add"}], [{"name": "add", "parameters": {},
                                                                                 "x": 1}],
                [{"name": "get_weather", "parameters": {}}], [{"name": "add", "parameters": {"a": "1"}}]):
        assert not conforms(bad, schema), bad


def test_constraint_required_hoists_defs() -> None:
    point = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    move = _tool("move", parameters={"type": "object", "properties": {"to": {"$ref": "#/$defs/Point"}},
                                     "$defs": {"Point": point}})
    draw = _tool("draw", parameters={"type": "object", "properties": {"at": {"$ref": "#/$defs/Point"}},
                                     "$defs": {"Point": point}})
    schema = tc.constraint(tc.parse_tools({"tools": [move, draw], "tool_choice": "required"}))
    assert schema["$defs"] == {"Point": point}
    assert all("$defs" not in i["properties"]["parameters"] for i in schema["items"]["anyOf"])
    assert conforms([{"name": "move", "parameters": {"to": {"x": 1}}}], schema)
    assert not conforms([{"name": "move", "parameters": {"to": {"y": 1}}}], schema)
    other = _tool("draw", parameters={"$defs": {"Point": {"type": "string"}}})
    assert error_of({"tools": [move, other], "tool_choice": "required"}).param == "tools"
    assert tc.parse_tools({"tools": [move, other]}).mode == "auto"  # only "required" merges them


# ---- parse_output -------------------------------------------------------------------------------------


def test_tool_call_body() -> None:
    call = tc.parse_output('<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>', AUTO,
                           "hermes").calls[0]
    assert CALL_ID.fullmatch(call.id)
    assert call.body() == {"id": call.id, "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}


# (text, parser, expected content, expected [(name, arguments)])
HERMES = [
    ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Let me look.", [("get_weather", {"city": "Paris"})]),
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n<tool_call>\n'
     '{"name": "ping", "arguments": {}}\n</tool_call>\n', None, [("add", {"a": 1, "b": 2}), ("ping", {})]),
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1}}', None, [("add", {"a": 1})]),  # no closing tag
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_', None, [("add", {"a": 1})]),
    ('<tool_call>{"name": "ping"}</tool_call>Done, the server answered.', "Done, the server answered.",
     [("ping", {})]),
    ('<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}</tool_call>', None,
     [("get_weather", {"city": "Rome"})]),  # arguments as a JSON string
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "</tool_call> {"}}</tool_call>', None,
     [("get_weather", {"city": "</tool_call> {"})]),
    ('<tool_call>{"name": "add", "arguments": {"code": "if (a) { b[\\"}\\"] } \\\\", "u": "\\u00e9"}}</tool_call>',
     None, [("add", {"code": 'if (a) { b["}"] } \\', "u": "é"})]),  # brackets, quotes and escapes in strings
    ('Héllo ✓ <tool_call>{"name": "get_weather", "arguments": {"city": "Zürich"}}</tool_call>', "Héllo ✓",
     [("get_weather", {"city": "Zürich"})]),
    ('Checking.\n<tool_call>{"name": "ping"}</tool_call>\nDone.', "Checking.\nDone.", [("ping", {})]),
    ("Just text, no calls.\n\n", "Just text, no calls.\n\n", []),
    ("a < b and <tool or <tool_calls> are text", "a < b and <tool or <tool_calls> are text", []),
    ('<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>',
     '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>', []),  # unknown function
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1,}}\n</tool_call>',
     '<tool_call>\n{"name": "add", "arguments": {"a": 1,}}\n</tool_call>', []),  # malformed JSON
    ('<tool_call>\n{"name": "add", "arguments": [1]}\n</tool_call>',
     '<tool_call>\n{"name": "add", "arguments": [1]}\n</tool_call>', []),  # arguments not an object
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1}', '<tool_call>\n{"name": "add", "arguments": {"a": 1}',
     []),  # truncated
    ('<tool_call>call add</tool_call> <tool_call>{"name": "add"}</tool_call>', "<tool_call>call add</tool_call>",
     [("add", {})]),
    ('x <tool_call>{"name": "bad"}</tool_call> y <tool_call>{"name": "ping"}</tool_call>',
     'x <tool_call>{"name": "bad"}</tool_call> y', [("ping", {})]),
    ("Cut off at <tool_ca", "Cut off at <tool_ca", []),
]
LLAMA = [
    ('<|python_tag|>{"name": "add", "parameters": {"a": 1}}', None, [("add", {"a": 1})]),
    ('\n {"name": "get_weather", "arguments": {"city": "Lima"}}', None, [("get_weather", {"city": "Lima"})]),
    ('{"name": "add", "parameters": {"a": 1}}; {"name": "ping", "parameters": {}}', None,
     [("add", {"a": 1}), ("ping", {})]),
    ('{"name": "add", "parameters": {"a": 1}}\n{"name": "ping", "parameters": {}}', None,
     [("add", {"a": 1}), ("ping", {})]),
    ('{"name": "ping", "parameters": {}} and some words', "and some words", [("ping", {})]),
    ('{"name": "ping", "parameters": {}}; {"name": "nope", "parameters": {}}',
     '{"name": "nope", "parameters": {}}', [("ping", {})]),
    ('{"city": "Lima"}', '{"city": "Lima"}', []),  # JSON, but not a call
    ('{"name": "nope", "parameters": {}}', '{"name": "nope", "parameters": {}}', []),
    ("The answer is 4.", "The answer is 4.", []),
    ("<|python_tag|>print(1)", "<|python_tag|>print(1)", []),
    ('{"name": "add", "parameters": {"a": 1', '{"name": "add", "parameters": {"a": 1', []),
    ('Sure: {"name": "ping", "parameters": {}}', 'Sure: {"name": "ping", "parameters": {}}', []),
]
MISTRAL = [
    ('[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}, {"name": "ping", "arguments": {}}]', None,
     [("add", {"a": 1}), ("ping", {})]),
    ('I will check. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}]', "I will check.",
     [("get_weather", {"city": "Oslo"})]),
    ('[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}, {"name": "ping", "argu', '{"name": "ping", "argu',
     [("add", {"a": 1})]),  # cut off after a complete call: that call is kept, the rest is text
    ("[TOOL_CALLS] I cannot do that", "[TOOL_CALLS] I cannot do that", []),
    ('[TOOL_CALLS][{"name": "nope", "arguments": {}}]', '[TOOL_CALLS][{"name": "nope", "arguments": {}}]', []),
    ("No tools needed [TOOL_", "No tools needed [TOOL_", []),
    ("Plain [answer]", "Plain [answer]", []),
]
REQUIRED_OUT = [
    ('[{"name": "add", "parameters": {"a": 1, "b": 2}}, {"name": "ping", "parameters": {}}]', None,
     [("add", {"a": 1, "b": 2}), ("ping", {})]),
    (' [\n  {"name": "get_weather", "parameters": {"city": "Kyiv"}}\n]\n', None, [("get_weather", {"city": "Kyiv"})]),
    ("I refuse", "I refuse", []),
    ('[{"name": "nope", "parameters": {}}]', '[{"name": "nope", "parameters": {}}]', []),
    ('[{"name": "add", "parameters": {"a": ', '[{"name": "add", "parameters": {"a": ', []),
    ('[1, 2]', '[1, 2]', []),
]
EXAMPLES = ([(t, "hermes", AUTO, c, k) for t, c, k in HERMES] + [(t, "llama3_json", AUTO, c, k) for t, c, k in LLAMA]
            + [(t, "mistral", AUTO, c, k) for t, c, k in MISTRAL]
            + [(t, "hermes", REQUIRED, c, k) for t, c, k in REQUIRED_OUT])


@pytest.mark.parametrize(("text", "parser", "req", "content", "calls"), EXAMPLES)
def test_parse_output(text: str, parser: str, req: tc.ToolRequest, content: str | None, calls: list[Any]) -> None:
    parsed = tc.parse_output(text, req, parser)
    assert parsed.content == content
    assert calls_of(parsed) == calls
    assert all(CALL_ID.fullmatch(c.id) for c in parsed.calls)
    assert len({c.id for c in parsed.calls}) == len(parsed.calls)


def test_arguments_are_json_dumps_of_the_object() -> None:
    text = '<tool_call>{"name":"get_weather","arguments":{"city":"Zürich"}}</tool_call>'
    assert tc.parse_output(text, AUTO, "hermes").calls[0].arguments == '{"city": "Zürich"}'


def test_named_and_none_modes() -> None:
    parsed = tc.parse_output(' \n{"a": 1,  "b": 2}\n\n', NAMED, "hermes")
    assert parsed.content is None and [(c.name, c.arguments) for c in parsed.calls] == [("add", '{"a": 1,  "b": 2}')]
    assert tc.parse_output("not json", NAMED, "mistral").calls[0].arguments == "not json"
    text = '<tool_call>{"name": "add", "arguments": {}}</tool_call>'
    assert tc.parse_output(text, NONE, "hermes") == tc.Parsed(text, [])


def test_the_tools_a_call_may_name_are_the_requests() -> None:
    text = '<tool_call>{"name": "add", "arguments": {}}</tool_call>'
    only_ping = tc.ToolRequest((PING,), "auto")
    assert tc.parse_output(text, only_ping, "hermes") == tc.Parsed(text, [])


def test_unknown_parser() -> None:
    with pytest.raises(ValueError, match="parser"):
        tc.parse_output("hi", AUTO, "pythonic")


def test_detect_parser() -> None:
    assert tc.PARSERS == ("hermes", "llama3_json", "mistral")
    assert tc.detect_parser("{% for t in tools %}<tool_call>{{ t }}</tool_call>{% endfor %}") == "hermes"
    assert tc.detect_parser("{{ '[TOOL_CALLS]' }}{{ tool_calls|tojson }}") == "mistral"
    assert tc.detect_parser("<|python_tag|>{{ x }}") == "llama3_json"
    assert tc.detect_parser("{% if role == 'ipython' %}{{ t.parameters }}{% endif %}") == "llama3_json"
    assert tc.detect_parser("{% if role == 'ipython' %}{% endif %}") == "hermes"
    assert tc.detect_parser("{{ messages }}") == "hermes"


# ---- streaming ----------------------------------------------------------------------------------------


def stream(text: str, req: tc.ToolRequest, parser: str, pieces: list[str]) -> tuple[str, list[tuple[str, str]],
                                                                                       list[dict[str, Any]]]:
    """Feed `pieces` (which join to `text`); the joined content, the calls, and all deltas, shapes checked."""
    assert "".join(pieces) == text
    s = tc.ToolStream(req, parser)
    deltas = [d for p in pieces for d in s.feed(p)] + s.finish()
    content, calls = "", []
    for d in deltas:
        if "content" in d:
            assert set(d) == {"content"} and isinstance(d["content"], str) and d["content"]
            content += d["content"]
            continue
        assert set(d) == {"tool_calls"} and len(d["tool_calls"]) == 1
        call = d["tool_calls"][0]
        if "id" in call:  # the start of a call: its name, and no arguments yet
            assert call["index"] == len(calls) and CALL_ID.fullmatch(call["id"]) and call["type"] == "function"
            assert call["function"]["arguments"] == ""
            calls.append([call["function"]["name"], ""])
        else:
            assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
            assert call["index"] == len(calls) - 1
            calls[-1][1] += call["function"]["arguments"]
    assert s.called is bool(calls)
    return content, [tuple(c) for c in calls], deltas


def splits(text: str, rng: random.Random) -> list[list[str]]:
    """Ways to cut `text`: whole, 1-character pieces, and random cuts."""
    out = [[text], list(text)]
    for _ in range(6):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12)))) if len(text) > 1 else []
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return out


MODE_EXAMPLES = [(t, p, r) for t, p, r, _, _ in EXAMPLES] + [
    (' {"a": 1, "b": 2}  \n', "hermes", NAMED), ("", "hermes", NAMED), ("free text", "hermes", NAMED),
    ('<tool_call>{"name": "add"}</tool_call>', "hermes", NONE), ("", "hermes", AUTO), ("  ", "llama3_json", AUTO)]


@pytest.mark.parametrize(("text", "parser", "req"), MODE_EXAMPLES)
def test_streaming_matches_parse_output(text: str, parser: str, req: tc.ToolRequest) -> None:
    parsed = tc.parse_output(text, req, parser)
    want = [(c.name, c.arguments) for c in parsed.calls]
    rng = random.Random(text)
    for pieces in splits(text, rng):
        content, calls, _ = stream(text, req, parser, pieces)
        assert calls == want, pieces
        assert content == (parsed.content or ""), pieces


def _noise(rng: random.Random) -> str:
    """Random output made of the formats' pieces, mostly malformed."""
    words = ["<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "{", "}", "[", "]", ",", ";", ":",
             '"name"', '"arguments"', '"parameters"', '"add"', '"ping"', '"nope"', "{}", "1", " ", "\n", "x", '"',
             "\\", "<", "<tool", '{"name": "ping", "arguments": {}}', '{"name": "add", "parameters": {"a": [1]}}']
    return "".join(rng.choice(words) for _ in range(rng.randint(0, 30)))


@pytest.mark.parametrize("seed", range(4))
def test_streaming_is_split_independent_on_noise(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(80):
        text = _noise(rng)
        for parser, req in (("hermes", AUTO), ("llama3_json", AUTO), ("mistral", AUTO), ("hermes", REQUIRED)):
            parsed = tc.parse_output(text, req, parser)  # never raises on model output
            for pieces in splits(text, rng)[1:3]:
                content, calls, _ = stream(text, req, parser, pieces)
                assert calls == [(c.name, c.arguments) for c in parsed.calls], (text, parser, pieces)
                assert content == (parsed.content or ""), (text, parser, pieces)


def test_partial_markers_are_held_back() -> None:
    """Content deltas never carry a piece of a call marker, even when fed a character at a time."""
    checked = 0
    for text, parser, req, content, calls in EXAMPLES:
        if parser != "hermes" or req is not AUTO or "<" in (content or ""):
            continue
        checked += bool(calls)
        s = tc.ToolStream(req, parser)
        for ch in text:  # every "<" here starts a marker: none may reach the content
            assert all("<" not in d.get("content", "") for d in s.feed(ch)), text
    assert checked >= 8
    _, _, deltas = stream("Sure. <tool_call>", AUTO, "hermes", ["Sure. <", "tool_", "call>"])
    assert [d for d in deltas if "content" in d] == [{"content": "Sure."}, {"content": " <tool_call>"}]
    # a near miss is released as soon as it cannot be a marker
    s = tc.ToolStream(AUTO, "hermes")
    assert s.feed("a <tool") == [{"content": "a"}]
    assert s.feed("s") == [{"content": " <tools"}]


def test_auto_stream_emits_a_call_once_its_json_closes() -> None:
    s = tc.ToolStream(AUTO, "hermes")
    assert s.feed("Checking.\n<tool_call>\n") == [{"content": "Checking."}]
    assert s.feed('{"name": "get_weather", "arguments": {"city": "Oslo"}') == []
    assert not s.called
    start, args = s.feed("}")
    assert start["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert args == {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Oslo"}'}}]}
    assert s.called
    assert s.feed("\n</tool_call>\n") == [] and s.finish() == []


def test_named_stream_sends_arguments_as_they_come() -> None:
    s = tc.ToolStream(NAMED, "hermes")
    first = s.feed("")
    assert len(first) == 1 and first[0]["tool_calls"][0]["function"] == {"name": "add", "arguments": ""}
    assert s.called
    assert s.feed(' \n{"a": ') == [{"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}]
    assert s.feed("1}") == [{"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}]
    assert s.feed("\n") == [] and s.finish() == []
    late = tc.ToolStream(NAMED, "hermes")
    assert late.finish()[0]["tool_calls"][0]["function"]["name"] == "add"  # a call even when nothing was fed


def test_none_stream_is_all_content() -> None:
    s = tc.ToolStream(NONE, "hermes")
    assert s.feed("<tool_call>") == [{"content": "<tool_call>"}] and s.feed("") == [] and s.finish() == []
    assert not s.called


# ---- prompts and history ------------------------------------------------------------------------------


def test_fallback_system_prompt() -> None:
    text = tc.fallback_system_prompt(TOOLS)
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in text
    inside = text[text.index("<tools>\n") + 8:text.index("\n</tools>")]
    sigs = [json.loads(line) for line in inside.split("\n")]
    assert [s["function"]["name"] for s in sigs] == ["get_weather", "add", "ping"]
    assert sigs[0]["function"]["description"] == "Weather in a city"
    assert sigs[2]["function"]["parameters"] == {"type": "object", "properties": {}}


HISTORY = [
    {"role": "user", "content": "Weather in Oslo and 1+2?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": "not json"}}]},
    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "3"},
    {"role": "assistant", "content": "Sunny, and 3."},
]


def test_render_history_for_templates_with_tools() -> None:
    before = json.dumps(HISTORY)
    out = tc.render_history(HISTORY, True)
    assert json.dumps(HISTORY) == before  # the input is left alone
    assert out[0] == HISTORY[0] and out[4] == HISTORY[4]
    assert out[1]["content"] == ""
    assert out[1]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
        {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": "not json"}}]
    assert out[2] == HISTORY[2] and out[3] == HISTORY[3]
    bare = tc.render_history([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "ping"}}]}],
                             True)
    assert bare[0]["tool_calls"] == [{"type": "function", "function": {"name": "ping", "arguments": {}}}]


def test_render_history_as_text() -> None:
    out = tc.render_history(HISTORY, False)
    assert all("tool_calls" not in m and isinstance(m["content"], str) for m in out)
    assert out[1]["role"] == "assistant"
    assert out[1]["content"] == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
                                 '<tool_call>\n{"name": "add", "arguments": "not json"}\n</tool_call>')
    assert out[2] == {"role": "tool", "content": "<tool_response>\nsunny\n</tool_response>"}
    assert out[3] == {"role": "tool", "content": "<tool_response>\n3\n</tool_response>"}
    first_call = HISTORY[1]["tool_calls"][:1]
    said = tc.render_history([{"role": "assistant", "content": "Let me check.", "tool_calls": first_call}], False)
    assert said[0]["content"].startswith("Let me check.\n<tool_call>\n")
    # the text form parses back into the same call
    back = tc.parse_output(said[0]["content"], AUTO, "hermes")
    assert back.content == "Let me check." and calls_of(back) == [("get_weather", {"city": "Oslo"})]
    assert tc.render_history([{"role": "assistant", "content": None}], False) == [{"role": "assistant", "content": ""}]
