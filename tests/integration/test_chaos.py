"""The bus fails under load: `brigade up`'s NATS server paused for 3 s, then killed and started again 2 s later,
each under 40 streamed greedy requests. Every stream must end with the text of a run without faults, none may
hang, and a new request must be served within 5 s of the bus's return."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from helpers import free_port, streams_under

from brigade.launcher import Up, UpConfig

STREAMS = 40
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def up(tiny_models: dict[str, Path]) -> Iterator[Up]:
    with Up(UpConfig(model=str(tiny_models["llama"]), port=free_port(), decode=2,
                     worker_args=("--num-blocks", "512"))) as u:
        yield u


def _body(i: int, stream: bool) -> dict[str, object]:
    return {"model": "llama", "prompt": f"chaos request number {i} tells a story", "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True, "stream": stream}


@pytest.fixture(scope="module")
def reference(up: Up) -> list[str]:
    """Every request's text with nothing failing."""
    with httpx.Client(base_url=up.url, timeout=60) as client:
        return [client.post("/v1/completions", json=_body(i, False)).json()["choices"][0]["text"]
                for i in range(STREAMS)]


def _pause(up: Up, seconds: float) -> Callable[[], None]:
    def fault() -> None:
        assert up.nats is not None and up.nats.proc is not None
        os.kill(up.nats.proc.pid, signal.SIGSTOP)
        time.sleep(seconds)
        os.kill(up.nats.proc.pid, signal.SIGCONT)
    return fault


def _kill_and_restart(up: Up, down: float) -> Callable[[], None]:
    def fault() -> None:
        assert up.nats is not None and up.nats.proc is not None
        up.nats.proc.kill()
        up.nats.proc.wait(timeout=10)
        time.sleep(down)
        up.nats.restart()
    return fault


def test_nats_paused_3s_under_40_streams(up: Up, reference: list[str]) -> None:
    texts, recovery = asyncio.run(streams_under(up.url, STREAMS, _body, _pause(up, 3.0)))
    assert texts == reference
    assert recovery < 5.0, recovery
    assert not up.failed()


def test_nats_killed_and_restarted_under_40_streams(up: Up, reference: list[str]) -> None:
    texts, recovery = asyncio.run(streams_under(up.url, STREAMS, _body, _kill_and_restart(up, 2.0)))
    assert texts == reference
    assert recovery < 5.0, recovery
    assert not up.failed()


def test_paused_then_killed_again(up: Up, reference: list[str]) -> None:
    """Faults repeated on the same stack: the state the first ones left behind serves the next as well."""
    def both() -> None:
        _pause(up, 3.0)()
        _kill_and_restart(up, 2.0)()

    texts, recovery = asyncio.run(streams_under(up.url, STREAMS, _body, both))
    assert texts == reference
    assert recovery < 5.0, recovery
