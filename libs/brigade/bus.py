"""NATS connection with reconnects, request/stream helpers and a timeout on every call.

W3C trace context rides in NATS headers: callers pass `headers`; the tracing layer fills them.

Credentials, for every service alike, come from the URL (`nats://user:password@host`, `nats://token@host`;
several servers comma-separated) or, so that secrets stay off command lines, the environment:
BRIGADE_NATS_TOKEN, BRIGADE_NATS_USER + BRIGADE_NATS_PASSWORD, BRIGADE_NATS_CREDS (a .creds file),
BRIGADE_NATS_NKEY (an nkey seed file); TLS from BRIGADE_NATS_TLS_CA, BRIGADE_NATS_TLS_CERT, BRIGADE_NATS_TLS_KEY;
BRIGADE_NATS_INBOX_PREFIX where permissions confine a client's replies. Credentials in the URL win over the
environment's. An empty variable counts as unset.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from brigade.protocol import Message

log = logging.getLogger("brigade.bus")

DEFAULT_TIMEOUT = 5.0
_PONG_PATIENCE = 3600  # nats-py's own flush timeout: far beyond any stall a caller waits through
CONNECT_TIMEOUT = 30.0  # services may start before NATS (compose): keep trying this long, then fail
# Headers count against the server's max payload but the client checks only the payload: keep room.
HEADER_MARGIN = 4096


class BusError(RuntimeError):
    """A bus call failed: no responder, timeout, or a closed connection."""


class NoResponders(BusError):
    """Nobody is subscribed to the subject (yet: a service reconnecting after the server came back)."""


def servers(url: str) -> list[str]:
    """The comma-separated server URLs of `url`."""
    return [u.strip() for u in url.split(",") if u.strip()]


def _redact_one(url: str) -> str:
    scheme, sep, rest = url.rpartition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}{sep}{user + ':***' if colon else '***'}@{host}"  # a lone name is a token: hide it


def redact(url: str) -> str:
    """`url` fit for logs: passwords and tokens replaced by ***."""
    return ",".join(_redact_one(u) for u in servers(url))


def _file(env: Mapping[str, str], name: str) -> str:
    path = env.get(name, "")
    if path and not Path(path).is_file():
        raise BusError(f"{name}: no such file {path}")
    return path


def tls_context(env: Mapping[str, str] = os.environ) -> ssl.SSLContext | None:
    """A client TLS context from BRIGADE_NATS_TLS_CA/_CERT/_KEY; None when none is set."""
    ca, cert, key = (_file(env, f"BRIGADE_NATS_TLS_{k}") for k in ("CA", "CERT", "KEY"))
    if not (ca or cert or key):
        return None
    if key and not cert:
        raise BusError("BRIGADE_NATS_TLS_KEY needs BRIGADE_NATS_TLS_CERT")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca or None)  # no CA: the system's
    if cert:
        ctx.load_cert_chain(cert, key or None)
    return ctx


def connect_options(url: str, env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """nats.connect's server and credential arguments for `url` and the BRIGADE_NATS_* variables in `env`."""
    urls = servers(url)
    opts: dict[str, Any] = {"servers": urls}
    if ctx := tls_context(env):
        opts["tls"] = ctx
    if prefix := env.get("BRIGADE_NATS_INBOX_PREFIX", ""):
        opts["inbox_prefix"] = prefix
    if any("@" in u for u in urls):
        return opts  # explicit credentials in the URL: nats-py would let the environment's override them
    user, password = env.get("BRIGADE_NATS_USER", ""), env.get("BRIGADE_NATS_PASSWORD", "")
    if bool(user) != bool(password):
        raise BusError("BRIGADE_NATS_USER and BRIGADE_NATS_PASSWORD go together")
    if user:
        opts |= {"user": user, "password": password}
    if token := env.get("BRIGADE_NATS_TOKEN", ""):
        opts["token"] = token
    if creds := _file(env, "BRIGADE_NATS_CREDS"):
        opts["user_credentials"] = creds
    if seed := _file(env, "BRIGADE_NATS_NKEY"):
        opts["nkeys_seed"] = seed
    if (creds or seed) and importlib.util.find_spec("nkeys") is None:
        # nats-py would fail inside connect(), which we would retry until the deadline: say it now.
        raise BusError("BRIGADE_NATS_CREDS and BRIGADE_NATS_NKEY need the nkeys package (pip install nkeys)")
    return opts


async def _abandon(nc: Client) -> None:
    """Close a client whose connect() failed (its socket or reconnect task may still be open)."""
    try:
        await asyncio.wait_for(nc.close(), timeout=1.0)
    except Exception:  # nothing left to close, or closing failed: it is dropped either way
        pass


