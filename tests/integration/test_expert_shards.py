"""MoE experts on `brigade experts` shards over a real nats-server: parity, load metrics, a shard failing.

Parity and metrics run the shards as in-process services (each on its own connection); the failure test runs
them as real `brigade experts` processes so one can be stopped, killed and restarted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from functools import cache
from pathlib import Path

import httpx
import pytest
import torch
from helpers import free_port

from brigade import protocol as P
from brigade.bus import Bus
from brigade.config import ExpertsConfig, WorkerConfig
from brigade.engine.engine import Engine, EngineConfig
from brigade.engine.sampling import SamplingParams
from brigade.experts.dispatch import ENVELOPE
from brigade.experts.remote import RemoteExperts
from brigade.experts.shard import TOKENS_METRIC
from brigade.procs import terminate
from brigade.services.experts import ExpertsService, load_shard
from brigade.services.worker import Worker

PROMPTS = ["def fibonacci(n):", "The quick brown fox jumps over the lazy dog.", "Once upon a time, in a land"]
NEW = 16
GREEDY = SamplingParams(max_tokens=NEW, min_tokens=NEW, temperature=0.0)


@cache
def _local(model_dir: Path) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, greedy continuations) with the experts in-process."""
    outs = Engine(EngineConfig(model=str(model_dir), num_blocks=64)).generate(PROMPTS, GREEDY)
    return [o.prompt_token_ids for o in outs], [o.token_ids for o in outs]


@cache
def _transformers(model_dir: Path) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for ids in _local(model_dir)[0]:
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                 pad_token_id=0)
        out.append(gen[0, len(ids):].tolist())
    return out


async def _start_shards(url: str, model: Path, n: int, placement: str = "") -> list[ExpertsService]:
    tag = uuid.uuid4().hex[:6]
    services = []
    for i in range(n):
        cfg = ExpertsConfig(nats=url, model=str(model), shard=f"{i}/{n}", placement=placement,
                            shard_id=f"t{tag}-{i}of{n}", heartbeat_s=0.2)
        shard = await asyncio.to_thread(load_shard, cfg)
        svc = ExpertsService(cfg, await Bus.connect(url, f"test-shard-{i}"), shard)
        await svc.start()
        services.append(svc)
    return services


async def _stop_shards(services: list[ExpertsService]) -> None:
    for svc in services:
        await svc.stop()
        await svc.bus.close()


def _count(registry: object, layer: int, expert: int, **labels: str) -> float:
    v = registry.get_sample_value(f"{TOKENS_METRIC}_total",  # type: ignore[attr-defined]
                                  {"layer": str(layer), "expert": str(expert), **labels})
    return v or 0.0


@pytest.mark.parametrize("n,placement,direct", [(2, "", True), (4, "", True), (2, "0-2;1-3", True),
                                                (2, "", False), (2, "0-2;1-3", False)])
async def test_sharded_experts_match_local_and_transformers(nats_url: str, tiny_models: dict[str, Path], n: int,
                                                            placement: str, direct: bool) -> None:
    """`direct`: shards over their Unix sockets (the one-host data plane); else every dispatch over the bus."""
    model = tiny_models["mixtral"]
    prompt_ids, want = _local(model)
    services = await _start_shards(nats_url, model, n, placement)
    bus = await Bus.connect(nats_url, "test-moe-worker")
    remote = await RemoteExperts.create(bus, str(model), timeout=5.0, direct=direct)
    try:
        assert await remote.wait_ready(10)
        engine = await asyncio.to_thread(lambda: Engine(EngineConfig(model=str(model), num_blocks=64), experts=remote))
        got = await asyncio.to_thread(engine.generate, PROMPTS, GREEDY)
    finally:
        await remote.stop()
        await bus.close()
        await _stop_shards(services)
    assert [c.token_ids for c in got] == want
    if placement == "":
        assert want == _transformers(model)
    # Load metrics add up: every layer saw each token once per routed expert (top-k), on the worker and shards.
    cfg = engine.model.cfg
    tokens = sum(len(p) + NEW - 1 for p in prompt_ids)
    assert remote.stats.tokens == tokens * cfg.num_layers
    for layer in range(cfg.num_layers):
        routed = sum(_count(remote.registry, layer, e) for e in range(cfg.num_experts))
        served = sum(_count(s.shard.registry, layer, e, shard=s.shard.shard_id)
                     for s in services for e in range(cfg.num_experts))
        assert routed == served == tokens * cfg.num_experts_per_tok
    if placement:  # the replicated experts' tokens went to both replicas
        for e in (1, 2):
            assert all(_count(s.shard.registry, 0, e, shard=s.shard.shard_id) > 0 for s in services)
    # Bytes: each (token, shard) pair once, both ways, at most hidden x top-k x 2 x 4 bytes per token (+10%),
    # not counting each message's fixed envelope (which weighs at hidden 64; bench/moe.py measures hidden 512).
    st = remote.stats
    assert st.direct == (st.messages if direct else 0)
    bound = cfg.hidden_size * cfg.num_experts_per_tok * 2 * 4 * 1.1
    assert (st.bytes_out + st.bytes_in - 2 * st.messages * ENVELOPE) / st.tokens <= bound


