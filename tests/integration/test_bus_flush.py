"""Bus.flush orders a subscription before the PING that confirms it: seen on the wire through a recording proxy
between a Bus and a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib

from brigade.bus import Bus


class Recorder:
    """A TCP proxy to the server that keeps what the client sent."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("nats://").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.sent = bytearray()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return f"nats://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection(*self.upstream)
        for pipe in (self._pipe(cr, sw, record=True), self._pipe(sr, cw, record=False)):
            task = asyncio.create_task(pipe)
            self.tasks.add(task)

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, record: bool) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await r.read(65536):
                if record:
                    self.sent += data
                w.write(data)
                await w.drain()
        w.close()

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.server is not None:
            self.server.close()


async def test_flush_sends_pending_subscriptions_before_its_ping(nats_url: str) -> None:
    proxy = Recorder(nats_url)
    bus = await Bus.connect(await proxy.start(), "recorded")
    try:
        for i in range(5):
            await bus.subscribe(f"flush.order.{i}", _ignore)
            await bus.flush()
            wire = bytes(proxy.sent)
            sub, ping = wire.rfind(f"SUB flush.order.{i} ".encode()), wire.rfind(b"PING\r\n")
            # Without the fix nats-py writes the PING at once and the SUB only when its flusher task runs.
            assert 0 <= sub < ping, wire[-200:]
    finally:
        await bus.close()
        await proxy.stop()


async def _ignore(msg: object) -> None:
    return None