def _permanent(e: Exception) -> bool:
    """A refusal that retrying cannot cure: bad credentials (nats-server's word for any of them).

    Not "Authentication Timeout": that one a loaded client can cause and outlive."""
    return "authorization violation" in str(e).lower()


Handler = Callable[[Msg], Awaitable[None]]


class Bus:
    """A thin wrapper over one nats-py connection."""

    def __init__(self, nc: Client, name: str) -> None:
        self.nc = nc
        self.name = name
        self._pings: set[asyncio.Future[None]] = set()  # round trips still waiting for their PONG

    def __repr__(self) -> str:
        url = self.nc.connected_url
        where = redact(url.geturl()) if url is not None else "not connected"
        return f"Bus({self.name!r}, {where})"

    @classmethod
    async def connect(cls, url: str, name: str, timeout: float = CONNECT_TIMEOUT) -> Bus:
        """Connect (retrying until `timeout`), then reconnect forever on drops; credentials: see the module.

        Bad credentials fail at once (BusError) rather than after `timeout`: no retry will cure them."""
        opts = connect_options(url)
        loop = asyncio.get_running_loop()
        refused: list[Exception] = []
        last: list[Exception] = []  # nats-py's latest complaint: a timeout alone would say nothing
        attempt: asyncio.Task[None] | None = None

        async def on_error(e: Exception) -> None:
            log.warning("%s: nats error: %s", name, e)
            last[:] = [e]
            # nats-py retries a refused CONNECT inside connect() until our deadline: stop it.
            if attempt is not None and not attempt.done() and _permanent(e):
                refused.append(e)
                attempt.cancel()

        async def on_disconnect() -> None:
            log.warning("%s: disconnected from nats", name)

        async def on_reconnect() -> None:
            log.info("%s: reconnected to nats", name)

        deadline = loop.time() + timeout
        while True:
            nc = Client()
            # nats-py keeps retrying inside connect() with unlimited reconnects: bound it ourselves.
            attempt = asyncio.ensure_future(asyncio.wait_for(nc.connect(
                **opts, name=name, connect_timeout=min(2.0, timeout), max_reconnect_attempts=-1,
                reconnect_time_wait=0.5, error_cb=on_error, disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect, allow_reconnect=True,
            ), timeout=max(0.5, deadline - loop.time())))
            try:
                await attempt
                return cls(nc, name)
            except asyncio.CancelledError:
                if not refused:
                    raise  # our caller cancelled us
                await _abandon(nc)
                raise BusError(f"NATS at {redact(url)} refused {name}: {refused[-1]}") from None
            except Exception as e:  # nats raises several unrelated types on refused connections
                await _abandon(nc)
                if loop.time() > deadline:
                    why = str(e) or (str(last[0]) if last else type(e).__name__)
                    raise BusError(f"cannot connect to NATS at {redact(url)}: {why}") from e
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
            raise NoResponders(f"no responders on {subject}") from e
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
        # nats-py's flush(timeout) cancels its PONG future on a timeout but leaves it queued; the late PONG
        # (after a stall of the server) then raises InvalidStateError inside its read loop, which ends the loop:
        # the connection stays up and deaf, never reconnecting. So the round trip is never cancelled here; the
        # caller stops waiting and the PONG resolves it later (a reconnect drops the queue, and with it any
        # PONG still owed).
        ping = asyncio.ensure_future(self.nc.flush(timeout=_PONG_PATIENCE))
        self._pings.add(ping)
        ping.add_done_callback(_settled(self._pings))
        done, _ = await asyncio.wait({ping}, timeout=timeout)
        if not done:
            raise NatsTimeout
        ping.result()

    async def alive(self, timeout: float = 1.0) -> bool:
        """True when a round trip to the NATS server completes within `timeout`: a silence of every other
        client then means they are silent, not that the bus stalled."""
        try:
            await self.flush(timeout=timeout)
        except Exception:  # a timeout, or a connection being re-established
            return False
        return True

    async def close(self) -> None:
        if not self.nc.is_closed:
            try:
                await asyncio.wait_for(self.nc.drain(), timeout=2.0)
            except Exception:  # closing anyway
                await self.nc.close()


def _settled(pending: set[asyncio.Future[None]]) -> Callable[[asyncio.Future[None]], None]:
    def done(f: asyncio.Future[None]) -> None:
        pending.discard(f)
        if not f.cancelled():
            f.exception()  # retrieved: a failed round trip nobody awaited any more is not an error to log
    return done


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
