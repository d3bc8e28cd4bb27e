"""A worker that stops answering (SIGSTOP: alive, holding its sockets, silent) must not stall routing."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
from helpers import free_port

from brigade.launcher import Up, UpConfig


def test_a_stopped_worker_is_routed_around(tiny_models: dict[str, Path]) -> None:
    """One of two workers SIGSTOPped: requests keep being served, by the other one, each well inside the
    gateway's route timeout (the router places requests concurrently, with a per-attempt timeout shorter than
    the gateway's, and avoids a worker whose heartbeats are late)."""
    with Up(UpConfig(model=str(tiny_models["llama"]), port=free_port(), router="round_robin", decode=2,
                     worker_args=("--num-blocks", "128"))) as up:
        stopped = next(p for n, p in up.procs if n == "decode-0")
        body = {"model": "llama", "prompt": "hello there", "max_tokens": 4, "temperature": 0}

        async def burst(n: int) -> list[tuple[int, float, str]]:
            async with httpx.AsyncClient(base_url=up.url, timeout=30) as client:
                async def one() -> tuple[int, float, str]:
                    t0 = time.monotonic()
                    r = await client.post("/v1/completions", json=body)
                    return r.status_code, time.monotonic() - t0, r.text
                return await asyncio.gather(*(one() for _ in range(n)))

        assert all(code == 200 for code, _, _ in asyncio.run(burst(4)))
        stopped.send_signal(signal.SIGSTOP)
        try:
            got = asyncio.run(burst(8))  # at once: some are routed to the stopped worker before it is late
            assert [code for code, _, _ in got] == [200] * 8, got
            assert max(t for _, t, _ in got) < 4.5, got  # one forward timeout and a retry, not a 503
            time.sleep(1.5)  # its heartbeats are late now: it is avoided
            got = asyncio.run(burst(8))
            assert [code for code, _, _ in got] == [200] * 8, got
            assert max(t for _, t, _ in got) < 1.0, got
        finally:
            stopped.send_signal(signal.SIGCONT)
