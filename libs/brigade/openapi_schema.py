"""The gateway's OpenAPI 3.1 document: request bodies with the fields and ranges `openai_api` accepts.

For clients and for fuzzing (tests/integration/test_openapi_fuzz.py). Unknown fields stay allowed (the server
ignores them, as vLLM does), and optional fields take null ("use the default"). Rules the schema cannot say
(one output constraint per request, min_tokens <= max_tokens, prompt + max_tokens within the context, token
ids inside the vocabulary) are 400s with the error body below. tests/unit/test_openapi_schema.py checks that
every field `parse_completion` / `parse_chat` knows is described here.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from importlib import metadata
from typing import Any

from brigade.engine.sampling import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS
from brigade.openai_api import MAX_N, MAX_PROMPTS
from brigade.tool_calls import MAX_TOOLS

INT31 = 2**31 - 1  # largest token id / top_k (int32)
REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": REF + name}


def _null(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` or null."""
    return {"anyOf": [schema, {"type": "null"}]}


def _opt(kind: str, description: str = "", **keywords: Any) -> dict[str, Any]:
    """An optional scalar field: `kind` or null."""
    out: dict[str, Any] = {"type": [kind, "null"], **keywords}
    if description:
        out["description"] = description
    return out


def _int(lo: int | None = None, hi: int | None = None, description: str = "") -> dict[str, Any]:
    bounds = {k: v for k, v in (("minimum", lo), ("maximum", hi)) if v is not None}
    return _opt("integer", description, **bounds)


