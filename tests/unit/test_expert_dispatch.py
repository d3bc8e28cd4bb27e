"""Expert parallelism without a network: placement, dispatch grouping/dedupe, wire codec, combine, shard loading."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from brigade import protocol as P
from brigade.engine.engine import Engine, EngineConfig
from brigade.engine.sampling import SamplingParams
from brigade.experts import dispatch
from brigade.experts.placement import LivePlacement, PlacementError, contiguous, parse_placement, parse_shard
from brigade.experts.shard import ExpertShard
from brigade.kernels.moe import run_experts
from brigade.model.config import load_config
from brigade.model.experts import is_expert_tensor, load_expert_weights
from brigade.model.llama import load_model


# ---- placement -------------------------------------------------------------------------------------
def test_contiguous_and_parsed_placements() -> None:
    assert contiguous(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert contiguous(4, 4) == [[0], [1], [2], [3]]
    assert contiguous(8, 3) == [[0, 1], [2, 3, 4], [5, 6, 7]]
    assert parse_placement("", 8, 2) == contiguous(8, 2)
    assert parse_placement("0-3,7;4-7", 8, 2) == [[0, 1, 2, 3, 7], [4, 5, 6, 7]]
    assert parse_shard("1/4") == (1, 4)
    for bad in ["0-3;4-6", "0-3", "0-3;4-8", "x;4-7"]:
        with pytest.raises(PlacementError):
            parse_placement(bad, 8, 2)
    for bad in ["2/2", "1", "a/b"]:
        with pytest.raises(PlacementError):
            parse_shard(bad)
    with pytest.raises(PlacementError):
        contiguous(2, 4)


def test_live_placement_follows_heartbeats() -> None:
    lp = LivePlacement(num_layers=2, num_experts=4, timeout=1.0)
    assert lp.missing(0) == [0, 1, 2, 3]
    assert lp.update("a", [[0, 1], [0, 1]], now=0.0)
    assert not lp.update("a", [[0, 1], [0, 1]], now=0.1)  # same holdings: no change
    assert lp.update("b", [[1, 2, 3], [2, 3]], now=0.5, socket="/tmp/b-1.sock")
    assert lp.sockets() == {"b": "/tmp/b-1.sock"}  # a shard without a usable socket goes over the bus
    assert not lp.update("b", [[1, 2, 3], [2, 3]], now=0.5, socket="/tmp/b-2.sock")  # restarted: same holdings
    assert lp.sockets() == {"b": "/tmp/b-2.sock"}
    assert lp.owners(0) == (("a",), ("a", "b"), ("b",), ("b",))
    assert lp.missing(1) == [] and lp.owners(1)[1] == ("a",)
    assert lp.purge(now=1.2) == ["a"]  # silent for 1.1 s > 1 s
    assert lp.missing(0) == [0] and lp.missing(1) == [0, 1]
    assert lp.remove("b") and not lp.remove("b")
    assert lp.shards() == [] and lp.sockets() == {}  # a shard's socket leaves with it


# ---- dispatch --------------------------------------------------------------------------------------
def _routes(tokens: int, experts: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 32, generator=g)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    w = torch.softmax(torch.randn(tokens, k, generator=g), -1)
    return x, ids, w


def _owners(per_shard: list[list[int]], experts: int) -> list[list[str]]:
    return [[f"s{i}" for i, held in enumerate(per_shard) if e in held] for e in range(experts)]


def test_plan_sends_each_token_once_per_shard() -> None:
    ids = torch.tensor([[0, 1], [0, 2], [3, 2], [1, 0]])
    w = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.7, 0.3], [0.9, 0.1]])
    batches = {b.shard: b for b in dispatch.plan(ids, w, _owners([[0, 1], [2, 3]], 4))}
    a, b = batches["s0"], batches["s1"]
    assert a.rows.tolist() == [0, 1, 3]  # token 0 and 3 have both experts here: one row each
    assert a.token.tolist() == [0, 0, 1, 2, 2] and a.expert.tolist() == [0, 1, 0, 1, 0]
    assert b.rows.tolist() == [1, 2] and b.token.tolist() == [0, 1, 1] and b.expert.tolist() == [2, 3, 2]
    assert torch.equal(b.weight, torch.tensor([0.5, 0.7, 0.3]))


def test_replicated_expert_splits_and_prefers_colocation() -> None:
    # Expert 0 on both shards; expert 1 only on s0, expert 2 only on s1.
    owners = _owners([[0, 1], [0, 2]], 3)
    ids = torch.tensor([[0, 1]] * 4 + [[0, 2]] * 4 + [[1, 2]] * 2)
    w = torch.full(ids.shape, 0.5)
    batches = {b.shard: b for b in dispatch.plan(ids, w, owners)}
    # Tokens with expert 1 send expert 0 to s0 too, tokens with expert 2 to s1: no extra rows.
    assert batches["s0"].rows.tolist() == [0, 1, 2, 3, 8, 9]
    assert batches["s1"].rows.tolist() == [4, 5, 6, 7, 8, 9]
    # Expert 0 alone: alternate between replicas, continuing from the offset across steps.
    solo = torch.tensor([[0]] * 6)
    shard = dispatch.assign_shards(solo, [[0, 1]], start=[1])
    assert shard.reshape(-1).tolist() == [1, 0, 1, 0, 1, 0]


def _shards(per_shard: list[list[int]], gate_up: torch.Tensor, down: torch.Tensor, hidden: int,
            ) -> dict[str, ExpertShard]:
    cfg = load_config_stub(gate_up.shape[0], hidden)
    return {f"s{i}": ExpertShard(f"s{i}", cfg, [held], [(gate_up[held], down[held])])
            for i, held in enumerate(per_shard)}


def load_config_stub(experts: int, hidden: int) -> object:
    from brigade.model.config import ModelConfig

    return ModelConfig(arch="mixtral", vocab_size=16, hidden_size=hidden, intermediate_size=48, num_layers=1,
                       num_heads=2, num_kv_heads=2, head_dim=hidden // 2, max_position=64, rms_norm_eps=1e-5,
                       rope_theta=1e4, rope_scaling=None, tie_word_embeddings=False, attention_bias=False,
                       num_experts=experts, num_experts_per_tok=2, name="stub")


def _loopback(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, shards: dict[str, ExpertShard],
              owners: list[list[str]], max_bytes: int = 1 << 20) -> tuple[torch.Tensor, int]:
    """Plan, encode, run each shard on the decoded bytes, decode, combine: the bus path minus the bus."""
    batches = dispatch.plan(ids, w, owners)
    outs, messages = [], 0
    for b in batches:
        parts = []
        for data in dispatch.encode(0, x, b, max_bytes):
            assert len(data) <= max_bytes
            messages += 1
            res = P.ExpertsResult.decode(shards[b.shard].run(P.ExpertsDispatch.decode(data)).encode())
            assert res.error is None, res.error
            parts.append(dispatch.from_bytes(res.data, x.dtype, (len(res.data) // (4 * x.shape[1]), x.shape[1])))
        outs.append(torch.cat(parts))
    return dispatch.combine(tuple(x.shape), x.dtype, batches, outs), messages


@pytest.mark.parametrize("per_shard", [[[0, 1, 2, 3, 4, 5, 6, 7]], [[0, 1, 2, 3], [4, 5, 6, 7]],
                                       [[0, 1], [2, 3], [4, 5], [6, 7]], [[0, 1, 2, 3, 7], [4, 5, 6, 7]]])
def test_dispatch_combine_equals_local(per_shard: list[list[int]]) -> None:
    x, ids, w = _routes(tokens=33, experts=8, k=2)
    g = torch.Generator().manual_seed(1)
    gate_up, down = torch.randn(8, 96, 32, generator=g) / 6, torch.randn(8, 32, 48, generator=g) / 7
    want = run_experts(x, ids, w, gate_up, down)
    got, _ = _loopback(x, ids, w, _shards(per_shard, gate_up, down, 32), _owners(per_shard, 8))
    if any(len(o) > 1 for o in _owners(per_shard, 8)):  # a replicated expert's tokens split: other matmul shapes
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:  # top-2: the same per-expert products, summed in an order-free way
        assert torch.equal(got, want)


def test_large_dispatch_is_chunked_under_the_payload_limit() -> None:
    x, ids, w = _routes(tokens=50, experts=4, k=2, seed=2)
    g = torch.Generator().manual_seed(1)
    gate_up, down = torch.randn(4, 96, 32, generator=g) / 6, torch.randn(4, 32, 48, generator=g) / 7
    per_shard = [[0, 1], [2, 3]]
    got, messages = _loopback(x, ids, w, _shards(per_shard, gate_up, down, 32), _owners(per_shard, 4),
                              max_bytes=1500)
    assert messages > 4
    torch.testing.assert_close(got, run_experts(x, ids, w, gate_up, down), rtol=1e-5, atol=1e-6)
    with pytest.raises(dispatch.DispatchError, match="max payload"):
        dispatch.encode(0, x, dispatch.plan(ids, w, _owners(per_shard, 4))[0], max_bytes=300)


def test_dispatch_bytes_are_raw_and_near_the_bound() -> None:
    """Hidden states travel as raw rows: payload ~ rows x h x 4, plus a few bytes per assignment."""
    x, ids, w = _routes(tokens=32, experts=8, k=2)
    batches = dispatch.plan(ids, w, _owners([[0, 1, 2, 3], [4, 5, 6, 7]], 8))
    rows = sum(b.rows.numel() for b in batches)
    assert rows < 2 * 32  # some tokens had both experts on one shard
    sent = sum(len(d) for b in batches for d in dispatch.encode(0, x, b, 1 << 20))
    assert sent <= rows * 32 * 4 + 2 * 32 * 12 + 2 * dispatch.ENVELOPE


def test_shard_refuses_experts_it_does_not_hold() -> None:
    cfg = load_config_stub(4, 32)
    shard = ExpertShard("s0", cfg, [[0, 1]], [(torch.zeros(2, 96, 32), torch.zeros(2, 32, 48))])
    x, ids, w = _routes(tokens=4, experts=4, k=2)
    [batch] = dispatch.plan(ids, w, [["s0"]] * 4)
    res = shard.run(P.ExpertsDispatch.decode(dispatch.encode(0, x, batch, 1 << 20)[0]))
    assert res.error and "does not hold experts" in res.error
    bad = P.ExpertsDispatch(layer=5, dtype="float32", rows=0, hidden=b"", token=b"", expert=b"", weight=b"")
    assert "no MoE layer 5" in (shard.run(bad).error or "")


# ---- checkpoints ------------------------------------------------------------------------------------
def _to_fused_layout(src: Path, dst: Path) -> Path:
    """A copy of a published-layout Mixtral checkpoint in the transformers v5 fused layout."""
    shutil.copytree(src, dst)
    t = load_file(str(src / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    layers = sorted({int(m[1]) for n in t if (m := re.match(r"model\.layers\.(\d+)\.block_sparse_moe", n))})
    for i in layers:
        p = f"model.layers.{i}.block_sparse_moe."
        n = len({k for k in t if k.startswith(p + "experts.") and k.endswith("w1.weight")})
        out[f"model.layers.{i}.mlp.gate.weight"] = t.pop(p + "gate.weight")
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([t.pop(f"{p}experts.{e}.w1.weight"), t.pop(f"{p}experts.{e}.w3.weight")]) for e in range(n)])
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([t.pop(f"{p}experts.{e}.w2.weight")
                                                                      for e in range(n)])
    save_file({**t, **out}, str(dst / "model.safetensors"))
    return dst


def test_shard_loads_only_its_experts_in_both_layouts(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_models["mixtral"]
    cfg = load_config(src)
    full = load_model(src)
    fused = _to_fused_layout(src, tmp_path / "fused")
    held = [[1, 3]] * cfg.num_layers
    for model_dir in (src, fused):
        weights = load_expert_weights(model_dir, held)
        for layer, (gate_up, down) in enumerate(weights):
            want_gu, want_down = full.experts.weights[layer]  # type: ignore[union-attr]
            assert torch.equal(gate_up, want_gu[[1, 3]]) and torch.equal(down, want_down[[1, 3]])
    assert is_expert_tensor("model.layers.0.block_sparse_moe.experts.3.w2.weight")
    assert is_expert_tensor("model.layers.1.mlp.experts.gate_up_proj")
    assert not is_expert_tensor("model.layers.0.block_sparse_moe.gate.weight")


class _Loopback:
    """An executor that runs every layer through shards via the wire format, no network."""

    def __init__(self, shards: dict[str, ExpertShard], owners: list[list[str]]) -> None:
        self.shards, self.owners, self.calls = shards, owners, 0

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        batches = dispatch.plan(ids, weights, self.owners)
        outs = []
        for b in batches:
            [data] = dispatch.encode(layer, x, b, 1 << 20)
            res = self.shards[b.shard].run(P.ExpertsDispatch.decode(data))
            outs.append(dispatch.from_bytes(res.data, x.dtype, (b.rows.numel(), x.shape[1])))
        return dispatch.combine(tuple(x.shape), x.dtype, batches, outs)


def test_engine_with_sharded_experts_matches_local(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """Worker side loads no expert tensors; greedy output equals the local executor's (fused layout shards)."""
    src = tiny_models["mixtral"]
    fused = _to_fused_layout(src, tmp_path / "fused")
    cfg = load_config(src)
    per_shard = contiguous(cfg.num_experts, 2)
    shards = {f"s{i}": ExpertShard.load(fused, f"s{i}", [held] * cfg.num_layers) for i, held in enumerate(per_shard)}
    ex = _Loopback(shards, _owners(per_shard, cfg.num_experts))
    prompts = ["def fibonacci(n):", "Once upon a time"]
    params = SamplingParams(max_tokens=8, min_tokens=8, temperature=0.0)
    want = Engine(EngineConfig(model=str(src), num_blocks=64)).generate(prompts, params)
    engine = Engine(EngineConfig(model=str(src), num_blocks=64), experts=ex)
    assert engine.model.layers[0].gate_up is None and engine.model.experts is ex
    got = engine.generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert ex.calls > 0


