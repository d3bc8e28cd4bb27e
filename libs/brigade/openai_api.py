"""OpenAI request parsing, validation and response bodies: pure logic, no network.

The gateway calls `parse_completion` / `parse_chat` (off the event loop: they tokenize) and formats what the
workers stream back with `final_body` or a `StreamFormatter`.

Choices made where OpenAI and vLLM differ (clients and operators rely on them):
- Unknown model: 404 with code "model_not_found" and param "model", as OpenAI and vLLM; the response names
  the model as the client asked for it (one of the served names).
- Default max_tokens: completions 16 (OpenAI legacy, as vLLM), clipped to the room left in the context;
  chat: the whole room left (max_model_len - prompt tokens), as vLLM.
- An explicit max_tokens that does not fit beside the prompt is a 400 "context_length_exceeded".
- temperature has no upper bound (vLLM); other ranges come from SamplingParams.validate.
- Unknown fields are ignored (vLLM's default) and named in `ApiRequest.ignored` for the gateway's log; fields
  that would change the answer but are not implemented here (suffix, echo with logprobs) are a 400.
- Output constraints (`response_format`, `structured_outputs`, `guided_*`) are checked here (constraints.py) and
  travel in SamplingParams.structured; a worker compiles them for its tokenizer.
- Chat content given as a list of text parts is joined with newlines for templates that render content as a
  string, and passed as the list to templates that iterate over parts (`Tokenizer.content_format`), as vLLM.
- Logprob token strings are the decoded text of each token id, not the raw BPE piece.
- n is 1..16; a completions prompt list fans out to len(prompts) * n choices, index = prompt_i * n + i.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from brigade import constraints, tool_calls
from brigade.api_errors import ApiError
from brigade.engine.sampling import InvalidParams, SamplingParams, is_utf8
from brigade.model.tokenizer import content_format
from brigade.protocol import TokenChunk

MAX_N = 16
MAX_PROMPTS = 64
"""Most prompts in one completions request (each one fans out to n worker requests)."""

DEFAULT_COMPLETION_MAX_TOKENS = 16
LOGPROB_FLOOR = -9999.0
"""JSON has no -inf: a logprob below this is reported as this (vLLM does the same)."""

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})

_SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "ignore_eos", "min_tokens", "include_stop_str_in_output", "logit_bias",
)

_COMMON_FIELDS = frozenset({
    "model", "n", "stream", "stream_options", "max_tokens", "logprobs", "user", "logit_bias", "best_of",
    *_SAMPLING_FIELDS})
COMPLETION_FIELDS = _COMMON_FIELDS | constraints.FIELDS | {"prompt", "echo", "suffix"}
CHAT_FIELDS = _COMMON_FIELDS | constraints.FIELDS | {"function_call",
    "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "functions", "tool_choice",
    "parallel_tool_calls", "add_generation_prompt", "continue_final_message", "chat_template",
    "chat_template_kwargs", "metadata", "store", "service_tier"}

Kind = Literal["completion", "chat"]
TokenText = Callable[[int], str]
"""Token id -> its text, for logprob bodies."""


class TokenizerLike(Protocol):
    def __len__(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...
    def chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template: str | None = None,
             template_kwargs: Mapping[str, Any] | None = None,
             tools: list[dict[str, Any]] | None = None) -> list[int]: ...
    @property
    def content_format(self) -> str: ...


@dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]
    text: str | None = None  # known for text prompts, and decoded for id prompts when echo is on


@dataclass(frozen=True)
class ApiRequest:
    """A validated request: what to generate, and how to answer."""

    kind: Kind
    model: str
    prompts: tuple[Prompt, ...]
    params: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    ignored: tuple[str, ...] = ()  # fields of the body this server does not know (logged, as vLLM does)
    tools: tool_calls.ToolRequest | None = None  # chat with tools: how the output is read (tool_calls.py)
    tool_parser: str = "hermes"  # the format of tool calls in the output, for tool_choice "auto"

    @property
    def reads_tools(self) -> bool:
        """True when the output may hold tool calls to parse."""
        return self.tools is not None and self.tools.mode != "none"

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    def prompt_of(self, index: int) -> Prompt:
        return self.prompts[index // self.n]

    def choice_params(self, index: int) -> SamplingParams:
        """Params of choice `index`: with a seed, seed + i so the n choices differ yet stay reproducible."""
        i = index % self.n
        if self.params.seed is None or i == 0:
            return self.params
        seed = self.params.seed + i
        # Stay inside the accepted seed range (wrap a huge unsigned seed; a negative one only moves up).
        return replace(self.params, seed=seed % 2**64 if seed >= 0 else seed)


# ---- parsing ---------------------------------------------------------------------------------------------


def parse_json(body: bytes | str) -> dict[str, Any]:
    """The request body as a JSON object, or a 400."""
    try:
        data = json.loads(body)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise ApiError(400, f"malformed JSON body: {e}", code="invalid_json") from e
    except RecursionError:  # nesting thousands deep
        raise ApiError(400, "malformed JSON body: nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    return data


def parse_completion(body: bytes | str | Mapping[str, Any], tokenizer: TokenizerLike, served_model: str | Sequence[str],
                     max_model_len: int) -> ApiRequest:
    """Validate a /v1/completions body and tokenize its prompt(s); ApiError on bad input."""
    data = body if isinstance(body, Mapping) else parse_json(body)
    model = _model(data, served_model)
    n, stream, include_usage = _fanout(data)
    echo = _bool(data, "echo", False)
    _reject_unsupported(data, ("suffix",))
    best_of = data.get("best_of")
    if best_of is not None and best_of not in (1, n):
        raise ApiError(400, "best_of other than n is not supported", param="best_of")
    logprobs = data.get("logprobs")
    if echo and logprobs is not None:
        raise ApiError(400, "echo with logprobs needs prompt logprobs, which this server does not compute",
                       param="echo")
    explicit = _max_tokens(data, "max_tokens")
    prompts = _completion_prompts(data.get("prompt"), tokenizer, echo)
    longest = max(len(p.ids) for p in prompts)
    if explicit is None:
        max_tokens = min(DEFAULT_COMPLETION_MAX_TOKENS, _room(longest, max_model_len, "prompt"))
    else:
        max_tokens = _fit(longest, explicit, max_model_len, "prompt", "max_tokens")
    params = _params(data, max_tokens, logprobs, {"max_tokens": "max_tokens"}, constraints.parse_constraint(data))
    return ApiRequest("completion", model, prompts, params, n, stream, include_usage, echo,
                      _unknown(data, COMPLETION_FIELDS))


def parse_chat(body: bytes | str | Mapping[str, Any], tokenizer: TokenizerLike, served_model: str | Sequence[str],
               max_model_len: int, tool_parser: str = "auto") -> ApiRequest:
    """Validate a /v1/chat/completions body and render its messages (and tools) with the chat template.

    `tool_parser`: the format tool calls take in this model's output; "auto" guesses it from the template."""
    data = body if isinstance(body, Mapping) else parse_json(body)
    model = _model(data, served_model)
    n, stream, include_usage = _fanout(data)
    constraint = constraints.parse_constraint(data)
    tools = tool_calls.parse_tools(data)
    schema = tool_calls.constraint(tools) if tools is not None else None
    if schema is not None:
        if constraint is not None:
            raise ApiError(400, f"this tool_choice constrains the output; it cannot be combined with "
                           f"{constraint.param}", param="tool_choice")
        constraint = constraints.Constraint("json", json.dumps(schema, ensure_ascii=False), "tools")
        constraints.verify(constraint)
    # max_completion_tokens replaces the deprecated max_tokens; it wins when both are given.
    field_name = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    explicit = _max_tokens(data, field_name)
    want_logprobs = _bool(data, "logprobs", False)
    top = data.get("top_logprobs")
    if top is not None and not want_logprobs:
        raise ApiError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    logprobs = (0 if top is None else top) if want_logprobs else None
    add_generation_prompt = _bool(data, "add_generation_prompt", True)
    continue_final = _bool(data, "continue_final_message", False)
    if add_generation_prompt and continue_final and "add_generation_prompt" in data:
        raise ApiError(400, "continue_final_message and add_generation_prompt cannot both be true",
                       param="continue_final_message")
    template = data.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise ApiError(400, f"chat_template must be a string, got {template!r}", param="chat_template")
    parts = content_format(template) if template is not None else tokenizer.content_format
    messages = _messages(data.get("messages"), parts == "string")
    source = template if template is not None else (getattr(tokenizer, "chat_template", None) or "")
    messages, template_tools = _with_tools(messages, tools, source)
    if tool_parser == "auto":
        tool_parser = tool_calls.detect_parser(source)
    if continue_final and messages[-1]["role"] != "assistant":
        raise ApiError(400, "continue_final_message needs an assistant message last", param="continue_final_message")
    kwargs = data.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ApiError(400, f"chat_template_kwargs must be an object, got {kwargs!r}", param="chat_template_kwargs")
    try:
        ids = tokenizer.chat(messages, add_generation_prompt and not continue_final, continue_final, template,
                             kwargs, template_tools)
    except Exception as e:  # a template is the client's code: whatever it raises (ModelError for
        # no template, TemplateError, a TypeError from a colliding kwarg, ZeroDivisionError, RecursionError, the
        # sandbox's OverflowError) is the request's fault, not the server's
        raise ApiError(400, f"cannot apply the chat template: {e}",
                       param="chat_template" if template is not None else "messages") from e
    if not ids:
        raise ApiError(400, "messages render to an empty prompt", param="messages")
    if explicit is None:
        max_tokens = _room(len(ids), max_model_len, "messages")
    else:
        max_tokens = _fit(len(ids), explicit, max_model_len, "messages", field_name)
    params = _params(data, max_tokens, logprobs, {"max_tokens": field_name, "logprobs": "top_logprobs"}, constraint)
    return ApiRequest("chat", model, (Prompt(tuple(ids)),), params, n, stream, include_usage,
                      ignored=_unknown(data, CHAT_FIELDS), tools=tools, tool_parser=tool_parser)


