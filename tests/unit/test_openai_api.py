"""OpenAI request parsing/validation and response bodies, without a network."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from brigade import openai_api as api
from brigade.model.tokenizer import Tokenizer
from brigade.protocol import TokenChunk

MODEL = "tiny"
MAX_LEN = 64


@pytest.fixture(scope="module")
def tok(tiny_models: dict[str, Path]) -> Tokenizer:
    return Tokenizer(tiny_models["llama"])


def completion(tok: Tokenizer, **body: Any) -> api.ApiRequest:
    return api.parse_completion(json.dumps({"model": MODEL, "prompt": "Hello world", **body}), tok, MODEL, MAX_LEN)


def chat(tok: Tokenizer, **body: Any) -> api.ApiRequest:
    msgs = [{"role": "user", "content": "hi"}]
    return api.parse_chat(json.dumps({"model": MODEL, "messages": msgs, **body}), tok, MODEL, MAX_LEN)


def error_of(fn: Any, *args: Any, **kwargs: Any) -> api.ApiError:
    with pytest.raises(api.ApiError) as info:
        fn(*args, **kwargs)
    return info.value


# ---- parsing ---------------------------------------------------------------------------------------------


def test_error_body_has_openai_shape() -> None:
    e = api.ApiError(400, "bad", param="n", code="x")
    assert e.body() == {"error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": "x"}}
    assert api.ApiError(429, "slow down").type == "rate_limit_error"
    assert api.ApiError(503, "down").type == "service_unavailable_error"


@pytest.mark.parametrize("raw", [b"{", b"[1, 2]", b"\xff\xfe", b'"text"'])
def test_malformed_json_is_400(tok: Tokenizer, raw: bytes) -> None:
    for parse in (api.parse_completion, api.parse_chat):
        e = error_of(parse, raw, tok, MODEL, MAX_LEN)
        assert (e.status, e.type, e.code) == (400, "invalid_request_error", "invalid_json")


def test_completion_defaults(tok: Tokenizer) -> None:
    req = completion(tok)
    assert req.kind == "completion" and req.model == MODEL
    assert req.prompts[0].ids == tuple(tok.encode("Hello world")) and req.prompts[0].text == "Hello world"
    assert (req.n, req.stream, req.include_usage, req.echo) == (1, False, False, False)
    assert req.params.max_tokens == api.DEFAULT_COMPLETION_MAX_TOKENS  # OpenAI legacy default, as vLLM
    assert req.params.logprobs is None


def test_completion_default_max_tokens_clipped_to_room(tok: Tokenizer) -> None:
    ids = list(range(10, 10 + MAX_LEN - 5))
    assert completion(tok, prompt=ids).params.max_tokens == 5


def test_chat_default_max_tokens_is_room_left(tok: Tokenizer) -> None:
    req = chat(tok)
    assert req.prompts[0].ids == tuple(tok.chat([{"role": "user", "content": "hi"}]))
    assert req.params.max_tokens == MAX_LEN - len(req.prompts[0].ids)


def test_sampling_fields_pass_through(tok: Tokenizer) -> None:
    req = completion(tok, max_tokens=7, temperature=0.5, top_p=0.9, top_k=5, min_p=0.1, seed=3, stop="x",
                      stop_token_ids=[1], presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.1,
                      ignore_eos=True, min_tokens=2, logprobs=3, n=2, stream=True,
                      stream_options={"include_usage": True}, user="ignored-unknown-field")
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (7, 0.5, 0.9, 5, 0.1, 3)
    assert (p.stop, p.stop_token_ids, p.ignore_eos, p.min_tokens, p.logprobs) == (("x",), (1,), True, 2, 3)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.1)
    assert (req.n, req.stream, req.include_usage) == (2, True, True)


def test_nulls_mean_defaults(tok: Tokenizer) -> None:
    req = completion(tok, max_tokens=None, temperature=None, n=None, stream=None, stop=None, logprobs=None)
    assert req.params.temperature == 1.0 and req.n == 1 and not req.stream


def test_prompt_forms(tok: Tokenizer) -> None:
    assert completion(tok, prompt=[5, 6, 7]).prompts == (api.Prompt((5, 6, 7)),)
    req = completion(tok, prompt=["a b", "c"], n=2)
    assert [p.text for p in req.prompts] == ["a b", "c"] and req.num_choices == 4
    assert req.prompt_of(3).text == "c"
    assert completion(tok, prompt=[[5, 6], [7]]).prompts[1].ids == (7,)
    assert completion(tok, prompt=[5, 6], echo=True).prompts[0].text == tok.decode([5, 6], skip_special_tokens=False)


def test_chat_logprobs_and_max_completion_tokens(tok: Tokenizer) -> None:
    assert chat(tok, logprobs=True).params.logprobs == 0
    assert chat(tok, logprobs=True, top_logprobs=4).params.logprobs == 4
    assert chat(tok, logprobs=False).params.logprobs is None
    assert chat(tok, max_tokens=3, max_completion_tokens=5).params.max_tokens == 5
    req = chat(tok, messages=[{"role": "system", "content": "be brief"},
                              {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                              {"role": "assistant", "content": None}])
    assert req.prompts[0].ids


def test_n_greedy_is_fine_and_seeds_differ_per_choice(tok: Tokenizer) -> None:
    req = completion(tok, n=3, temperature=0)
    assert req.n == 3 and all(req.choice_params(i) == req.params for i in range(3))
    seeded = completion(tok, n=3, seed=10)
    assert [seeded.choice_params(i).seed for i in range(3)] == [10, 11, 12]
    top = completion(tok, n=2, seed=2**64 - 1)
    assert top.choice_params(1).seed == 0  # wrapped, still a valid seed
    top.choice_params(1).validate()


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": None}, "model", None),
        ({"model": 3}, "model", None),
        ({"model": "gpt-4"}, "model", "model_not_found"),
        ({"n": 0}, "n", None),
        ({"n": 17}, "n", None),
        ({"n": "2"}, "n", None),
        ({"n": True}, "n", None),
        ({"stream": "yes"}, "stream", None),
        ({"stream_options": {"include_usage": True}}, "stream_options", None),
        ({"stream": True, "stream_options": {"include_usage": "y"}}, "stream_options.include_usage", None),
        ({"stream": True, "stream_options": [1]}, "stream_options", None),
        ({"max_tokens": 0}, "max_tokens", None),
        ({"max_tokens": "5"}, "max_tokens", None),
        ({"max_tokens": True}, "max_tokens", None),
        ({"max_tokens": 1000}, "max_tokens", "context_length_exceeded"),
        ({"temperature": -1}, "temperature", None),
        ({"temperature": "hot"}, "temperature", None),
        ({"top_p": 0}, "top_p", None),
        ({"top_p": 1.5}, "top_p", None),
        ({"top_k": -2}, "top_k", None),
        ({"min_p": 2}, "min_p", None),
        ({"presence_penalty": 3}, "presence_penalty", None),
        ({"frequency_penalty": -2.5}, "frequency_penalty", None),
        ({"repetition_penalty": 0}, "repetition_penalty", None),
        ({"seed": "x"}, "seed", None),
        ({"seed": 2**64}, "seed", None),
        ({"stop": 5}, "stop", None),
        ({"stop": ["ok", 3]}, "stop", None),
        ({"stop": [""]}, "stop", None),
        ({"stop": ["s"] * 17}, "stop", None),
        ({"stop_token_ids": [-1]}, "stop_token_ids", None),
        ({"stop_token_ids": "1"}, "stop_token_ids", None),
        ({"ignore_eos": "yes"}, "ignore_eos", None),
        ({"min_tokens": -1}, "min_tokens", None),
        ({"min_tokens": 9, "max_tokens": 4}, "min_tokens", None),
        ({"logprobs": 21}, "logprobs", None),
        ({"logprobs": True}, "logprobs", None),
        ({"echo": "no"}, "echo", None),
        ({"echo": True, "logprobs": 1}, "echo", None),
        ({"suffix": "x"}, "suffix", None),
        ({"logit_bias": {"5": 101}}, "logit_bias", None),
        ({"logit_bias": {"five": 1}}, "logit_bias", None),
        ({"logit_bias": [5]}, "logit_bias", None),
        ({"guided_regex": "[a-"}, "guided_regex", None),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", None),
        ({"best_of": 3}, "best_of", None),
        ({"prompt": None}, "prompt", None),
        ({"prompt": 5}, "prompt", None),
        ({"prompt": []}, "prompt", None),
        ({"prompt": ""}, "prompt", None),
        ({"prompt": {"text": "x"}}, "prompt", None),
        ({"prompt": ["ok", 5]}, "prompt", None),
        ({"prompt": [5, 10**6]}, "prompt", None),
        ({"prompt": [5, -1]}, "prompt", None),
        ({"prompt": ["x"] * 65}, "prompt", None),
        ({"prompt": list(range(MAX_LEN))}, "prompt", "context_length_exceeded"),
    ],
)
def test_completion_validation(tok: Tokenizer, body: dict[str, Any], param: str, code: str | None) -> None:
    e = error_of(completion, tok, **body)
    status = 404 if code == "model_not_found" else 400
    assert (e.status, e.param, e.code, e.type) == (status, param, code, "invalid_request_error")
    assert e.body()["error"]["param"] == param and e.message


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "other"}, "model", "model_not_found"),
        ({"messages": None}, "messages", None),
        ({"messages": []}, "messages", None),
        ({"messages": "hi"}, "messages", None),
        ({"messages": ["hi"]}, "messages[0]", None),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", None),
        ({"messages": [{"content": "x"}]}, "messages[0].role", None),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", None),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages[0].content", None),
        ({"max_tokens": 0}, "max_tokens", None),
        ({"max_completion_tokens": 0}, "max_completion_tokens", None),
        ({"max_completion_tokens": 1000}, "max_completion_tokens", "context_length_exceeded"),
        ({"messages": [{"role": "user", "content": "word " * MAX_LEN}]}, "messages", "context_length_exceeded"),
        ({"logprobs": 1}, "logprobs", None),
        ({"top_logprobs": 2}, "top_logprobs", None),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", None),
        ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools[0].function.name", None),
        ({"tool_choice": "required"}, "tool_choice", None),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
          "response_format": {"type": "json_object"}}, "tool_choice", None),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": 3}}]}]},
         "messages[0].tool_calls[0]", None),
        ({"response_format": {"type": "xml"}}, "response_format.type", None),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
         "response_format.json_schema.schema", None),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex", None),
        ({"n": 99}, "n", None),
        ({"temperature": -0.1}, "temperature", None),
    ],
)
def test_chat_validation(tok: Tokenizer, body: dict[str, Any], param: str, code: str | None) -> None:
    e = error_of(chat, tok, **body)
    assert (e.status, e.param, e.code) == (404 if code == "model_not_found" else 400, param, code)


def test_context_error_names_both_numbers(tok: Tokenizer) -> None:
    n_prompt = len(tok.encode("Hello world"))
    e = error_of(completion, tok, max_tokens=100)
    assert str(MAX_LEN) in e.message and f"{n_prompt} in the prompt" in e.message and "100" in e.message
    assert chat(tok, response_format={"type": "text"}).params  # text format is the default, so fine


# ---- responses -------------------------------------------------------------------------------------------


def token_text(t: int) -> str:
    return f"<{t}>"


def chunk(rid: str, ids: list[int], text: str, finish: str | None = None, lps: Any = None, n_out: int = 0,
          cached: int = 0) -> TokenChunk:
    return TokenChunk(rid, ids, text, finish, prompt_tokens=3, completion_tokens=n_out, cached_tokens=cached,
                      logprobs=lps)


def test_final_completion_body_with_logprobs_and_usage(tok: Tokenizer) -> None:
    req = completion(tok, prompt=[5, 6, 7], logprobs=1, n=2)
    choices = api.new_choices(req)
    choices[0].add(chunk("r-0", [9], "ab", lps=[[9, -0.5, [[9, -0.5], [8, -1.0]]]], cached=2))
    choices[0].add(chunk("r-0", [10], "c", "length", lps=[[10, float("-inf"), []]], n_out=2, cached=2))
    choices[1].add(chunk("r-1", [11], "x", "stop", lps=[[11, -0.1, [[12, -0.05]]]], n_out=1))
    body = api.final_body(req, "cmpl-1", 123, choices, token_text)
    assert body["object"] == "text_completion" and body["id"] == "cmpl-1" and body["model"] == MODEL
    c0, c1 = body["choices"]
    assert (c0["index"], c0["text"], c0["finish_reason"]) == (0, "abc", "length")
    assert c0["logprobs"] == {"tokens": ["<9>", "<10>"], "token_logprobs": [-0.5, api.LOGPROB_FLOOR],
                              "top_logprobs": [{"<9>": -0.5, "<8>": -1.0}, {"<10>": api.LOGPROB_FLOOR}],
                              "text_offset": [0, 3]}
    assert c1["logprobs"]["top_logprobs"] == [{"<12>": -0.05, "<11>": -0.1}]  # the sampled token included
    # The prompt is counted once, however many choices share it.
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                             "prompt_tokens_details": {"cached_tokens": 2}}
    json.dumps(body, allow_nan=False)


def test_final_completion_echo(tok: Tokenizer) -> None:
    req = completion(tok, prompt="Hi", echo=True)
    choices = api.new_choices(req)
    choices[0].add(chunk("r-0", [9], " there", "stop", n_out=1))
    assert api.final_body(req, "cmpl-1", 1, choices, token_text)["choices"][0]["text"] == "Hi there"


def test_final_chat_body(tok: Tokenizer) -> None:
    req = chat(tok, logprobs=True, top_logprobs=1)
    choices = api.new_choices(req)
    choices[0].add(chunk("r-0", [9], "é", "stop", lps=[[9, -0.25, [[9, -0.25]]]], n_out=1))
    body = api.final_body(req, "chatcmpl-1", 1, choices, lambda t: "é")
    assert body["object"] == "chat.completion"
    [c] = body["choices"]
    assert c["message"] == {"role": "assistant", "content": "é"} and c["finish_reason"] == "stop"
    entry = {"token": "é", "logprob": -0.25, "bytes": [195, 169]}
    assert c["logprobs"] == {"content": [{**entry, "top_logprobs": [entry]}]}
    assert body["usage"]["completion_tokens"] == 1
    assert body["usage"]["prompt_tokens"] == len(req.prompts[0].ids)
    assert api.final_body(chat(tok), "c", 1, api.new_choices(chat(tok)), token_text)["choices"][0]["logprobs"] is None


def test_chat_stream_chunks(tok: Tokenizer) -> None:
    req = chat(tok, n=2, stream=True, stream_options={"include_usage": True})
    fmt = api.StreamFormatter(req, "chatcmpl-1", 5, token_text)
    start = fmt.start()
    assert [c["choices"][0]["delta"] for c in start] == [{"role": "assistant", "content": ""}] * 2
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-1" for c in start)
    first = fmt.on_chunk(1, chunk("r-1", [9], "Hi", n_out=1))
    assert [c["choices"][0] for c in first] == [{"index": 1, "delta": {"content": "Hi"}, "logprobs": None,
                                                 "finish_reason": None}]
    last = fmt.on_chunk(1, chunk("r-1", [10], "!", "stop", n_out=2))
    assert [c["choices"][0]["delta"] for c in last] == [{"content": "!"}, {}]
    assert last[1]["choices"][0]["finish_reason"] == "stop"
    assert fmt.on_chunk(0, chunk("r-0", [], "", "length", n_out=4))[0]["choices"][0]["finish_reason"] == "length"
    [usage] = fmt.end()
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6


def test_completion_stream_chunks_keep_text_offset(tok: Tokenizer) -> None:
    req = completion(tok, prompt="Hi", stream=True, logprobs=0)
    fmt = api.StreamFormatter(req, "cmpl-1", 5, token_text)
    assert fmt.start() == [] and fmt.end() == []
    a = fmt.on_chunk(0, chunk("r-0", [9], "a", lps=[[9, -1.0, []]]))
    b = fmt.on_chunk(0, chunk("r-0", [10], "b", "stop", lps=[[10, -2.0, []]]))
    assert a[0]["object"] == "text_completion" and a[0]["choices"][0]["text"] == "a"
    assert a[0]["choices"][0]["logprobs"]["text_offset"] == [0]
    assert b[0]["choices"][0]["logprobs"]["text_offset"] == [3]  # after "<9>"
    assert b[1]["choices"][0] == {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop",
                                  "stop_reason": None}
    echo = api.StreamFormatter(completion(tok, prompt="Hi", stream=True, echo=True), "cmpl-2", 5, token_text)
    assert echo.start()[0]["choices"][0]["text"] == "Hi"


def test_logprob_floor() -> None:
    assert api.completion_logprobs([[1, float("nan"), None]], token_text)["token_logprobs"] == [api.LOGPROB_FLOOR]
    assert not math.isinf(api.chat_logprobs([[1, float("-inf"), []]], token_text)["content"][0]["logprob"])
    assert api.new_id("completion").startswith("cmpl-") and api.new_id("chat").startswith("chatcmpl-")


# ---- chat requests as clients send them ------------------------------------------------------------------

STRING_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}" \
                  "{% if add_generation_prompt %}<assistant>{% endif %}"
PARTS_TEMPLATE = "{% for m in messages %}{% for p in m['content'] %}[{{ p['text'] }}]{% endfor %}{% endfor %}"


def test_content_parts_are_joined_for_string_templates(tok: Tokenizer) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    req = api.parse_chat({"model": MODEL, "messages": parts, "chat_template": STRING_TEMPLATE}, tok, MODEL, MAX_LEN)
    assert tok.decode(req.prompts[0].ids, skip_special_tokens=False) == "<user>Hello\nthere\n<assistant>"


def test_content_format_follows_the_template() -> None:
    from brigade.model.tokenizer import content_format

    assert content_format(STRING_TEMPLATE) == "string"
    assert content_format(PARTS_TEMPLATE) == "openai"
    assert content_format("{% if message.content is string %}{{ message.content }}{% endif %}") == "openai"


def test_generation_prompt_and_continue_final_message(tok: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well"}]
    base = {"model": MODEL, "messages": msgs, "chat_template": STRING_TEMPLATE}

    def text(**body: Any) -> str:
        req = api.parse_chat({**base, **body}, tok, MODEL, MAX_LEN)
        return tok.decode(req.prompts[0].ids, skip_special_tokens=False)

    assert text().endswith("<assistant>Well\n<assistant>")
    assert text(add_generation_prompt=False).endswith("<assistant>Well\n")
    # The final message is left open (no trailing newline, no new turn) so the model carries it on.
    assert text(continue_final_message=True, add_generation_prompt=False).endswith("<assistant>Well")
    e = error_of(api.parse_chat, {**base, "continue_final_message": True, "add_generation_prompt": True},
                 tok, MODEL, MAX_LEN)
    assert (e.status, e.param) == (400, "continue_final_message")


def test_chat_template_kwargs_reach_the_template(tok: Tokenizer) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
            "chat_template": "{% if shout %}LOUD{% else %}quiet{% endif %}", "chat_template_kwargs": {"shout": True}}
    req = api.parse_chat(body, tok, MODEL, MAX_LEN)
    assert tok.decode(req.prompts[0].ids) == "LOUD"
    e = error_of(api.parse_chat, {**body, "chat_template_kwargs": [1]}, tok, MODEL, MAX_LEN)
    assert e.param == "chat_template_kwargs"
    e = error_of(api.parse_chat, {**body, "chat_template": "{% if %}"}, tok, MODEL, MAX_LEN)
    assert (e.status, e.param) == (400, "chat_template")


def test_served_names_and_unknown_fields(tok: Tokenizer) -> None:
    names = ("first", "second")
    req = api.parse_completion({"model": "second", "prompt": "x", "frobnicate": 1, "echo": False}, tok, names, MAX_LEN)
    assert req.model == "second" and req.ignored == ("frobnicate",)
    e = error_of(api.parse_completion, {"model": "third", "prompt": "x"}, tok, names, MAX_LEN)
    assert (e.status, e.code) == (404, "model_not_found") and "`first`, `second`" in e.message
    assert chat(tok, top_p=0.5).ignored == ()


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ("[" * 100_000 + "]" * 100_000, None),  # nested far past the recursion limit
        ('{"model": "tiny", "prompt": "\\ud800 lone"}', "prompt"),
        ('{"model": "tiny", "prompt": "x", "stop": ["\\udfff"]}', "stop"),
        ('{"model": "tiny", "prompt": "x", "top_k": 18446744073709551616}', "top_k"),
        ('{"model": "tiny", "prompt": "x", "stop_token_ids": [18446744073709551616]}', "stop_token_ids"),
        ('{"model": "tiny", "prompt": "x", "stop_token_ids": ' + json.dumps(list(range(300))) + "}", "stop_token_ids"),
        ('{"model": "tiny", "prompt": "x", "stop": ["' + "y" * 5000 + '"]}', "stop"),
    ],
)
def test_hostile_bodies_are_400s(tok: Tokenizer, raw: str, param: str | None) -> None:
    """Bodies that once got past validation and failed later (a 500): each is a 400 naming the field."""
    e = error_of(api.parse_completion, raw, tok, MODEL, MAX_LEN)
    assert (e.status, e.param) == (400, param), e.message