# ---- command line ------------------------------------------------------------------------------------
def test_up_starts_pinned_shards_and_points_workers_at_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from brigade.cli import parser
    from brigade.launcher import MOE_SPINCOUNT, UpConfig, commands

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    out = commands(UpConfig(decode=1, experts=2), "nats://x", "/m")
    cmds = {name: argv for name, argv, _ in out}
    envs = {name: env for name, _, env in out}
    # Processes that share cores with shards spin their OpenMP threads briefly; without shards, libgomp's default.
    assert envs["decode-0"]["GOMP_SPINCOUNT"] == envs["experts-0"]["GOMP_SPINCOUNT"] == MOE_SPINCOUNT
    assert all("GOMP_SPINCOUNT" not in env for _, _, env in commands(UpConfig(decode=2), "nats://x", "/m"))
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")  # the user's own setting wins
    assert all("GOMP_SPINCOUNT" not in env for _, _, env in commands(UpConfig(decode=1, experts=2), "nats://x", "/m"))
    assert {"experts-0", "experts-1", "decode-0"} <= set(cmds)
    shard = cmds["experts-1"]
    assert shard[shard.index("--shard") + 1] == "1/2" and "--cpus" in shard and "--threads" in shard
    worker = cmds["decode-0"]
    assert worker[worker.index("--experts") + 1] == "2"
    args = parser().parse_args(["experts", "--nats", "nats://x", "--model", "/m", "--shard", "1/2",
                                "--placement", "0-3,7;4-7"])
    assert (args.shard, args.placement) == ("1/2", "0-3,7;4-7")
    assert parser().parse_args(["up", "--experts", "2"]).experts == 2
