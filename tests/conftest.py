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


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny llama, qwen2 and mixtral checkpoints (random weights, real tokenizer)."""
    from brigade.model.make import make_model

    root = tmp_path_factory.mktemp("models")
    return {arch: make_model(arch, "tiny", root / arch, seed=1) for arch in ("llama", "qwen2", "mixtral")}
