"""GGUF files as Hugging Face checkpoint directories: dequantized once, cached, then loaded like any other.

The conversion goes through transformers' own GGUF reader (the `gguf` package underneath): the config and
tokenizer come from `from_pretrained(..., gguf_file=...)`, the tensors from `load_gguf_checkpoint`, which maps
llama.cpp's tensor names (and undoes its q/k row permutation) onto a model built on the meta device, so no
weights are allocated twice and `accelerate` is not needed. The result lands in
`<cache>/gguf/<stem>-<key>/`, keyed by the file's path, size, mtime and the stored dtype.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from brigade.model.config import SUPPORTED, ModelError

log = logging.getLogger("brigade.model")

# Bump when the conversion's output changes, so cached directories are rebuilt.
_RECIPE = "gguf-v1"
MARKER = "brigade-gguf.json"
DTYPES = ("float32", "bfloat16", "float16")


def cache_root() -> Path:
    """Where converted GGUF checkpoints live: <Brigade's cache dir>/gguf."""
    from brigade.model.make import cache_dir

    return cache_dir() / "gguf"


def cache_name(gguf: Path, dtype: str) -> str:
    """The cache entry's directory name: readable stem plus a hash of what identifies this file's contents."""
    st = gguf.stat()
    ident = f"{_RECIPE}|{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{dtype}"
    return f"{gguf.name.removesuffix('.gguf')}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def _complete(path: Path) -> bool:
    try:
        return json.loads((path / MARKER).read_text()).get("recipe") == _RECIPE
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock file, so a gateway and a worker starting together convert once, not twice."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename alone still keeps readers safe
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def gguf_model_dir(gguf: str | Path, dtype: str = "float32") -> Path:
    """The HF checkpoint directory for a GGUF file, converting it on first use (later calls are cache hits)."""
    gguf = Path(gguf).expanduser()
    if not gguf.is_file():
        raise ModelError(f"{gguf}: no such GGUF file")
    dtype = "float32" if dtype == "auto" else dtype  # dequantized weights are exact in float32
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r} for a GGUF conversion ({', '.join(DTYPES)})")
    root = cache_root()
    final = root / cache_name(gguf, dtype)
    if _complete(final):
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / f".{final.name}.lock"):
            if _complete(final):  # another process converted it while we waited
                return final
            _install(gguf, final, dtype)
    except OSError as e:  # mostly an unwritable or full cache; reading errors become ModelError earlier
        raise ModelError(f"{gguf}: converting it into {root} failed ({e}); "
                         "if that directory is not writable, set BRIGADE_CACHE_DIR to one that is") from e
    return final


def _install(gguf: Path, final: Path, dtype: str) -> None:
    """Convert into a temporary sibling and rename it into place: readers never see a partial directory."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700: a cache shared with other users (containers) must stay readable
    try:
        start = time.monotonic()
        log.info("converting %s to a %s checkpoint (once; cached in %s)", gguf, dtype, final)
        convert_gguf(gguf, tmp, dtype)
        seconds = round(time.monotonic() - start, 1)
        st = gguf.stat()
        marker = {"recipe": _RECIPE, "source": str(gguf.resolve()), "size": st.st_size,
                  "mtime_ns": st.st_mtime_ns, "dtype": dtype, "seconds": seconds}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")  # last: it marks the copy complete
        if final.exists():  # a broken or stale leftover (no valid marker): move it aside atomically first
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}-old-", dir=final.parent))
            os.rename(final, old / "x")
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, final)
        log.info("converted %s in %.1f s", gguf.name, seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert_gguf(gguf: Path, out: Path, dtype: str = "float32") -> None:
    """Write `gguf` as an HF checkpoint into the existing directory `out`.

    Files: config.json (with `architectures`, without `quantization_config`), generation_config.json,
    model.safetensors (tied `lm_head.weight` left out) and the tokenizer with its chat template.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    where, name = str(gguf.parent), gguf.name
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=name)
    except (ValueError, KeyError, OSError, NotImplementedError) as e:
        raise ModelError(f"{gguf}: cannot read the GGUF metadata ({e})") from e
    with torch.device("meta"):  # only for the parameter names that map GGUF tensors onto HF ones
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError as e:
            raise ModelError(f"{gguf}: no transformers causal LM for model_type {config.model_type!r} ({e})") from e
    arch = type(model).__name__  # e.g. LlamaForCausalLM: GGUF-derived configs carry no `architectures`
    if arch not in SUPPORTED:  # fail before the slow part
        raise ModelError(f"{gguf}: architecture {arch} (model_type {config.model_type!r}) is not supported; "
                         f"supported: {', '.join(sorted(SUPPORTED))}")
    torch_dtype = getattr(torch, dtype)
    try:
        tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model,
                                       torch_dtype=torch_dtype)["tensors"]
    except (ValueError, KeyError, NotImplementedError) as e:
        raise ModelError(f"{gguf}: cannot read the GGUF tensors ({e})") from e
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        tensors.pop("lm_head.weight", None)  # the loader ties it to the embedding again
    want = [k for k in model.state_dict() if not (tied and k == "lm_head.weight")]
    missing = [k for k in want if k not in tensors]
    if missing:
        raise ModelError(f"{gguf}: the GGUF lacks tensors {', '.join(missing[:5])}"
                         + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    # save_pretrained refuses a model loaded from a quantized GGUF, so the files are written directly.
    save_file({k: tensors[k].contiguous() for k in want}, str(out / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    try:
        tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
    except (ValueError, KeyError, OSError) as e:
        raise ModelError(f"{gguf}: cannot build the tokenizer from the GGUF ({e})") from e
    tok.save_pretrained(str(out))  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    raw = config.to_dict()
    for key in ("quantization_config", "torch_dtype", "_name_or_path"):
        raw.pop(key, None)
    raw["architectures"] = [arch]
    raw["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    GenerationConfig.from_model_config(config).to_json_file(str(out / "generation_config.json"), use_diff=True)
    for f in out.iterdir():
        f.chmod(0o644)  # safetensors writes 0600: a cache shared with other users (containers) must stay readable
