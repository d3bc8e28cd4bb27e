"""Read safetensors checkpoints: one file, or shards named by `model.safetensors.index.json`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from brigade.model.config import ModelError


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint, in a stable order."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise ModelError(f"{index}: corrupt index ({e})") from e
        files = [root / name for name in sorted(set(weight_map.values()))]
    elif (root / "model.safetensors").is_file():
        files = [root / "model.safetensors"]
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{model_dir}: no *.safetensors weights found")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelError(f"{model_dir}: weight shards listed in the index are missing: {', '.join(missing)}")
    return files


def load_tensors(
    model_dir: str | Path,
    keep: Callable[[str], bool] = lambda name: True,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Load the tensors whose name passes `keep` (so an expert shard reads only its experts)."""
    out: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    if keep(name):
                        out[name] = f.get_tensor(name).to(dtype)
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelError(f"{path}: cannot read safetensors ({e})") from e
        except Exception as e:  # safetensors raises its own SafetensorError type
            raise ModelError(f"{path}: cannot read safetensors ({e})") from e
    return out


def require(tensors: dict[str, torch.Tensor], names: Iterable[str], where: str) -> None:
    """Raise ModelError listing the expected tensors that the checkpoint lacks."""
    missing = [n for n in names if n not in tensors]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ModelError(f"{where}: checkpoint is missing tensors: {shown}")