# ---- failure: a shard stops answering, then comes back ------------------------------------------------------
def _spawn_shard(url: str, model: Path, i: int, n: int, metrics_port: int = 0) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "brigade.cli", "experts", "--nats", url, "--model", str(model), "--shard", f"{i}/{n}",
            "--shard-id", f"proc-{i}of{n}", "--threads", "1", "--heartbeat-s", "0.2",
            "--metrics-port", str(metrics_port)]
    return subprocess.Popen(argv, env={**os.environ, "OMP_NUM_THREADS": "1", "BRIGADE_LOG": "WARNING"})


@pytest.fixture(params=[True, False], ids=["direct", "bus"])
async def worker(nats_url: str, tiny_models: dict[str, Path],
                 request: pytest.FixtureRequest) -> AsyncIterator[tuple[Worker, RemoteExperts]]:
    model = tiny_models["mixtral"]
    cfg = WorkerConfig(nats=nats_url, model=str(model), worker_id=f"moe-{uuid.uuid4().hex[:6]}", experts=2,
                       experts_timeout=2.0, num_blocks=64, heartbeat_s=0.2, experts_direct=request.param)
    bus = await Bus.connect(nats_url, "test-moe-worker")
    remote = await RemoteExperts.create(bus, str(model), timeout=cfg.experts_timeout, direct=cfg.experts_direct)
    engine = await asyncio.to_thread(lambda: Engine(EngineConfig(model=str(model), num_blocks=64), experts=remote))
    w = Worker(cfg, bus, engine)
    await w.start()
    try:
        yield w, remote
    finally:
        await w.stop()
        await remote.stop()
        await bus.close()


async def _generate(w: Worker, prompt_ids: list[int]) -> tuple[list[int], str | None]:
    """One request through the worker's bus API: (tokens, error)."""
    done: asyncio.Future[tuple[list[int], str | None]] = asyncio.get_running_loop().create_future()
    tokens: list[int] = []

    async def on_chunk(msg: object) -> None:
        c = P.TokenChunk.decode(msg.data)  # type: ignore[attr-defined]
        tokens.extend(c.token_ids)
        if c.finish_reason and not done.done():
            done.set_result((tokens, c.error))

    inbox = w.bus.inbox()
    sub = await w.bus.subscribe(inbox, on_chunk)
    req = P.GenerateRequest(uuid.uuid4().hex, prompt_ids, {"max_tokens": NEW, "min_tokens": NEW, "temperature": 0.0},
                            inbox)
    acc = P.Accepted.decode(await w.bus.request(P.worker_generate(w.id), req))
    assert acc.error is None, acc.error
    try:
        return await asyncio.wait_for(done, 30)
    finally:
        await sub.unsubscribe()


async def _scrape(port: int) -> dict[int, float]:
    """Per layer, the token assignments a shard's /metrics reports."""
    async with httpx.AsyncClient() as c:
        text = (await c.get(f"http://127.0.0.1:{port}/metrics", timeout=5)).text
    out: dict[int, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{TOKENS_METRIC}_total{{"):
            labels, value = line.rsplit(" ", 1)
            layer = int(labels.split('layer="')[1].split('"')[0])
            out[layer] = out.get(layer, 0.0) + float(value)
    return out


async def test_failed_shard_fails_requests_then_recovers(nats_url: str, tiny_models: dict[str, Path],
                                                         worker: tuple[Worker, RemoteExperts]) -> None:
    w, remote = worker
    model = tiny_models["mixtral"]
    prompt_ids, want = _local(model)
    ports = [free_port(), free_port()]
    procs = [_spawn_shard(nats_url, model, i, 2, ports[i]) for i in range(2)]
    try:
        assert await remote.wait_ready(60), "shards did not announce themselves"
        assert await _generate(w, prompt_ids[0]) == (want[0], None)
        per_layer = [await _scrape(p) for p in ports]
        k = w.engine.model.cfg.num_experts_per_tok
        for layer in range(w.engine.model.cfg.num_layers):
            assert per_layer[0][layer] + per_layer[1][layer] == (len(prompt_ids[0]) + NEW - 1) * k

        # A hung shard (stopped, its connection still open): the request fails once the dispatch times out.
        procs[1].send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        tokens, error = await _generate(w, prompt_ids[1])
        assert error and "experts shard proc-1of2" in error and "timeout" in error, error
        assert time.monotonic() - t0 < remote.timeout + 3
        procs[1].send_signal(signal.SIGCONT)
        assert await remote.wait_ready(10)
        assert await _generate(w, prompt_ids[1]) == (want[1], None)

        # A dead shard: the request fails at once; a restarted shard takes over and requests succeed again.
        procs[1].kill()
        procs[1].wait()
        t0 = time.monotonic()
        tokens, error = await _generate(w, prompt_ids[2])
        assert error and "experts shard proc-1of2" in error, error
        assert time.monotonic() - t0 < remote.timeout + 3
        procs[1] = _spawn_shard(nats_url, model, 1, 2)
        assert await remote.wait_ready(60), "restarted shard did not announce itself"
        assert await _generate(w, prompt_ids[2]) == (want[2], None)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        terminate(procs)