def _obj(props: dict[str, Any], required: Sequence[str] = (), description: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = list(required)
    if description:
        out["description"] = description
    return out


def _when(field: str, value: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """A rule between fields: when `field` is given and matches `value`, the body must match `then`."""
    return {"if": {"properties": {field: value}, "required": [field]}, "then": then}


def _request(props: dict[str, Any], required: Sequence[str], *rules: dict[str, Any]) -> dict[str, Any]:
    return {**_obj(props, required), "allOf": [
        _when("stream_options", {"type": "object"}, _obj({"stream": {"const": True}}, ["stream"])), *rules]}


_STOP_STRING = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
_JSON_TEXT = {"type": "string", "contentMediaType": "application/json"}
_NAME = {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"}

SAMPLING: dict[str, Any] = {
    "temperature": _opt("number", "0 is greedy; no upper bound (as vLLM)", minimum=0),
    "top_p": _opt("number", "nucleus mass, in (0, 1]", exclusiveMinimum=0, maximum=1),
    "top_k": _int(-1, INT31, "-1 or 0: off"),
    "min_p": _opt("number", minimum=0, maximum=1),
    "seed": _int(-(2**63), 2**64 - 1, "n > 1: choice i uses seed + i"),
    "stop": _null({"anyOf": [_STOP_STRING, {"type": "array", "items": _STOP_STRING, "maxItems": MAX_STOP_STRINGS}]}),
    "stop_token_ids": _null({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": INT31},
                             "maxItems": MAX_STOP_TOKEN_IDS}),
    "presence_penalty": _opt("number", minimum=-2, maximum=2),
    "frequency_penalty": _opt("number", minimum=-2, maximum=2),
    "repetition_penalty": _opt("number", "> 0; 1 is off", exclusiveMinimum=0),
    "ignore_eos": _opt("boolean"),
    "min_tokens": _int(0, None, "at most max_tokens"),
    "include_stop_str_in_output": _opt("boolean"),
    "logit_bias": _null({"type": "object", "description": "token id (as a string) -> bias",
                         "propertyNames": {"pattern": "^[0-9]+$"}, "maxProperties": MAX_LOGIT_BIAS,
                         "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}}),
}

COMMON: dict[str, Any] = {
    "n": _int(1, MAX_N, "choices per prompt"),
    "stream": _opt("boolean", "server-sent events, ending with data: [DONE]"),
    "stream_options": _null(_obj({"include_usage": _opt("boolean")}, description="only with stream: true")),
    "max_tokens": _int(1, None, "prompt + max_tokens must fit the context"),
    "user": _opt("string"),
    "best_of": _int(1, None, "completions: only 1 or n (chat ignores it)"),
    **SAMPLING,
}

CONSTRAINTS: dict[str, Any] = {
    "structured_outputs": _null(_obj({
        "json": {"anyOf": [{"type": "object"}, _JSON_TEXT, {"type": "null"}], "description": "a JSON schema"},
        "regex": _opt("string", minLength=1), "choice": _null(_ref("Choices")), "grammar": _opt("string", minLength=1),
        "json_object": _opt("boolean")}, description="vLLM's: one of json, regex, choice, grammar, json_object")),
    "guided_json": {"anyOf": [{"type": "object"}, _JSON_TEXT, {"type": "null"}],
                    "description": "a JSON schema (or its text)"},
    "guided_regex": _opt("string", minLength=1),
    "guided_choice": _null(_ref("Choices")),
    "guided_grammar": _opt("string", "a Lark / GBNF grammar", minLength=1),
    "guided_decoding_backend": _opt("string", "accepted and ignored"),
    "guided_whitespace_pattern": _opt("string", "accepted and ignored"),
}

COMPLETION: dict[str, Any] = {
    "model": _ref("Model"),
    "prompt": _ref("Prompt"),
    "echo": _opt("boolean", "not with logprobs"),
    "suffix": _opt("string", "not supported: a non-empty suffix is a 400", maxLength=0),
    "logprobs": _int(0, MAX_LOGPROBS, "top logprobs per token"),
    **COMMON,
    "response_format": _null(_ref("ResponseFormat")),
    **CONSTRAINTS,
}

CHAT: dict[str, Any] = {
    "model": _ref("Model"),
    "messages": {"type": "array", "items": _ref("Message"), "minItems": 1},
    **COMMON,
    "max_completion_tokens": _int(1, None, "replaces max_tokens (wins when both are given)"),
    "logprobs": _opt("boolean"),
    "top_logprobs": _int(0, MAX_LOGPROBS, "needs logprobs: true"),
    "response_format": _null(_ref("ResponseFormat")),
    **CONSTRAINTS,
    "tools": _null({"type": "array", "items": _ref("Tool"), "maxItems": MAX_TOOLS}),
    "tool_choice": _null(_ref("ToolChoice")),
    "parallel_tool_calls": _opt("boolean"),
    "functions": _null({"type": "array", "items": _ref("Function"), "maxItems": MAX_TOOLS,
                        "description": "deprecated: tools"}),
    "function_call": _null({"anyOf": [{"enum": ["none", "auto"]}, _obj({"name": _NAME}, ["name"])],
                            "description": "deprecated: tool_choice"}),
    "add_generation_prompt": _opt("boolean", "default true"),
    "continue_final_message": _opt("boolean", "extend the last (assistant) message"),
    "chat_template": _opt("string", "a Jinja template replacing the model's"),
    "chat_template_kwargs": _null({"type": "object", "description": "extra template variables"}),
    "metadata": _null({"type": "object", "description": "accepted and ignored"}),
    "store": _opt("boolean", "accepted and ignored"),
    "service_tier": _opt("string", "accepted and ignored"),
}

COMPLETION_RULES = (_when("echo", {"const": True}, _obj({"logprobs": {"type": "null"}})),)
CHAT_RULES = (_when("top_logprobs", {"type": "integer"}, _obj({"logprobs": {"const": True}}, ["logprobs"])),
              _when("continue_final_message", {"const": True}, _obj({"add_generation_prompt": {"const": False}})))

_TEXT = {"type": "string", "minLength": 1}
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": INT31}, "minItems": 1}
_CALL = _obj({"id": _opt("string"), "type": {"const": "function"},
              "function": _obj({"name": {"type": "string"}, "arguments": {"type": "string"}}, ["name"])},
             ["function"])

COMPONENTS: dict[str, Any] = {
    "Prompt": {"description": f"text, token ids, or a list of up to {MAX_PROMPTS} of either (non-empty)", "anyOf": [
        _TEXT, _TOKEN_IDS,
        {"type": "array", "items": {"anyOf": [_TEXT, _TOKEN_IDS]}, "minItems": 1, "maxItems": MAX_PROMPTS},
    ]},
    "Message": _obj({
        "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _ref("TextPart")}, {"type": "null"}],
                    "description": "text, or text parts"},
        "name": _opt("string"),
        "tool_calls": _null({"type": "array", "items": _CALL, "description": "assistant: calls it made"}),
        "tool_call_id": _opt("string", "tool: the call this answers"),
    }, ["role"]),
    "TextPart": _obj({"type": {"const": "text"}, "text": {"type": "string"}}, ["type", "text"]),
    "Choices": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
    "ResponseFormat": {"oneOf": [
        _obj({"type": {"enum": ["text", "json_object"]}}, ["type"]),
        _obj({"type": {"const": "json_schema"}, "json_schema": _obj({
            "name": {"type": "string"}, "description": {"type": "string"}, "strict": _opt("boolean"),
            "schema": _null({"type": "object"})}, description="no schema: any JSON")}, ["type", "json_schema"]),
    ]},
    "Function": _obj({"name": _NAME, "description": _opt("string"), "parameters": _null({"type": "object"}),
                      "strict": _opt("boolean")}, ["name"]),
    "Tool": _obj({"type": {"const": "function"}, "function": _ref("Function")}, ["type", "function"]),
    "ToolChoice": {"anyOf": [{"enum": ["none", "auto", "required"]},
                             _obj({"type": {"const": "function"}, "function": _obj({"name": _NAME}, ["name"])},
                                  ["type", "function"])]},
    "Error": _obj({"error": _obj({
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
        "code": {"type": ["string", "null"]}}, ["message", "type", "param", "code"])}, ["error"]),
    "Usage": _obj({"prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
                   "total_tokens": {"type": "integer"}}, ["prompt_tokens", "completion_tokens", "total_tokens"]),
    "Completion": _obj({
        "id": {"type": "string"}, "object": {"const": "text_completion"}, "created": {"type": "integer"},
        "model": {"type": "string"}, "usage": _ref("Usage"), "choices": {"type": "array", "items": _obj({
            "index": {"type": "integer"}, "text": {"type": "string"},
            "finish_reason": {"type": ["string", "null"]}}, ["index", "text"])}},
        ["id", "object", "created", "model", "choices"]),
    "ChatCompletion": _obj({
        "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"},
        "model": {"type": "string"}, "usage": _ref("Usage"), "choices": {"type": "array", "items": _obj({
            "index": {"type": "integer"}, "message": _obj({
                "role": {"const": "assistant"}, "content": {"type": ["string", "null"]},
                "tool_calls": {"type": "array", "items": _CALL}}, ["role"]),
            "finish_reason": {"type": ["string", "null"]}}, ["index", "message"])}},
        ["id", "object", "created", "model", "choices"]),
    "ModelList": _obj({"object": {"const": "list"}, "data": {"type": "array", "items": _obj({
        "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
        "owned_by": {"type": "string"}, "max_model_len": {"type": "integer"}}, ["id", "object"])}},
        ["object", "data"]),
    "StreamEvent": _obj({"data": {"type": "string", "description": "a JSON chunk; the last event is [DONE]"}},
                        ["data"], "one server-sent event (OpenAPI 3.1: the schema describes each event)"),
    "Health": _obj({"status": {"enum": ["ok", "unavailable"]}, "reason": {"type": "string"}}, ["status"]),
}

ERRORS = {400: "invalid request", 401: "missing or wrong API key (with --api-key)", 404: "unknown model",
          413: "request body too large", 429: "too many concurrent requests", 500: "generation failed",
          503: "no worker available, or shutting down", 504: "generation timed out"}


def _errors(*statuses: int) -> dict[str, Any]:
    body = {"application/json": {"schema": _ref("Error")}}
    return {str(s): {"description": ERRORS[s], "content": body} for s in statuses}


def _post(summary: str, request: str, response: str) -> dict[str, Any]:
    return {"post": {
        "operationId": request[0].lower() + request[1:], "summary": summary,
        "security": [{}, {"bearer": []}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
        "responses": {
            "200": {"description": "the answer, or (stream: true) its chunks as server-sent events",
                    "content": {"application/json": {"schema": _ref(response)},
                                "text/event-stream": {"schema": _ref("StreamEvent")}}},
            **_errors(400, 401, 404, 413, 429, 500, 503, 504)}}}


def _get(summary: str, op: str, media: str, schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    ok = {"description": "OK", "content": {media: {"schema": schema}}}
    return {"get": {"operationId": op, "summary": summary, "responses": {"200": ok}, **extra}}


def _version() -> str:
    try:
        return metadata.version("brigade")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def openapi(served_models: Sequence[str]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the gateway serving `served_models` (the names clients may send as `model`)."""
    names = [served_models] if isinstance(served_models, str) else list(served_models)
    if not names:
        raise ValueError("served_models must name at least one model")
    models = _get("List the served models", "listModels", "application/json", _ref("ModelList"),
                  security=[{}, {"bearer": []}])
    models["get"]["responses"].update(_errors(401))
    health = _get("Readiness: a worker can serve the model", "health", "application/json", _ref("Health"))
    health["get"]["responses"]["503"] = {"description": "not connected to NATS, or no live worker yet",
                                         "content": {"application/json": {"schema": _ref("Health")}}}
    return copy.deepcopy({  # the parts are module constants: the caller may edit its copy
        "openapi": "3.1.0",
        "info": {"title": "Brigade", "version": _version(),
                 "description": "OpenAI-compatible LLM inference (plus vLLM's sampling and structured-output extras)"},
        "paths": {
            "/v1/completions": _post("Create a completion", "CompletionRequest", "Completion"),
            "/v1/chat/completions": _post("Create a chat completion", "ChatCompletionRequest", "ChatCompletion"),
            "/v1/models": models,
            "/health": health,
            "/metrics": _get("Prometheus metrics", "metrics", "text/plain", {"type": "string"}),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "only when the gateway runs with --api-key"}},
            "schemas": {
                "Model": {"type": "string", "enum": names},
                "CompletionRequest": _request(COMPLETION, ["model", "prompt"], *COMPLETION_RULES),
                "ChatCompletionRequest": _request(CHAT, ["model", "messages"], *CHAT_RULES),
                **COMPONENTS,
            },
        },
    })
