"""Which constraint a request's output must follow, read from the fields clients use for it.

OpenAI's `response_format` (`json_object`, `json_schema`), vLLM's `structured_outputs` object
(`json | regex | choice | grammar | json_object`) and its older top-level `guided_json`, `guided_regex`,
`guided_choice`, `guided_grammar`. One constraint per request; each is checked here (compiled without a
tokenizer, cached), so a malformed schema or regex is a 400 naming the field before any worker sees it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any, NamedTuple

from brigade.api_errors import ApiError
from brigade.engine import grammar
from brigade.engine.sampling import MAX_SPEC_CHARS

# vLLM's field names inside `structured_outputs`, and the older top-level ones, to our kinds.
_STRUCTURED = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar",
               "json_object": "json_object"}
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
FIELDS = frozenset({"response_format", "structured_outputs", *_GUIDED, "guided_decoding_backend",
                    "guided_whitespace_pattern"})
"""Request fields this module reads (the rest of them are accepted and ignored, as vLLM's backend choice)."""


class Constraint(NamedTuple):
    kind: str
    spec: str
    param: str  # where the request gave it, for error messages


def parse_constraint(data: Mapping[str, Any]) -> Constraint | None:
    """The request's constraint (checked), or None; ApiError 400 for a malformed or doubled one."""
    found = [c for c in (_response_format(data.get("response_format")), *_structured(data.get("structured_outputs")),
                         *_guided(data)) if c is not None]
    if len(found) > 1:
        raise ApiError(400, f"give one output constraint, not {len(found)} ({', '.join(c.param for c in found)})",
                       param=found[1].param)
    if not found:
        return None
    verify(found[0])
    return found[0]


def verify(c: Constraint) -> None:
    """400 naming `c.param` unless the constraint compiles."""
    if len(c.spec) > MAX_SPEC_CHARS:
        raise ApiError(400, f"{c.param} may be at most {MAX_SPEC_CHARS} characters", param=c.param)
    error = _check(c.kind, c.spec)
    if error:
        raise ApiError(400, f"invalid {c.param}: {error}", param=c.param)


@functools.lru_cache(maxsize=256)
def _check(kind: str, spec: str) -> str | None:
    return grammar.check(kind, spec)


def _dump(value: Any, param: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise ApiError(400, f"{param} is not valid JSON: {e}", param=param) from None


def _response_format(fmt: Any) -> Constraint | None:
    if fmt is None:
        return None
    if not isinstance(fmt, Mapping):
        raise ApiError(400, "response_format must be an object", param="response_format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object", "", "response_format")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, Mapping):
            raise ApiError(400, "response_format.json_schema must be an object", param="response_format.json_schema")
        name = spec.get("name")
        if name is not None and not isinstance(name, str):
            raise ApiError(400, "response_format.json_schema.name must be a string",
                           param="response_format.json_schema.name")
        schema = spec.get("schema")
        if schema is None:  # a schema-less json_schema asks for JSON, nothing more
            return Constraint("json_object", "", "response_format.json_schema")
        if not isinstance(schema, Mapping):
            raise ApiError(400, "response_format.json_schema.schema must be an object",
                           param="response_format.json_schema.schema")
        param = "response_format.json_schema.schema"
        return Constraint("json", _dump(schema, param), param)
    raise ApiError(400, f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                   param="response_format.type")


def _structured(raw: Any) -> list[Constraint | None]:
    if raw is None:
        return []
    if not isinstance(raw, Mapping):
        raise ApiError(400, "structured_outputs must be an object", param="structured_outputs")
    out: list[Constraint | None] = []
    for key, value in raw.items():
        kind = _STRUCTURED.get(key)
        if kind is None or value is None or value is False:
            continue  # vLLM's other knobs (disable_fallback, whitespace_pattern, ...) change nothing here
        out.append(_value(kind, value, f"structured_outputs.{key}"))
    return out


def _guided(data: Mapping[str, Any]) -> list[Constraint | None]:
    return [_value(kind, data[key], key) for key, kind in _GUIDED.items() if data.get(key) is not None]


def _value(kind: str, value: Any, param: str) -> Constraint:
    """One constraint as vLLM's fields give it: a schema as an object or its JSON text, a choice as a list."""
    if kind == "json_object":
        return Constraint("json_object", "", param)
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ApiError(400, f"{param} is not valid JSON: {e}", param=param) from None
        if not isinstance(value, Mapping):
            raise ApiError(400, f"{param} must be a JSON schema object", param=param)
        return Constraint("json", _dump(value, param), param)
    if kind == "choice":
        if not (isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)):
            raise ApiError(400, f"{param} must be a non-empty list of non-empty strings", param=param)
        return Constraint("choice", _dump(value, param), param)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{param} must be a non-empty string", param=param)
    return Constraint(kind, value, param)
