"""Per-request sampling parameters (OpenAI fields plus the vLLM extras) and their validation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

MAX_LOGPROBS = 20
"""Most top logprobs a request may ask for (OpenAI's `top_logprobs` limit)."""

MAX_STOP_STRINGS = 16
"""Most stop strings per request: each one is re-checked against the detokenized tail every step."""

MAX_STOP_TOKEN_IDS = 256
"""Most stop token ids per request (they ride in every bus message of the request)."""

MAX_STOP_CHARS = 1024
"""Longest stop string: the engine re-checks each one against the text tail every step."""

CONSTRAINT_KINDS = ("json", "json_object", "regex", "choice", "grammar")
"""What `SamplingParams.structured` may constrain the output to (see brigade.engine.grammar)."""

MAX_SPEC_CHARS = 65_536
"""Longest constraint spec (a schema, regex or grammar): it rides in every bus message of the request."""

MAX_LOGIT_BIAS = 1024
"""Most logit_bias entries per request."""

_INT31 = 2**31  # token ids and top_k fit in int32 everywhere (tensors, msgpack, the vocabulary)

# torch.Generator.manual_seed accepts anything representable as int64 or uint64.
_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1


class InvalidParams(ValueError):
    """A sampling parameter is out of range or of the wrong type; `.param` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def is_utf8(text: str) -> bool:
    """False for a str JSON can carry but UTF-8 cannot (a lone surrogate from a \\ud800 escape)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _is_int(value: object) -> bool:
    # bool is an int subclass, but `max_tokens=True` is a client bug, not a number.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request.

    temperature 0 means greedy argmax (top_k/top_p/min_p and the seed are then irrelevant).
    top_k 0 or -1 and top_p 1 disable those filters. `stop` and `stop_token_ids` may be passed
    as a str / list; they are stored as tuples so the params stay hashable.
    Construction does not validate; call `validate()` (or use `from_dict`, which does).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False  # vLLM's: keep the matched stop string at the end of the text
    structured: tuple[str, str] | None = None  # (kind, spec): the output follows this constraint
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), OpenAI's -100..100

    def __post_init__(self) -> None:
        # Normalize the JSON-ish shapes clients send; anything else is left for validate() to reject.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if isinstance(self.structured, list):  # it crossed the bus (msgpack makes tuples lists)
            object.__setattr__(self, "structured", tuple(self.structured))
        if isinstance(self.logit_bias, Mapping):  # OpenAI's {"token id": bias}
            try:
                object.__setattr__(self, "logit_bias", tuple(sorted((int(k), v) for k, v in self.logit_bias.items())))
            except (TypeError, ValueError):
                pass  # left a mapping: validate() names the field
        elif isinstance(self.logit_bias, list):
            object.__setattr__(self, "logit_bias", tuple(tuple(p) if isinstance(p, list) else p
                                                         for p in self.logit_bias))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, strict: bool = True) -> SamplingParams:
        """Build and validate params from a request body.

        None values mean "use the default" (clients send explicit nulls). Unknown keys raise
        InvalidParams when `strict`, and are ignored otherwise.
        """
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                if strict:
                    raise InvalidParams(key, f"unknown sampling parameter {key!r}")
                continue
            if value is not None:
                kwargs[key] = value
        params = cls(**kwargs)
        params.validate()
        return params

    @property
    def greedy(self) -> bool:
        """True when the request wants argmax decoding (temperature == 0)."""
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        """True when any repetition/presence/frequency penalty changes the logits."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    def validate(self) -> None:
        """Raise InvalidParams for the first field that is out of range.

        Ranges follow OpenAI where it has the field and vLLM otherwise. One deliberate choice:
        temperature has no upper bound (vLLM behaviour) -- very flat distributions are legitimate,
        and an OpenAI-compatible front end can still enforce its own <= 2 policy.
        """
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise InvalidParams("max_tokens", f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_real(self.temperature) or self.temperature < 0:
            raise InvalidParams("temperature", f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or not -1 <= self.top_k < _INT31:
            raise InvalidParams("top_k", f"top_k must be -1 or 0 (disabled) or a positive integer, got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidParams("top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise InvalidParams("min_p", f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidParams(
                "repetition_penalty",
                f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_real(value) or not -2 <= value <= 2:
                raise InvalidParams(name, f"{name} must be in [-2, 2], got {value!r}")
        if self.seed is not None and (not _is_int(self.seed) or not _SEED_MIN <= self.seed <= _SEED_MAX):
            raise InvalidParams("seed", f"seed must be an integer in [-2**63, 2**64 - 1], got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise InvalidParams(
                "logprobs", f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}"
            )
        self._validate_stop()
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise InvalidParams("min_tokens", f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            raise InvalidParams(
                "min_tokens",
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
            )
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidParams(name, f"{name} must be a boolean, got {getattr(self, name)!r}")
        self._validate_structured()
        self._validate_logit_bias()

    def _validate_structured(self) -> None:
        if self.structured is None:
            return
        if not (isinstance(self.structured, tuple) and len(self.structured) == 2
                and all(isinstance(x, str) for x in self.structured)):
            raise InvalidParams("structured", f"structured must be a (kind, spec) pair, got {self.structured!r}")
        kind, spec = self.structured
        if kind not in CONSTRAINT_KINDS:
            raise InvalidParams("structured", f"unknown constraint kind {kind!r}; one of {CONSTRAINT_KINDS}")
        if len(spec) > MAX_SPEC_CHARS:
            raise InvalidParams("structured", f"a constraint may be at most {MAX_SPEC_CHARS} characters")
        if not is_utf8(spec):
            raise InvalidParams("structured", "a constraint must be valid Unicode (a lone surrogate is not)")

    def _validate_logit_bias(self) -> None:
        if not isinstance(self.logit_bias, tuple):
            raise InvalidParams("logit_bias", "logit_bias must map token ids to numbers")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidParams("logit_bias", f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries")
        for pair in self.logit_bias:
            if not (isinstance(pair, tuple) and len(pair) == 2 and _is_int(pair[0]) and 0 <= pair[0] < _INT31):
                raise InvalidParams("logit_bias", f"logit_bias keys must be token ids >= 0, got {pair!r}")
            if not _is_real(pair[1]) or not -100 <= pair[1] <= 100:
                raise InvalidParams("logit_bias", f"logit_bias values must be in [-100, 100], got {pair[1]!r}")

    def _validate_stop(self) -> None:
        if not isinstance(self.stop, tuple):
            raise InvalidParams("stop", f"stop must be a string or a list of strings, got {self.stop!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidParams("stop", f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidParams("stop", f"stop strings must be non-empty strings, got {s!r}")
            if len(s) > MAX_STOP_CHARS:
                raise InvalidParams("stop", f"stop strings may be at most {MAX_STOP_CHARS} characters")
            if not is_utf8(s):
                raise InvalidParams("stop", "stop strings must be valid Unicode (a lone surrogate is not)")
        if not isinstance(self.stop_token_ids, tuple):
            raise InvalidParams(
                "stop_token_ids", f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}"
            )
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidParams("stop_token_ids", f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids")
        for t in self.stop_token_ids:
            if not _is_int(t) or not 0 <= t < _INT31:
                raise InvalidParams("stop_token_ids", f"stop_token_ids must be integers >= 0, got {t!r}")
