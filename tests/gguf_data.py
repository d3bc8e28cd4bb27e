"""Write a tiny GGUF file from a `make_model` checkpoint, the way llama.cpp's convert_hf_to_gguf.py lays one out.

Metadata under llama.cpp's keys, the byte-level BPE vocabulary as a `gpt2` tokenizer, tensor names from the
`gguf` package's own HF->GGUF name map, llama's q/k rows permuted as llama.cpp does, and 2-D weights as Q8_0
(norms and biases stay F32), so a reader has to dequantize and undo the permutation to get the model back.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

_ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary-half to interleaved row order for q/k (its LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model_dir: Path, out: Path, quant: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.Q8_0,
               name: str = "tiny") -> Path:
    """Write `model_dir` (a llama or qwen2 make_model checkpoint) as the GGUF file `out`; return `out`."""
    cfg = json.loads((model_dir / "config.json").read_text())
    arch = cfg["model_type"]
    heads, kv_heads, hidden = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    layers = cfg["num_hidden_layers"]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(float(cfg["rope_parameters"]["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_vocab_size(cfg["vocab_size"])

    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab: dict[str, int] = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    tcfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")  # make_model's split regex is Qwen2's
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab[tcfg["bos_token"]])
    w.add_eos_token_id(vocab[tcfg["eos_token"]])
    w.add_pad_token_id(vocab[tcfg["pad_token"]])
    w.add_add_bos_token(False)
    w.add_chat_template(tcfg["chat_template"])

    names = gguf.get_tensor_name_map(_ARCHS[arch], layers)
    for hf_name, t in sorted(load_file(str(model_dir / "model.safetensors")).items()):
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert gguf_name, hf_name
        if arch == "llama" and hf_name.endswith("q_proj.weight"):
            t = _permute(t, heads)
        elif arch == "llama" and hf_name.endswith("k_proj.weight"):
            t = _permute(t, kv_heads)
        t = np.ascontiguousarray(t, dtype=np.float32)
        if t.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name, gguf.quants.quantize(t, quant), raw_dtype=quant)
        else:
            w.add_tensor(gguf_name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
