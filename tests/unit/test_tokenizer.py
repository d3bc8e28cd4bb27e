"""Tokenizer.decode (the Rust tokenizer directly) against transformers' decode."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from brigade.model.tokenizer import Detokenizer, Tokenizer


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(tiny_models: dict[str, Path], skip: bool) -> None:
    tok = Tokenizer(tiny_models["llama"])
    assert tok._backend is not None  # the made tokenizers do not clean up spaces: the fast decode applies
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 12))]
        assert tok.decode(ids, skip_special_tokens=skip) == tok.hf.decode(ids, skip_special_tokens=skip)


def test_detokenizer_deltas_add_up(tiny_models: dict[str, Path]) -> None:
    tok = Tokenizer(tiny_models["qwen2"])
    prompt = tok.encode("Hello there")
    out = tok.encode(" — naïve café, 東京 and more text")
    d = Detokenizer(tok, prompt)
    assert "".join(d.add(t) for t in out) == tok.decode(out)
