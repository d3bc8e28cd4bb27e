"""Prefix-aware routing over three colocated workers: conversations stick to their cache."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import free_port, latest

from brigade.launcher import Up, UpConfig

DOC_TOKENS = 192  # 12 full blocks of shared conversation history


@pytest.fixture()
def up(tiny_models: dict[str, Path]) -> Iterator[Up]:
    with Up(UpConfig(model=str(tiny_models["llama"]), port=free_port(), decode=3, router="prefix",
                     worker_args=("--num-blocks", "256"))) as u:
        yield u


def _turn(up: Up, prompt: list[int]) -> tuple[str, dict[str, tuple[int, int]]]:
    """One request; returns the worker that served it and per-worker (prefix queries, hits) deltas."""
    assert up.nats is not None
    before = latest(up.nats.client_url)
    body = {"model": "llama", "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"http://{up.cfg.host}:{up.cfg.port}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    after = latest(up.nats.client_url)
    served = [w for w, st in after.items() if st.served - (before[w].served if w in before else 0)]
    assert len(served) == 1, served
    deltas = {w: (st.prefix_queries - before[w].prefix_queries, st.prefix_hits - before[w].prefix_hits)
              for w, st in after.items() if w in before}
    return served[0], deltas


def _conversation(seed: int) -> list[int]:
    return [16 + (seed * 131 + i * 17) % 900 for i in range(DOC_TOKENS)]


def test_follow_ups_stick_to_their_cache_and_survive_failures(up: Up) -> None:
    history = _conversation(1)
    home, _ = _turn(up, history)
    for turn in range(2):
        history = history + [20 + turn] * 8  # the reply and the next question join the history
        worker, deltas = _turn(up, history)
        assert worker == home, f"turn {turn + 2} went to {worker}, the conversation lives on {home}"
        queries, hits = deltas[worker]
        assert hits >= 0.9 * DOC_TOKENS and hits <= queries, deltas

    # Other conversations spread out instead of piling onto the same worker.
    homes = {_turn(up, _conversation(s))[0] for s in range(2, 6)}
    assert len(homes) >= 2

    # The worker holding the conversation dies: the next turn goes elsewhere, with no error.
    up.kill(home)
    time.sleep(0.2)
    history = history + [30] * 8
    worker, _ = _turn(up, history)
    assert worker != home
    new_home = worker

    # A restarted router rebuilds its registry from the workers and keeps routing by prefix.
    up.restart("router")
    deadline = time.monotonic() + 30
    while True:  # the new router serves (an unrelated conversation) ...
        try:
            _turn(up, _conversation(99))
            break
        except AssertionError:
            assert time.monotonic() < deadline, "the restarted router never served"
            time.sleep(0.5)
    # ... then a heartbeat round: it has heard every worker and pulled their dumps. (The gateway asks a router
    # that has heard no worker yet again, so the first turn can land before the dumps are in.)
    time.sleep(2.0)
    history2 = history + [40] * 8
    worker, deltas = _turn(up, history2)
    assert worker == new_home
    assert deltas[worker][1] >= 0.9 * DOC_TOKENS
