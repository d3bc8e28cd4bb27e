"""Shared helpers of the integration tests: free ports and the workers' heartbeats."""

from __future__ import annotations

import asyncio
import socket

from brigade import protocol as P
from brigade.bus import Bus


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def heartbeats(nats: str, seconds: float = 1.2) -> list[P.WorkerStatus]:
    """Every worker status published during the next `seconds` (workers beat every 0.5 s)."""
    bus = await Bus.connect(nats, "test-heartbeats")
    seen: list[P.WorkerStatus] = []

    async def on_status(msg: object) -> None:
        seen.append(P.WorkerStatus.decode(msg.data))  # type: ignore[attr-defined]

    await bus.subscribe(P.HEARTBEAT, on_status)
    await asyncio.sleep(seconds)
    await bus.close()
    return seen


def latest(nats: str) -> dict[str, P.WorkerStatus]:
    """Each live worker's newest status."""
    return {st.worker_id: st for st in asyncio.run(heartbeats(nats))}
