"""Shared fixtures: tiny checkpoints made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests run beside other processes on small machines; one torch thread each avoids oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Triton fixes interpreter-vs-compiled mode at its first import (transformers may import it): without
# CUDA, choose the interpreter before anything does, so kernel tests run on the CPU.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


class _TinyModels(dict[str, Path]):
    """Tiny checkpoints by arch, each made on first use (a test of one family need not build them all)."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, arch: str) -> Path:
        from brigade.model.make import make_model

        self[arch] = path = make_model(arch, "tiny", self.root / arch, seed=1)
        return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny checkpoints of every `make.ARCHS` arch (random weights, real tokenizer), made on first use."""
    return _TinyModels(tmp_path_factory.mktemp("models"))
