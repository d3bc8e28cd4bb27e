"""NATS connection with reconnects, request/stream helpers and a timeout on every call.

W3C trace context rides in NATS headers: callers pass `headers`; the tracing layer fills them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from brigade.protocol import Message

log = logging.getLogger("brigade.bus")

DEFAULT_TIMEOUT = 5.0
CONNECT_TIMEOUT = 30.0  # services may start before NATS (compose): keep trying this long, then fail
# Headers count against the server's max payload but the client checks only the payload: keep room.
HEADER_MARGIN = 4096


class BusError(RuntimeError):
    """A bus call failed: no responder, timeout, or a closed connection."""


Handler = Callable[[Msg], Awaitable[None]]


class Bus:
    """A thin wrapper over one nats-py connection."""

    def __init__(self, nc: Client, name: str) -> None:
        self.nc = nc
        self.name = name

    @classmethod
    async def connect(cls, url: str, name: str, timeout: float = CONNECT_TIMEOUT) -> Bus:
        """Connect (retrying until `timeout`), then reconnect forever on drops."""

        async def on_error(e: Exception) -> None:
            log.warning("%s: nats error: %s", name, e)

        async def on_disconnect() -> None:
            log.warning("%s: disconnected from nats", name)

        async def on_reconnect() -> None:
            log.info("%s: reconnected to nats", name)

        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                # nats-py keeps retrying inside connect() with unlimited reconnects: bound it ourselves.
                nc = await asyncio.wait_for(nats.connect(
                    url, name=name, connect_timeout=min(2.0, timeout), max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5, error_cb=on_error, disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect, allow_reconnect=True,
                ), timeout=max(0.5, deadline - asyncio.get_running_loop().time()))
                return cls(nc, name)
            except Exception as e:  # nats raises several unrelated types on refused connections
                if asyncio.get_running_loop().time() > deadline:
                    raise BusError(f"cannot connect to NATS at {url}: {e}") from e
                await asyncio.sleep(0.2)

    @property
    def max_payload(self) -> int:
        """Largest payload to send, leaving room for headers."""
        return max(1024, int(self.nc.max_payload) - HEADER_MARGIN)

    def inbox(self) -> str:
        return self.nc.new_inbox()

    async def publish(self, subject: str, msg: Message | bytes, headers: dict[str, str] | None = None) -> None:
        data = msg.encode() if isinstance(msg, Message) else msg
        await self.nc.publish(subject, data, headers=headers or None)

    async def request(self, subject: str, msg: Message | bytes, timeout: float = DEFAULT_TIMEOUT,
                      headers: dict[str, str] | None = None) -> bytes:
        """Request/reply; BusError on timeout or when nobody listens."""
        data = msg.encode() if isinstance(msg, Message) else msg
        try:
            reply = await self.nc.request(subject, data, timeout=timeout, headers=headers or None)
        except NoRespondersError as e:
            raise BusError(f"no responders on {subject}") from e
        except (TimeoutError, NatsTimeout) as e:
            raise BusError(f"timeout after {timeout}s on {subject}") from e
        return bytes(reply.data)

    async def respond(self, msg: Msg, reply: Message | bytes, headers: dict[str, str] | None = None) -> None:
        """Answer a request (publish to its reply subject; `msg.respond` cannot carry headers)."""
        if msg.reply:
            await self.publish(msg.reply, reply, headers)

    async def subscribe(self, subject: str, handler: Handler, queue: str = "") -> Subscription:
        """Run `handler` for every message; an exception is logged, never kills the subscription."""

        async def cb(msg: Msg) -> None:
            try:
                await handler(msg)
            except Exception:
                log.exception("%s: handler for %s failed", self.name, subject)

        return await self.nc.subscribe(subject, queue=queue, cb=cb)

    async def flush(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Return once the server has processed everything sent so far (subscriptions included)."""
        # nats-py writes flush()'s PING straight to the socket while SUB/PUB wait in its pending buffer for
        # the flusher task: under CPU load the PONG came back before the SUB went out, and another
        # connection's request got "no responders" (8 of 300 here). Write the pending buffer first.
        write_pending = getattr(self.nc, "_flush_pending", None)
        if write_pending is not None:
            await write_pending(force_flush=True)
        await self.nc.flush(timeout=timeout)

    async def close(self) -> None:
        if not self.nc.is_closed:
            try:
                await asyncio.wait_for(self.nc.drain(), timeout=2.0)
            except Exception:  # closing anyway
                await self.nc.close()


async def publish_status(bus: Bus, subject: str, status: Message) -> None:
    """Publish a status message; failures are logged, not raised (the bus reconnects, the next beat goes out)."""
    try:
        await bus.publish(subject, status)
    except Exception as e:  # any transport error: a heartbeat must never kill its service
        log.warning("%s: status on %s failed: %s", bus.name, subject, e)


async def heartbeat(bus: Bus, subject: str, status: Callable[[], Message], period: float) -> None:
    """Publish status() on subject every `period` seconds until cancelled."""
    while True:
        await asyncio.sleep(period)
        await publish_status(bus, subject, status())
