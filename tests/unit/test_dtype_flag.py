"""`--dtype auto|float32|bfloat16|float16` on `brigade up` and every model service: parsing, BRIGADE_DTYPE,
`auto` resolved from the checkpoint's config.json before it reaches the engine, and `brigade up` handing it on."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from brigade import config as C
from brigade.cli import _resolved_dtype, main, parser, up_config
from brigade.launcher import UpConfig, commands


def _checkpoint(root: Path, **fields: Any) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **fields}))
    return root


@pytest.mark.parametrize(("fields", "want"), [
    ({"torch_dtype": "bfloat16"}, "bfloat16"),  # transformers v4 layout
    ({"dtype": "float16"}, "float16"),  # v5 layout
    ({"dtype": "bfloat16", "torch_dtype": "float32"}, "bfloat16"),  # v5 key first
    ({"torch_dtype": "torch.bfloat16"}, "bfloat16"),
    ({"text_config": {"torch_dtype": "bfloat16"}}, "bfloat16"),
    ({}, "float32"),  # absent
    ({"torch_dtype": "float64"}, "float32"),  # nothing the engine serves
    ({"torch_dtype": "auto"}, "float32"),
    ({"torch_dtype": None}, "float32"),
])
def test_auto_is_the_checkpoints_dtype(tmp_path: Path, fields: dict[str, Any], want: str) -> None:
    assert C.resolve_dtype(_checkpoint(tmp_path / "m", **fields), "auto") == want


def test_explicit_dtypes_win_and_unknown_names_fail(tmp_path: Path) -> None:
    model = _checkpoint(tmp_path / "m", torch_dtype="bfloat16")
    for name in ("float32", "bfloat16", "float16"):
        assert C.resolve_dtype(model, name) == name
    assert C.resolve_dtype(tmp_path / "missing", "auto") == "float32"  # no config.json (an HF id, a GGUF file)
    with pytest.raises(ValueError, match="unknown dtype"):
        C.resolve_dtype(model, "int8")


def test_make_model_checkpoints_resolve_to_float32(tiny_models: dict[str, Path]) -> None:
    assert C.resolve_dtype(tiny_models["llama"], "auto") == "float32"


@pytest.mark.parametrize("command", [
    ["up"], ["prefill", "--nats", "nats://x"], ["decode"], ["experts", "--shard", "0/2"],
    ["generate", "--prompt", "hi"], ["bench", "offline"],
])
def test_every_model_command_takes_dtype(command: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BRIGADE_DTYPE", raising=False)
    assert parser().parse_args(command).dtype == C.DEFAULT_DTYPE == "float32"
    for name in C.DTYPE_CHOICES:
        assert parser().parse_args([*command, "--dtype", name]).dtype == name
    with pytest.raises(SystemExit):
        parser().parse_args([*command, "--dtype", "int8"])
    monkeypatch.setenv("BRIGADE_DTYPE", "bfloat16")  # as every flag reads BRIGADE_<FLAG>
    assert parser().parse_args(command).dtype == "bfloat16"
    assert parser().parse_args([*command, "--dtype", "float16"]).dtype == "float16"


def test_the_gateway_has_no_dtype() -> None:
    assert not hasattr(parser().parse_args(["gateway"]), "dtype")


def test_services_resolve_auto_before_the_engine(tmp_path: Path) -> None:
    model = str(_checkpoint(tmp_path / "bf16", torch_dtype="bfloat16"))
    for command, cls in (("decode", C.WorkerConfig), ("prefill", C.WorkerConfig), ("experts", C.ExpertsConfig)):
        cfg = C.from_args(cls, parser().parse_args([command, "--model", model, "--dtype", "auto"]))
        assert cfg.dtype == "auto"
        assert _resolved_dtype(cfg).dtype == "bfloat16"
        assert _resolved_dtype(C.from_args(cls, parser().parse_args([command, "--model", model]))).dtype == "float32"
    plain = _checkpoint(tmp_path / "plain")
    assert _resolved_dtype(C.WorkerConfig(model=str(plain), dtype="auto")).dtype == "float32"


def test_up_passes_dtype_to_every_worker_and_shard() -> None:
    cfg = up_config(["--model", "/m", "--mode", "disagg", "--prefill", "1", "--decode", "1", "--experts", "1",
                     "--dtype", "bfloat16"])
    assert cfg.dtype == "bfloat16"
    cmds = commands(cfg, "nats://x", "/m")
    model_procs = [(name, argv) for name, argv, _ in cmds if name not in ("router", "gateway")]
    assert [name for name, _ in model_procs] == ["prefill-0", "decode-1", "experts-0"]
    for name, argv in model_procs:  # each flag parsed by the child's own parser
        assert parser().parse_args(argv[3:]).dtype == "bfloat16", name
    for name, argv, _ in cmds:
        if name in ("router", "gateway"):
            assert "--dtype" not in argv
    # auto goes on as auto: each child resolves it from the same checkpoint
    [worker] = [argv for name, argv, _ in commands(UpConfig(dtype="auto"), "nats://x", "/m") if name == "decode-0"]
    assert parser().parse_args(worker[3:]).dtype == "auto"
    # a --worker-arg comes after, so it still overrides
    [worker] = [argv for name, argv, _ in commands(UpConfig(worker_args=("--dtype=float16",)), "nats://x", "/m")
                if name == "decode-0"]
    assert parser().parse_args(worker[3:]).dtype == "float16"


def test_up_reads_brigade_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIGADE_DTYPE", "float16")
    assert up_config(["--model", "/m"]).dtype == "float16"
    monkeypatch.setenv("BRIGADE_DTYPE", "bf16")  # argparse checks flags, not defaults: up checks it once
    with pytest.raises(ValueError, match="unknown dtype"):
        up_config(["--model", "/m"])


@dataclass
class _FakeOut:
    token_ids: list[int]
    text: str = "x"
    finish_reason: str = "length"


def test_generate_resolves_auto_into_the_engine_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import brigade.engine.engine as E

    seen: list[Any] = []

    class FakeEngine:
        def __init__(self, config: E.EngineConfig) -> None:
            seen.append(config)

        def generate(self, prompts: list[str], params: object) -> list[_FakeOut]:
            return [_FakeOut([5])]

    monkeypatch.setattr(E, "Engine", FakeEngine)
    model = str(_checkpoint(tmp_path / "bf16", dtype="bfloat16"))
    assert main(["generate", "--model", model, "--prompt", "hi", "--dtype", "auto", "--json"]) == 0
    assert main(["generate", "--model", model, "--prompt", "hi", "--dtype", "float16", "--json"]) == 0
    assert [c.dtype for c in seen] == ["bfloat16", "float16"]
    assert all(c.dtype in E.DTYPES for c in seen)


def test_bench_offline_resolves_auto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from brigade.bench import offline

    seen: dict[str, Any] = {}

    def fake_bench(model: str, *args: Any, **kw: Any) -> None:
        seen.update(kw)
        raise SystemExit(0)

    monkeypatch.setattr(offline, "bench", fake_bench)
    model = str(_checkpoint(tmp_path / "bf16", torch_dtype="bfloat16"))
    with pytest.raises(SystemExit):
        main(["bench", "offline", "--model", model, "--dtype", "auto", "--no-hf"])
    assert seen["dtype"] == "bfloat16"


@pytest.mark.parametrize("name", ["bfloat16", "auto"])
def test_worker_engine_runs_in_the_flag_dtype(tiny_models: dict[str, Path], name: str) -> None:
    """A worker's engine gets --dtype (auto: the checkpoint's float32), and only float32 takes the fast path."""
    import torch

    from brigade.config import WorkerConfig
    from brigade.services.worker import build_engine

    cfg = WorkerConfig(model=str(tiny_models["llama"]), dtype=name, kv_transport="nats", num_blocks=16)
    engine, _ = build_engine(cfg, threads=1)
    want = torch.bfloat16 if name == "bfloat16" else torch.float32
    assert engine.model.dtype == want
    from brigade.kernels import native

    assert engine.model.fast is (want == torch.float32 and native.available())
    out = engine.generate(["hello"], None)[0]
    assert out.token_ids
