"""The gateway's OpenAPI document: valid OpenAPI 3.1, and in step with what openai_api parses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import schemathesis

from brigade import openai_api as api
from brigade.model.tokenizer import Tokenizer
from brigade.openapi_schema import openapi

SERVED = ("tiny-llama", "/models/tiny-llama")
MAX_LEN = 512


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return openapi(SERVED)


@pytest.fixture(scope="module")
def tok(tiny_models: dict[str, Path]) -> Tokenizer:
    return Tokenizer(tiny_models["llama"])


def validator(doc: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    """A validator of components/schemas/`name`, its $refs resolved in `doc`."""
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": doc["components"]})


def test_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    assert doc["openapi"].startswith("3.1")
    schemathesis.openapi.from_dict(doc).validate()  # against the OpenAPI 3.1 meta-schema
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    broken = openapi(SERVED)
    broken["paths"]["/health"]["get"]["responses"]["200"] = {"content": "json"}
    with pytest.raises(ValueError):  # the validation above is not a no-op (jsonschema_rs.ValidationError)
        schemathesis.openapi.from_dict(broken).validate()


def test_document_has_every_route(doc: dict[str, Any]) -> None:
    ops = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert ops == {("/v1/completions", "post"), ("/v1/chat/completions", "post"), ("/v1/models", "get"),
                   ("/health", "get"), ("/metrics", "get")}
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = doc["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "404", "413", "429", "503"} <= responses.keys()
        for status, response in responses.items():
            if status != "200":
                assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert doc["components"]["schemas"]["Model"]["enum"] == list(SERVED)
    with pytest.raises(ValueError):
        openapi([])


@pytest.mark.parametrize(("name", "fields"), [("CompletionRequest", api.COMPLETION_FIELDS),
                                              ("ChatCompletionRequest", api.CHAT_FIELDS)])
def test_request_schemas_describe_exactly_the_parsed_fields(doc: dict[str, Any], name: str,
                                                           fields: frozenset[str]) -> None:
    schema = doc["components"]["schemas"][name]
    assert set(schema["properties"]) == set(fields), (
        f"missing from the schema: {sorted(fields - set(schema['properties']))}; "
        f"not parsed: {sorted(set(schema['properties']) - fields)}")
    assert schema.get("additionalProperties", True) is not False  # unknown fields are ignored, as vLLM does


def test_the_document_is_a_fresh_copy() -> None:
    first = openapi(SERVED)
    first["components"]["schemas"]["CompletionRequest"]["properties"].clear()
    assert openapi(SERVED)["components"]["schemas"]["CompletionRequest"]["properties"]


GOOD_COMPLETIONS: list[dict[str, Any]] = [
    {"prompt": "Hello"},
    {"prompt": [1, 2, 3], "max_tokens": 4, "n": 2, "seed": 7, "stop": ["\n"], "temperature": 0, "top_k": -1},
    {"prompt": ["a", [5, 6]], "logprobs": 2, "stream": True, "stream_options": {"include_usage": True}},
    {"prompt": "x", "echo": True, "logit_bias": {"5": -100}, "guided_choice": ["yes", "no"], "top_p": 1},
    {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}},
    {"prompt": "x", "suffix": None, "best_of": 1, "user": "u", "min_tokens": 1, "max_tokens": 2, "unknown": 1},
]
BAD_COMPLETIONS: list[dict[str, Any]] = [
    {}, {"prompt": []}, {"prompt": ""}, {"prompt": [[]]}, {"prompt": "x", "n": 0}, {"prompt": "x", "n": 17},
    {"prompt": "x", "max_tokens": 0}, {"prompt": "x", "top_p": 0}, {"prompt": "x", "temperature": -1},
    {"prompt": "x", "logprobs": 21}, {"prompt": "x", "stream_options": {"include_usage": True}},
    {"prompt": "x", "echo": True, "logprobs": 1}, {"prompt": "x", "stop": ""}, {"prompt": "x", "seed": 2**64},
    {"prompt": "x", "logit_bias": {"a": 1}}, {"prompt": "x", "response_format": {"type": "yaml"}},
    {"prompt": "x", "stream": "yes"}, {"prompt": "x", "presence_penalty": 3},
]
GOOD_CHATS: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "hi"}]},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text",
                                                                                           "text": "hi"}]}],
     "max_completion_tokens": 4, "logprobs": True, "top_logprobs": 3},
    {"messages": [{"role": "user", "content": "weather?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "c1", "type": "function", "function": {"name": "get", "arguments": "{}"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "sunny"}],
     "tools": [{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}],
     "tool_choice": "auto", "parallel_tool_calls": False},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}],
     "continue_final_message": True, "add_generation_prompt": False, "chat_template_kwargs": {"x": 1}},
    {"messages": [{"role": "developer", "content": "x"}], "response_format": {"type": "json_object"}, "store": True},
]
BAD_CHATS: list[dict[str, Any]] = [
    {}, {"messages": []}, {"messages": [{"role": "robot", "content": "hi"}]},
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
    {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
    {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "a b"}}]},
    {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "sometimes"},
    {"messages": [{"role": "user", "content": "hi"}], "continue_final_message": True, "add_generation_prompt": True},
    {"messages": [{"role": "user", "content": "hi"}], "logprobs": 1},
]


@pytest.mark.parametrize("body", GOOD_COMPLETIONS)
def test_good_completion_bodies_match_the_schema_and_parse(doc: dict[str, Any], tok: Tokenizer,
                                                           body: dict[str, Any]) -> None:
    body = {"model": SERVED[0], **body}
    validator(doc, "CompletionRequest").validate(body)
    api.parse_completion(body, tok, SERVED, MAX_LEN)


@pytest.mark.parametrize("body", BAD_COMPLETIONS)
def test_bad_completion_bodies_break_the_schema_and_are_400(doc: dict[str, Any], tok: Tokenizer,
                                                            body: dict[str, Any]) -> None:
    body = {"model": SERVED[0], **body}
    assert not validator(doc, "CompletionRequest").is_valid(body)
    with pytest.raises(api.ApiError) as e:
        api.parse_completion(body, tok, SERVED, MAX_LEN)
    assert e.value.status == 400


@pytest.mark.parametrize("body", GOOD_CHATS)
def test_good_chat_bodies_match_the_schema_and_parse(doc: dict[str, Any], tok: Tokenizer,
                                                     body: dict[str, Any]) -> None:
    body = {"model": SERVED[1], **body}
    validator(doc, "ChatCompletionRequest").validate(body)
    api.parse_chat(body, tok, SERVED, MAX_LEN)


@pytest.mark.parametrize("body", BAD_CHATS)
def test_bad_chat_bodies_break_the_schema_and_are_400(doc: dict[str, Any], tok: Tokenizer,
                                                      body: dict[str, Any]) -> None:
    body = {"model": SERVED[1], **body}
    assert not validator(doc, "ChatCompletionRequest").is_valid(body)
    with pytest.raises(api.ApiError) as e:
        api.parse_chat(body, tok, SERVED, MAX_LEN)
    assert e.value.status == 400


def test_an_unknown_model_breaks_the_schema(doc: dict[str, Any]) -> None:
    assert not validator(doc, "CompletionRequest").is_valid({"model": "gpt-4", "prompt": "x"})


def test_error_bodies_match_the_error_schema(doc: dict[str, Any]) -> None:
    for status in (400, 401, 404, 413, 429, 503):
        validator(doc, "Error").validate(api.ApiError(status, "no", param="n", code="c").body())
    validator(doc, "Error").validate(api.ApiError(400, "no").body())  # param and code null
