"""Shared helpers of the integration tests: free ports and the workers' heartbeats."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from brigade import protocol as P
from brigade.bench.compare import fleet, heartbeats
from brigade.bus import Bus
from brigade.launcher import free_port, free_ports

__all__ = ["SubjectWatch", "free_port", "free_ports", "heartbeats", "latest", "metric_samples"]


def metric_samples(text: str) -> dict[tuple[str, str], float]:
    """Every sample of a /metrics page, keyed by (name, its labels as sorted "k=v" joined by commas)."""
    return {(s.name, ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def latest(nats: str) -> dict[str, P.WorkerStatus]:
    """Each live worker's newest status."""
    return asyncio.run(fleet(nats))


class SubjectWatch:
    """Watches a bus subject from a thread: `seen` lists the id in each message's subject (the third token, as
    in brigade.worker.<id>.<verb>), and `act(id)` runs at once for the first one."""

    def __init__(self, nats: str, subject: str, act: Callable[[str], None] = lambda worker: None) -> None:
        self.seen: list[str] = []
        ready, self._stop = threading.Event(), threading.Event()

        async def watch() -> None:
            bus = await Bus.connect(nats, "test-subject-watch")

            async def on_msg(msg: Any) -> None:
                self.seen.append(msg.subject.split(".")[2])
                if len(self.seen) == 1:
                    act(self.seen[0])

            await bus.subscribe(subject, on_msg)
            await bus.flush()
            ready.set()
            while not self._stop.is_set():
                await asyncio.sleep(0.05)
            await bus.close()

        self._thread = threading.Thread(target=asyncio.run, args=(watch(),), daemon=True)
        self._thread.start()
        assert ready.wait(10), f"could not subscribe to {subject}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


async def stream_text(client: httpx.AsyncClient, body: dict[str, Any], started: asyncio.Event | None = None,
                      path: str = "/v1/completions") -> str:
    """The text of one streamed completion (no error event allowed); `started` is set at its first text."""
    text = ""
    async with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                text += event["choices"][0]["text"]
                if started is not None:
                    started.set()
    return text


async def streams_under(url: str, n: int, body: Callable[[int, bool], dict[str, Any]],
                        fault: Callable[[], None]) -> tuple[list[str], float]:
    """`n` streams of `body(i, True)`; once every one has its first text, `fault()` runs (blocking, in a thread).
    Returns the texts and how long after the fault a fresh request (`body(999, False)`) took to be answered."""
    started = [asyncio.Event() for _ in range(n)]
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(90, connect=10)) as client:
        tasks = [asyncio.create_task(stream_text(client, body(i, True), started[i])) for i in range(n)]
        async with asyncio.timeout(60):
            for e in started:
                await e.wait()
        await asyncio.to_thread(fault)
        t0 = time.monotonic()
        fresh = await client.post("/v1/completions", json={**body(999, False), "max_tokens": 2}, timeout=30)
        recovery = time.monotonic() - t0
        assert fresh.status_code == 200, fresh.text
        async with asyncio.timeout(90):  # none hangs
            texts = await asyncio.gather(*tasks)
    return list(texts), recovery
