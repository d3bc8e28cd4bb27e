"""OpenAI tool calling: request validation, the generation constraint, output parsing (whole or streamed) and
the chat history for templates, as pure logic (no network, no torch).

Choices made where OpenAI, vLLM and the formats leave room:
- tool_choice "none" keeps the tools (the template still renders them, as OpenAI does) but parses nothing.
- "named": the output is the arguments object itself (the constraint is that tool's parameters schema); its
  arguments string is the output text with surrounding whitespace stripped, streamed or not.
- "required": the output is the JSON array `[{"name", "parameters"}, ...]` that vLLM constrains it to.
- Streamed and whole parses agree on every split of the output (the whole parse is the streamed one fed
  at once). So a call is kept once its JSON object is complete, even if the output breaks off after it.
- parallel_tool_calls=false is enforced by the "required" constraint only; "auto" output is parsed as is.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from brigade.api_errors import ApiError
from brigade.tool_parsers import PARSERS, REQUIRED, STYLES, Call, Scanner, detect_parser

__all__ = ["PARSERS", "ToolCall", "ToolMode", "ToolRequest", "ToolStream", "Parsed", "constraint", "detect_parser",
           "fallback_system_prompt", "parse_output", "parse_tools", "render_history"]

MAX_TOOLS = 128
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_DEF_KEYS = ("$defs", "definitions")  # where schemas keep the subschemas that "#/$defs/..." refs point to

ToolMode = Literal["none", "auto", "required", "named"]


def _bad(message: str, param: str) -> ApiError:
    return ApiError(400, message, param=param)


@dataclass(frozen=True)
class ToolRequest:
    """The tools of a chat request and how the model must use them."""

    tools: tuple[dict[str, Any], ...]  # the request's OpenAI tool objects, validated, as given (JSON-able)
    mode: ToolMode
    name: str | None = None  # the forced function's name when mode == "named"
    parallel: bool = True  # parallel_tool_calls

    @property
    def names(self) -> tuple[str, ...]:
        """The tools' function names, in order."""
        return tuple(t["function"]["name"] for t in self.tools)


def _params(tool: Mapping[str, Any]) -> dict[str, Any]:
    params = tool["function"].get("parameters")
    return {"type": "object", "properties": {}} if params is None else params  # a fresh default: callers may edit


def _check_function(fn: Any, where: str) -> None:
    if not isinstance(fn, Mapping):
        raise _bad(f"{where} must be an object", where)
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _bad(f"{where}.name must be 1-64 letters, digits, '_' or '-', got {name!r}", f"{where}.name")
    for key, kind, label in (("description", str, "a string"), ("parameters", Mapping, "a JSON object"),
                             ("strict", bool, "a boolean")):
        if fn.get(key) is not None and not isinstance(fn[key], kind):
            raise _bad(f"{where}.{key} must be {label}, got {fn[key]!r}", f"{where}.{key}")


def _tools(data: Mapping[str, Any]) -> tuple[tuple[dict[str, Any], ...], str]:
    """The tools (deprecated `functions` converted) and the field they came from."""
    tools, functions = data.get("tools"), data.get("functions")
    if tools is not None and functions is not None:
        raise _bad("give tools or the deprecated functions, not both", "functions")
    field = "functions" if functions is not None else "tools"
    raw = functions if functions is not None else tools
    if raw is None:
        return (), field
    if not isinstance(raw, list):
        raise _bad(f"{field} must be a list", field)
    if len(raw) > MAX_TOOLS:
        raise _bad(f"{field} holds {len(raw)} tools; at most {MAX_TOOLS} are allowed", field)
    out, seen = [], set()
    for i, item in enumerate(raw):
        if field == "functions":
            _check_function(item, f"functions[{i}]")
            item, where = {"type": "function", "function": item}, f"functions[{i}]"
        else:
            if not isinstance(item, Mapping):
                raise _bad(f"tools[{i}] must be an object", f"tools[{i}]")
            if item.get("type") != "function":
                raise _bad(f"tools[{i}].type must be 'function', got {item.get('type')!r}", f"tools[{i}].type")
            where = f"tools[{i}].function"
            _check_function(item.get("function"), where)
        name = item["function"]["name"]
        if name in seen:
            raise _bad(f"{where}.name: the function name {name!r} is given twice", f"{where}.name")
        seen.add(name)
        out.append(item)
    return tuple(out), field


