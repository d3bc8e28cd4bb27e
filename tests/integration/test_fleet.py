"""Workers joining and leaving a running system: the router follows heartbeats."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import free_port, latest

from brigade import protocol as P
from brigade.bus import Bus
from brigade.engine.engine import Engine, EngineConfig
from brigade.engine.sampling import SamplingParams
from brigade.launcher import Up, UpConfig


@pytest.fixture()
def up(tiny_models: dict[str, Path]) -> Iterator[Up]:
    with Up(UpConfig(model=str(tiny_models["llama"]), port=free_port(), router="round_robin", decode=1,
                     worker_args=("--num-blocks", "128"))) as u:
        yield u


def _start_worker(up: Up, model: str, worker_id: str) -> subprocess.Popen[bytes]:
    assert up.nats is not None
    argv = [sys.executable, "-m", "brigade.cli", "decode", "--nats", up.nats.client_url, "--model", model,
            "--worker-id", worker_id, "--threads", "1", "--num-blocks", "128"]
    return subprocess.Popen(argv, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _routed(up: Up, body: dict[str, object], n: int) -> dict[str, int]:
    """Send n requests (all must succeed); return how many each worker served meanwhile."""
    assert up.nats is not None
    before = {w: st.served for w, st in latest(up.nats.client_url).items()}
    url = f"http://{up.cfg.host}:{up.cfg.port}"
    for _ in range(n):
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
    after = {w: st.served for w, st in latest(up.nats.client_url).items()}
    return {w: c - before.get(w, 0) for w, c in after.items() if c - before.get(w, 0)}


async def _wait_status(nats: str, worker_id: str, timeout: float = 60) -> None:
    bus = await Bus.connect(nats, "test-wait")
    ready = asyncio.Event()

    async def on_status(msg: object) -> None:
        if P.WorkerStatus.decode(msg.data).worker_id == worker_id:  # type: ignore[attr-defined]
            ready.set()

    await bus.subscribe(P.HEARTBEAT, on_status)
    try:
        await asyncio.wait_for(ready.wait(), timeout)
    finally:
        await bus.close()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL])
def test_worker_joins_and_leaves(up: Up, tiny_models: dict[str, Path], stop_signal: signal.Signals) -> None:
    assert up.nats is not None
    body = {"model": "llama", "prompt": "hello there", "max_tokens": 4, "temperature": 0}
    assert _routed(up, body, 4) == {"decode-0": 4}

    late = _start_worker(up, str(tiny_models["llama"]), "late-1")
    try:
        asyncio.run(_wait_status(up.nats.client_url, "late-1"))
        time.sleep(0.3)  # the router has seen the same heartbeat by now
        assert _routed(up, body, 6) == {"decode-0": 3, "late-1": 3}  # round-robin over both
    finally:
        late.send_signal(stop_signal)
        late.wait(timeout=30)
    # A stopped worker gets no more requests, and no request fails: SIGTERM says so at once; after
    # SIGKILL the router's forward finds no responder and moves on until the heartbeat lapses.
    assert _routed(up, body, 6) == {"decode-0": 6}


def test_failed_kv_transfer_falls_back_to_local_prefill(tiny_models: dict[str, Path]) -> None:
    """A prefill worker that cannot reach the decode worker's KV pool (shm against a pool that is not
    in shared memory) hands the request to the decode worker, which prefills it itself: same output."""
    from brigade.engine.engine import Engine, EngineConfig
    from brigade.engine.sampling import SamplingParams

    model = str(tiny_models["llama"])
    up = Up(UpConfig(model=model, port=free_port(), decode=1, disagg_threshold=4,
                     worker_args=("--num-blocks", "128", "--kv-transport", "nats")))
    up.start(timeout=120)
    assert up.nats is not None
    prefill = subprocess.Popen([sys.executable, "-m", "brigade.cli", "prefill", "--nats", up.nats.client_url,
                                "--model", model,
                                "--worker-id", "prefill-shm", "--threads", "1", "--kv-transport", "shm"],
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        asyncio.run(_wait_status(up.nats.client_url, "prefill-shm"))
        time.sleep(0.3)
        prompt = "The quick brown fox jumps over the lazy dog and then"
        ref = Engine(EngineConfig(model=model, num_blocks=64)).generate(
            [prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
        body = {"model": "llama", "prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
        served = _routed(up, body, 1)
        assert served == {"decode-0": 1}  # finished on the decode worker, after the prefill worker's first token
        r = httpx.post(f"http://{up.cfg.host}:{up.cfg.port}/v1/completions", json=body, timeout=60)
        assert r.json()["choices"][0]["text"] == ref.text
    finally:
        prefill.terminate()
        prefill.wait(timeout=30)
        up.stop()


def test_failed_handoff_falls_back_to_the_prefill_worker(tiny_models: dict[str, Path]) -> None:
    """The only decode worker is too small for the prompt: it refuses the KV allocation and the request, so the
    prefill worker serves the request itself, under the same request id, and the text is still exact. (It
    used to hang: the prefill worker still held the request's blocks under that id when it sent it to itself.)"""
    model = str(tiny_models["llama"])
    prompt = "A prompt long enough to need more KV blocks than the small decode worker has: " * 3
    ref = Engine(EngineConfig(model=model, num_blocks=128))
    [want] = ref.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    with Up(UpConfig(model=model, port=free_port(), mode="disagg", prefill=1, decode=0, disagg_threshold=4,
                     kv_transport="nats", worker_args=("--num-blocks", "128"))) as up:
        assert up.nats is not None
        argv = [sys.executable, "-m", "brigade.cli", "decode", "--nats", up.nats.client_url, "--model", model,
                "--worker-id", "small-1", "--threads", "1", "--num-blocks", "2", "--kv-transport", "nats"]
        small = subprocess.Popen(argv, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            asyncio.run(_wait_status(up.nats.client_url, "small-1"))
            time.sleep(0.3)  # the router has seen the same heartbeat by now
            r = httpx.post(f"http://{up.cfg.host}:{up.cfg.port}/v1/completions", timeout=60, json={
                "model": "llama", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want.text
            served = {w: st.served for w, st in latest(up.nats.client_url).items()}
            assert served.get("small-1", 0) == 0 and served["prefill-0"] >= 1, served
        finally:
            small.terminate()
            small.wait(timeout=30)