def _with_tools(messages: list[dict[str, Any]], tools: tool_calls.ToolRequest | None,
                template: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages ready for the template, and the tools to hand it. A template that renders tools gets them (and
    tool calls in the history as structured fields); for one that does not, the tools are described in the
    system message and earlier calls and results are written into the text, in the Hermes format."""
    renders = "tools" in template
    messages = tool_calls.render_history(messages, renders)
    if tools is None:
        return messages, None
    if renders:
        return messages, [dict(t) for t in tools.tools]
    if tools.mode != "none":
        text = tool_calls.fallback_system_prompt(tools.tools)
        if messages[0]["role"] == "system" and isinstance(messages[0]["content"], str):
            messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}
        else:
            messages.insert(0, {"role": "system", "content": text})
    return messages, None


def _model(data: Mapping[str, Any], served: str | Sequence[str]) -> str:
    names = (served,) if isinstance(served, str) else tuple(served)
    model = data.get("model")
    if model is None:
        raise ApiError(400, "you must provide a model parameter", param="model")
    if not isinstance(model, str):
        raise ApiError(400, f"model must be a string, got {model!r}", param="model")
    if model not in names:
        raise ApiError(404, f"The model `{model}` does not exist; this server serves "
                       f"{', '.join(f'`{n}`' for n in names)}", param="model", code="model_not_found")
    return model


def _unknown(data: Mapping[str, Any], known: frozenset[str]) -> tuple[str, ...]:
    return tuple(sorted(k for k in data if k not in known))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bool(data: Mapping[str, Any], name: str, default: bool) -> bool:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be a boolean, got {value!r}", param=name)
    return value


def _fanout(data: Mapping[str, Any]) -> tuple[int, bool, bool]:
    """n, stream and stream_options.include_usage."""
    n = data.get("n")
    n = 1 if n is None else n
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise ApiError(400, f"n must be an integer in [1, {MAX_N}], got {n!r}", param="n")
    stream = _bool(data, "stream", False)
    options = data.get("stream_options")
    if options is None:
        return n, stream, False
    if not stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if not isinstance(options, Mapping):
        raise ApiError(400, f"stream_options must be an object, got {options!r}", param="stream_options")
    try:
        include_usage = _bool(options, "include_usage", False)
    except ApiError as e:
        raise ApiError(400, e.message, param="stream_options.include_usage") from e
    return n, stream, include_usage


def _reject_unsupported(data: Mapping[str, Any], names: Sequence[str]) -> None:
    for name in names:
        if data.get(name):  # None, "", {} and [] mean "not used"
            raise ApiError(400, f"{name} is not supported by this server", param=name)


def _max_tokens(data: Mapping[str, Any], name: str) -> int | None:
    value = data.get(name)
    if value is not None and (not _is_int(value) or value < 1):
        raise ApiError(400, f"{name} must be an integer >= 1, got {value!r}", param=name)
    return value


def _room(prompt_len: int, max_model_len: int, param: str) -> int:
    room = max_model_len - prompt_len
    if room < 1:
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens, but the {param} is "
                       f"{prompt_len} tokens, leaving no room for the completion", param=param,
                       code="context_length_exceeded")
    return room


def _fit(prompt_len: int, max_tokens: int, max_model_len: int, where: str, param: str) -> int:
    _room(prompt_len, max_model_len, where)
    if prompt_len + max_tokens > max_model_len:
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                       f"{prompt_len + max_tokens} tokens ({prompt_len} in the {where}, {max_tokens} for the "
                       f"completion). Please reduce the length of the {where} or {param}.", param=param,
                       code="context_length_exceeded")
    return max_tokens


def _params(data: Mapping[str, Any], max_tokens: int, logprobs: Any, rename: Mapping[str, str],
            constraint: constraints.Constraint | None = None) -> SamplingParams:
    """SamplingParams from the body; InvalidParams becomes a 400 naming the field as the client spelled it."""
    kwargs = {name: data[name] for name in _SAMPLING_FIELDS if data.get(name) is not None}
    if constraint is not None:
        kwargs["structured"] = (constraint.kind, constraint.spec)
        rename = {**rename, "structured": constraint.param}
    try:
        return SamplingParams.from_dict({**kwargs, "max_tokens": max_tokens, "logprobs": logprobs})
    except InvalidParams as e:
        raise ApiError(400, str(e), param=rename.get(e.param, e.param)) from e
    except TypeError as e:  # a value of a type SamplingParams cannot even hold (e.g. an unhashable stop)
        raise ApiError(400, f"invalid sampling parameter: {e}") from e


def _completion_prompts(raw: Any, tokenizer: TokenizerLike, echo: bool) -> tuple[Prompt, ...]:
    """A string, a token-id list, or a list of either, as Prompts (each non-empty and inside the vocabulary)."""
    if raw is None:
        raise ApiError(400, "you must provide a prompt", param="prompt")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and all(_is_int(t) for t in raw)):
        items: list[Any] = [raw]
    elif isinstance(raw, list) and raw:
        items = raw
    else:
        raise ApiError(400, "prompt must be a string, a list of token ids, or a non-empty list of either",
                       param="prompt")
    if len(items) > MAX_PROMPTS:
        raise ApiError(400, f"at most {MAX_PROMPTS} prompts per request, got {len(items)}", param="prompt")
    vocab = len(tokenizer)
    prompts = []
    for item in items:
        if isinstance(item, str):
            if not is_utf8(item):
                raise ApiError(400, "prompt must be valid Unicode (a lone surrogate is not)", param="prompt")
            prompt = Prompt(tuple(tokenizer.encode(item)), item)
        elif isinstance(item, list) and all(_is_int(t) for t in item):
            bad = next((t for t in item if not 0 <= t < vocab), None)
            if bad is not None:
                raise ApiError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
            prompt = Prompt(tuple(item), tokenizer.decode(item, skip_special_tokens=False) if echo else None)
        else:
            raise ApiError(400, "prompt list items must be strings or lists of token ids", param="prompt")
        if not prompt.ids:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        prompts.append(prompt)
    return tuple(prompts)


def _messages(raw: Any, flatten: bool) -> list[dict[str, Any]]:
    """Chat messages reduced to role + content (text only) and the tool fields, checked field by field; `flatten`
    joins a list of text parts into one string (for templates that render content as a string)."""
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, Mapping):
            raise ApiError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {sorted(CHAT_ROLES)}, got {role!r}",
                           param=f"messages[{i}].role")
        content = m.get("content")
        if content is None:
            content = ""  # an assistant turn may carry no text
        elif isinstance(content, list):
            for part in content:
                if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                                   param=f"messages[{i}].content")
            if flatten:
                content = "\n".join(part["text"] for part in content)
        elif not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of parts",
                           param=f"messages[{i}].content")
        message: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant" and m.get("tool_calls"):
            message["tool_calls"] = _history_calls(m["tool_calls"], i)
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if m.get(key) is not None:
                    if not isinstance(m[key], str):
                        raise ApiError(400, f"messages[{i}].{key} must be a string", param=f"messages[{i}].{key}")
                    message[key] = m[key]
        out.append(message)
    return out


def _history_calls(raw: Any, i: int) -> list[dict[str, Any]]:
    """An assistant message's tool_calls as OpenAI gives them back: id, type, function {name, arguments}."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(raw, list):
        raise ApiError(400, f"{where} must be a list", param=where)
    calls = []
    for j, c in enumerate(raw):
        fn = c.get("function") if isinstance(c, Mapping) else None
        if not (isinstance(fn, Mapping) and isinstance(fn.get("name"), str)
                and isinstance(fn.get("arguments", ""), str)):
            raise ApiError(400, f"{where}[{j}] must be {{\"type\": \"function\", \"function\": {{\"name\": str, "
                           f"\"arguments\": str}}}}", param=f"{where}[{j}]")
        call: dict[str, Any] = {"type": "function", "function": {"name": fn["name"],
                                                                 "arguments": fn.get("arguments", "")}}
        if isinstance(c.get("id"), str):
            call["id"] = c["id"]
        calls.append(call)
    return calls


# ---- responses -------------------------------------------------------------------------------------------


def new_id(kind: Kind) -> str:
    return ("cmpl-" if kind == "completion" else "chatcmpl-") + secrets.token_hex(12)


@dataclass
class ChoiceState:
    """What one choice has received so far."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)  # protocol entries: [token, logprob, [[id, lp], ...]]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    offset: int = 0  # completions text_offset of the next token

    def add(self, chunk: TokenChunk) -> None:
        self.text += chunk.text
        self.token_ids.extend(chunk.token_ids)
        if chunk.logprobs:
            self.logprobs.extend(chunk.logprobs)
        if chunk.finish_reason is not None:
            self.finish_reason, self.stop_reason = chunk.finish_reason, chunk.stop_reason
        # The worker's counts are cumulative (and survive a replay); fall back to what we saw.
        self.completion_tokens = max(chunk.completion_tokens, len(self.token_ids))
        self.cached_tokens = max(self.cached_tokens, chunk.cached_tokens)


def new_choices(req: ApiRequest) -> list[ChoiceState]:
    return [ChoiceState(i, offset=len(req.prompt_of(i).text or "") if req.echo else 0)
            for i in range(req.num_choices)]


def usage(req: ApiRequest, choices: Sequence[ChoiceState]) -> dict[str, Any]:
    """Token counts: each prompt once (however many choices share it), every choice's completion."""
    prompt = sum(len(p.ids) for p in req.prompts)
    completion = sum(c.completion_tokens for c in choices)
    cached = sum(max((c.cached_tokens for c in choices[p * req.n:(p + 1) * req.n]), default=0)
                 for p in range(len(req.prompts)))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _lp(value: float) -> float:
    return value if math.isfinite(value) and value > LOGPROB_FLOOR else LOGPROB_FLOOR


def completion_logprobs(entries: Sequence[Any], token_text: TokenText, offset: int = 0) -> dict[str, Any]:
    """Legacy completions logprobs: parallel lists; top_logprobs maps token text -> logprob (sampled included)."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token_id, logprob, top in entries:
        text = token_text(token_id)
        tokens.append(text)
        token_logprobs.append(_lp(logprob))
        alts = {token_text(t): _lp(lp) for t, lp in top or ()}
        alts.setdefault(text, _lp(logprob))
        tops.append(alts)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: Sequence[Any], token_text: TokenText) -> dict[str, Any]:
    """Chat logprobs: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""

    def one(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": _lp(logprob), "bytes": list(text.encode("utf-8"))}

    return {"content": [{**one(t, lp), "top_logprobs": [one(a, alp) for a, alp in top or ()]}
                        for t, lp, top in entries]}


def final_body(req: ApiRequest, request_id: str, created: int, choices: Sequence[ChoiceState],
               token_text: TokenText) -> dict[str, Any]:
    """The non-streaming response body."""
    want_lp = req.params.logprobs is not None
    out: list[dict[str, Any]] = []
    for c in choices:
        if req.kind == "completion":
            prefix = (req.prompt_of(c.index).text or "") if req.echo else ""
            out.append({"index": c.index, "text": prefix + c.text,
                        "logprobs": completion_logprobs(c.logprobs, token_text, len(prefix)) if want_lp else None,
                        "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        else:
            message: dict[str, Any] = {"role": "assistant", "content": c.text}
            finish = c.finish_reason
            if req.tools is not None and req.reads_tools:
                parsed = tool_calls.parse_output(c.text, req.tools, req.tool_parser)
                message["content"] = parsed.content
                if parsed.calls:
                    message["tool_calls"] = [call.body() for call in parsed.calls]
                    finish = "tool_calls" if finish == "stop" else finish
            out.append({"index": c.index, "message": message,
                        "logprobs": chat_logprobs(c.logprobs, token_text) if want_lp else None,
                        "finish_reason": finish, "stop_reason": c.stop_reason})
    obj = "text_completion" if req.kind == "completion" else "chat.completion"
    return {"id": request_id, "object": obj, "created": created, "model": req.model, "choices": out,
            "usage": usage(req, choices)}


class StreamFormatter:
    """Streaming chunk bodies for one request: `start()`, then `on_chunk()` per TokenChunk, then `end()`.

    Chat: a role chunk per choice, content deltas, then a finish chunk with an empty delta.
    Completions: text chunks (the prompt first when echo), then a finish chunk with empty text.
    `end()` gives the usage chunk (choices []) when include_usage was asked for.
    """

    def __init__(self, req: ApiRequest, request_id: str, created: int, token_text: TokenText) -> None:
        self.req = req
        self.id = request_id
        self.created = created
        self.token_text = token_text
        self.choices = new_choices(req)
        self.object = "text_completion" if req.kind == "completion" else "chat.completion.chunk"
        self.tools = ([tool_calls.ToolStream(req.tools, req.tool_parser) for _ in self.choices]
                      if req.tools is not None and req.reads_tools else None)

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.req.model,
                "choices": [choice]}

    def _choice(self, index: int, content: str | None, logprobs: Any, finish: str | None = None,
                stop_reason: str | int | None = None, role: bool = False) -> dict[str, Any]:
        if self.req.kind == "completion":
            return {"index": index, "text": content or "", "logprobs": logprobs, "finish_reason": finish,
                    "stop_reason": stop_reason}
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if content is not None:
            delta["content"] = content
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def start(self) -> list[dict[str, Any]]:
        if self.req.kind == "chat":
            return [self._chunk(self._choice(c.index, "", None, role=True)) for c in self.choices]
        if self.req.echo:
            return [self._chunk(self._choice(c.index, self.req.prompt_of(c.index).text, None)) for c in self.choices]
        return []

    def on_chunk(self, index: int, chunk: TokenChunk) -> list[dict[str, Any]]:
        if self.tools is not None:
            return self._on_tool_chunk(index, chunk)
        state = self.choices[index]
        offset = state.offset
        state.add(chunk)
        out = []
        if chunk.text or chunk.logprobs:
            lp: Any = None
            if self.req.params.logprobs is not None and chunk.logprobs:
                if self.req.kind == "completion":
                    lp = completion_logprobs(chunk.logprobs, self.token_text, offset)
                    state.offset = offset + sum(len(t) for t in lp["tokens"])
                else:
                    lp = chat_logprobs(chunk.logprobs, self.token_text)
            out.append(self._chunk(self._choice(index, chunk.text, lp)))
        if chunk.finish_reason is not None:
            out.append(self._chunk(self._choice(index, None, None, chunk.finish_reason, chunk.stop_reason)))
        return out

    def _on_tool_chunk(self, index: int, chunk: TokenChunk) -> list[dict[str, Any]]:
        """Chat with tools: the text goes through the choice's ToolStream, which turns calls into tool_calls
        deltas (the id and name first, then the arguments) and passes the rest on as content."""
        assert self.tools is not None
        stream = self.tools[index]
        self.choices[index].add(chunk)
        deltas = stream.feed(chunk.text) if chunk.text else []
        if chunk.finish_reason is not None:
            deltas += stream.finish()
        lp: Any = None
        if self.req.params.logprobs is not None and chunk.logprobs:
            lp = chat_logprobs(chunk.logprobs, self.token_text)
        out = []
        for d in deltas or ([{}] if lp else []):
            out.append(self._chunk({"index": index, "delta": d, "logprobs": lp, "finish_reason": None}))
            lp = None  # a step's logprobs ride on its first delta
        if chunk.finish_reason is not None:
            finish = "tool_calls" if stream.called and chunk.finish_reason == "stop" else chunk.finish_reason
            out.append(self._chunk(self._choice(index, None, None, finish, chunk.stop_reason)))
        return out

    def end(self) -> list[dict[str, Any]]:
        if not self.req.include_usage:
            return []
        return [{"id": self.id, "object": self.object, "created": self.created, "model": self.req.model,
                 "choices": [], "usage": usage(self.req, self.choices)}]