def _choice(data: Mapping[str, Any]) -> tuple[Any, str]:
    """tool_choice, or the deprecated function_call as a tool_choice, and the field it came from."""
    if data.get("tool_choice") is not None or data.get("function_call") is None:
        return data.get("tool_choice"), "tool_choice"
    fc = data["function_call"]
    if isinstance(fc, Mapping):
        return {"type": "function", "function": fc}, "function_call"
    if fc in ("none", "auto"):
        return fc, "function_call"
    raise _bad(f"function_call must be 'none', 'auto' or {{\"name\": ...}}, got {fc!r}", "function_call")


def _named(choice: Any) -> str | None:
    """The function name of a {"type": "function", "function": {"name": ...}} tool_choice, else None."""
    if not isinstance(choice, Mapping) or choice.get("type") != "function":
        return None
    fn = choice.get("function")
    name = fn.get("name") if isinstance(fn, Mapping) else None
    return name if isinstance(name, str) else None


def parse_tools(data: Mapping[str, Any]) -> ToolRequest | None:
    """The tool request of a chat body (`tools`, `tool_choice`, `parallel_tool_calls`, or the deprecated
    `functions` / `function_call`); None when it has no tools and does not ask for a call."""
    tools, field = _tools(data)
    choice, cfield = _choice(data)
    parallel = data.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise _bad(f"parallel_tool_calls must be a boolean, got {parallel!r}", "parallel_tool_calls")
    parallel = True if parallel is None else parallel
    name = _named(choice)
    if choice is None:
        mode: ToolMode = "auto"
    elif choice in ("none", "auto", "required"):
        mode = choice
    elif name is not None:
        mode = "named"
    else:
        raise _bad(f"{cfield} must be 'none', 'auto', 'required' or "
                   f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {choice!r}", cfield)
    if not tools:
        if choice in (None, "none"):
            return None
        raise _bad(f"{cfield} {choice!r} needs {field} to be given", cfield)
    if name is not None and name not in (t["function"]["name"] for t in tools):
        raise _bad(f"{cfield} names the function {name!r}, which is not among the {field}", cfield)
    req = ToolRequest(tools, mode, name, parallel)
    if mode == "required":
        try:
            _hoisted_defs(req.tools)
        except ValueError as e:
            raise _bad(str(e), field) from e
    return req


def _hoisted_defs(tools: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The subschemas of every tool's parameters, by key ("$defs" / "definitions"): in the "required" schema
    the parameters are nested, and their "#/$defs/X" refs point at the document root."""
    out: dict[str, dict[str, Any]] = {}
    for tool in tools:
        params = _params(tool)
        for key in _DEF_KEYS:
            for name, sub in (params.get(key) or {}).items():
                if out.setdefault(key, {}).setdefault(name, sub) != sub:
                    raise ValueError(f"two tools define different schemas for {key}/{name}; "
                                     "tool_choice 'required' needs them to agree")
    return out


def constraint(req: ToolRequest) -> dict[str, Any] | None:
    """The JSON schema the output must follow: the forced tool's parameters ("named"), the array of calls
    ("required"), or None (the output is free)."""
    if req.mode == "named":
        return _params(next(t for t in req.tools if t["function"]["name"] == req.name))
    if req.mode != "required":
        return None
    items = [{"type": "object",
              "properties": {"name": {"type": "string", "const": t["function"]["name"]},
                             "parameters": {k: v for k, v in _params(t).items() if k not in _DEF_KEYS}},
              "required": ["name", "parameters"], "additionalProperties": False} for t in req.tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not req.parallel:
        schema["maxItems"] = 1
    return schema | _hoisted_defs(req.tools)


class ToolCall(NamedTuple):
    """One call the model made."""

    id: str
    name: str
    arguments: str  # a JSON string

    def body(self) -> dict[str, Any]:
        """The call as OpenAI's `message.tool_calls` item."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class Parsed(NamedTuple):
    """A whole output split into text and calls."""

    content: str | None  # None when the text around the calls is empty
    calls: list[ToolCall]


def _call_id() -> str:
    return "call_" + secrets.token_hex(12)


class ToolStream:
    """Incremental tool-call parsing for one streamed choice."""

    def __init__(self, req: ToolRequest, parser: str) -> None:
        if parser not in STYLES:
            raise ValueError(f"unknown tool-call parser {parser!r}; choose one of {PARSERS}")
        self.mode = req.mode
        style = REQUIRED if req.mode == "required" else STYLES[parser]
        self._scanner = Scanner(style, frozenset(req.names)) if req.mode in ("auto", "required") else None
        self._name = req.name or ""
        self._count = 0
        self._begun = False  # "named": the first non-whitespace arguments text was sent
        self._held = ""  # "named": trailing whitespace, sent only if more arguments text follows

    @property
    def called(self) -> bool:
        """True once at least one tool call was emitted."""
        return self._count > 0

    def feed(self, text: str) -> list[dict[str, Any]]:
        """Next text delta in, OpenAI chat `delta` dicts out."""
        if self._scanner is not None:
            return self._deltas(self._scanner.feed(text))
        if self.mode == "none":
            return [{"content": text}] if text else []
        out = [] if self._count else [self._start(self._name)]
        if not self._begun:
            text = text.lstrip()
            self._begun = bool(text)
        text = self._held + text
        keep = len(text.rstrip())
        self._held = text[keep:]
        return out + ([self._fragment(text[:keep])] if keep else [])

    def finish(self) -> list[dict[str, Any]]:
        """End of generation: what was held back."""
        if self._scanner is not None:
            return self._deltas(self._scanner.finish())
        return [self._start(self._name)] if self.mode == "named" and not self._count else []

    def _start(self, name: str) -> dict[str, Any]:
        self._count += 1
        return {"tool_calls": [{"index": self._count - 1, "id": _call_id(), "type": "function",
                                "function": {"name": name, "arguments": ""}}]}

    def _fragment(self, arguments: str) -> dict[str, Any]:
        return {"tool_calls": [{"index": self._count - 1, "function": {"arguments": arguments}}]}

    def _deltas(self, events: list[str | Call]) -> list[dict[str, Any]]:
        out = []
        for e in events:
            if isinstance(e, Call):
                out += [self._start(e.name), self._fragment(e.arguments)]
            else:
                out.append({"content": e})
        return out


def parse_output(text: str, req: ToolRequest, parser: str) -> Parsed:
    """A whole output split into content and calls (the same split that `ToolStream` gives)."""
    if req.mode == "none":
        return Parsed(text, [])
    stream = ToolStream(req, parser)
    content: list[str] = []
    calls: list[list[str]] = []  # [id, name, arguments]
    for delta in stream.feed(text) + stream.finish():
        if "content" in delta:
            content.append(delta["content"])
            continue
        call = delta["tool_calls"][0]
        if "id" in call:
            calls.append([call["id"], call["function"]["name"], ""])
        calls[-1][2] += call["function"]["arguments"]
    joined = "".join(content)
    return Parsed(joined if joined or not calls else None, [ToolCall(*c) for c in calls])


# ---- prompts -------------------------------------------------------------------------------------------


def fallback_system_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """A Hermes-style system text that tells the model about `tools`, for templates that cannot render them."""
    signatures = "\n".join(json.dumps({"type": "function", "function": {**t["function"], "parameters": _params(t)}},
                                      ensure_ascii=False) for t in tools)
    return ("You may call one or more functions to help with the user's request. The functions you can call are "
            "described below, one JSON signature per line, inside <tools></tools> tags:\n"
            f"<tools>\n{signatures}\n</tools>\n\n"
            "To call a function, reply with a JSON object holding its name and arguments inside "
            "<tool_call></tool_call> tags, one block per call, exactly like this:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _decoded(arguments: Any) -> Any:
    if arguments is None:
        return {}
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments  # not JSON: the template gets the string as the client sent it


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, list):  # text parts
        return "\n".join(part.get("text", "") for part in content)
    return content


def render_history(messages: list[dict[str, Any]], template_has_tools: bool) -> list[dict[str, Any]]:
    """Chat messages with their tool calls and results as chat templates take them: structured (arguments as
    a mapping: HF templates index them) when the template renders tools, else as Hermes text in the content."""
    out = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None) or []
        if template_has_tools:
            if m.get("content") is None:
                m["content"] = ""
            if calls:
                m["tool_calls"] = [{**({"id": c["id"]} if "id" in c else {}), "type": "function",
                                    "function": {"name": c["function"]["name"],
                                                 "arguments": _decoded(c["function"].get("arguments"))}}
                                   for c in calls]
        elif m.get("role") == "tool":
            m = {"role": "tool", "content": f"<tool_response>\n{_text(m.get('content'))}\n</tool_response>"}
        else:
            blocks = [json.dumps({"name": c["function"]["name"], "arguments": _decoded(c["function"].get("arguments"))},
                                 ensure_ascii=False) for c in calls]
            text = _text(m.get("content"))
            if blocks:
                m["content"] = "\n".join(([text] if text else []) + [f"<tool_call>\n{b}\n</tool_call>" for b in blocks])
            elif m.get("content") is None:
                m["content"] = ""
        out.append(m)
    return out
