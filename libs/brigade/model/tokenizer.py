"""Tokenizer and chat template of a checkpoint (Hugging Face fast tokenizers)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from brigade.model.config import ModelError


class Tokenizer:
    """Encode, decode and render chat messages with the checkpoint's own template."""

    def __init__(self, model_dir: str | Path) -> None:
        from transformers import AutoTokenizer

        try:
            self.hf = AutoTokenizer.from_pretrained(str(model_dir))
        except (OSError, ValueError) as e:
            raise ModelError(f"{model_dir}: cannot load tokenizer ({e})") from e
        self.eos_token_id: int | None = self.hf.eos_token_id
        template = getattr(self.hf, "chat_template", None)
        if isinstance(template, dict):  # named templates: the default one renders chat
            template = template.get("default")
        self.chat_template: str | None = template if isinstance(template, str) else None
        # transformers' decode wraps the Rust tokenizer's in ~7 us of Python per call (11 vs 4 us here), paid twice
        # per generated token by the detokenizer; the Rust one gives the same text unless the wrapper would also
        # clean up tokenization spaces.
        self._backend = None if getattr(self.hf, "clean_up_tokenization_spaces", False) else \
            getattr(self.hf, "backend_tokenizer", None)

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if self._backend is not None:
            return str(self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens))
        return str(self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template: str | None = None,
             template_kwargs: Mapping[str, Any] | None = None,
             tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of `messages` rendered by the chat template (or `chat_template`, a Jinja source).

        `continue_final_message` leaves the last (assistant) message open so the model carries it on;
        `template_kwargs` are extra template variables (e.g. `enable_thinking`); `tools` the OpenAI tool
        objects, for templates that render them."""
        template = chat_template or self.chat_template
        if not template:
            raise ModelError("this model has no chat template; use completions instead")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           continue_final_message=continue_final_message, chat_template=template,
                                           tools=tools, **dict(template_kwargs or {}))
        return list(self.hf.encode(text, add_special_tokens=False))

    @property
    def content_format(self) -> str:
        """"openai" when the template iterates over a message's content parts, else "string" (content lists
        are then joined into one string first), as vLLM detects it."""
        return content_format(self.chat_template or "")


# A template that loops over `...content` or tests whether content is a string handles OpenAI's part lists.
_PARTS = re.compile(r"for\s+\w+\s+in\s+[\w.\[\]'\"]*content|content['\"\]]*\s+is\s+(not\s+)?string")


def content_format(template: str) -> str:
    """"openai" or "string": how a chat template expects message content (see Tokenizer.content_format)."""
    return "openai" if _PARTS.search(template) else "string"


class Detokenizer:
    """Incremental decoding: text deltas as tokens arrive, holding back incomplete UTF-8.

    A resumed request (replay, handoff) feeds its earlier output tokens through a fresh one, so the
    deltas, and what is held back, are those the first worker saw.
    """

    CONTEXT = 6  # prompt tokens kept so the first output token decodes with its left context

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-self.CONTEXT:])
        self.prefix = 0
        self.read = len(self.ids)

    def add(self, token_id: int) -> str:
        """Feed one token; return the text it completes (may be empty)."""
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""
