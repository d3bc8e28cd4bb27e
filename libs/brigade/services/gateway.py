"""The gateway: OpenAI-compatible HTTP in front, NATS behind (DESIGN §3). Wiring and I/O only.

Validation and response bodies live in `brigade.openai_api`; this module admits requests, fans each one out
into one GenerateRequest per choice, relays TokenChunks to the choices' streams, and cancels on the bus
whatever the client stops waiting for.

Tokens come back on one wildcard subscription per gateway: each choice has its own inbox under the gateway's
prefix (`<prefix>.<n>`, its reply_to), and workers send a step's tokens for all of this gateway's requests
in one TokenBatch on `<prefix>.batch` (its batch_to). The callback decodes each message once and puts the
chunks, by request id, into their flows' queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hmac
import itertools
import json
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import asdict
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import ConnectionClosedError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from brigade import openai_api as api
from brigade import protocol as P
from brigade import tracing
from brigade.bus import Bus, BusError, NoResponders
from brigade.config import GatewayConfig, default_served_names
from brigade.fleet_metrics import FleetCollector
from brigade.model.tokenizer import Tokenizer
from brigade.openapi_schema import openapi as openapi_document
from brigade.stream_order import ChunkOrder, Order, count_mismatch
from brigade.tool_parsers import PARSERS

log = logging.getLogger("brigade.gateway")
WATCH_PERIOD_S = 0.5


class _Signal(enum.Enum):
    """Queue items that are not tokens."""

    REPLAY = "replay"  # the worker serving that choice is gone: replay it
    SHUTDOWN = "shutdown"  # the gateway is stopping: end the request with a 503


# What a Flow's queue holds, per choice index: a decoded chunk, a signal, or the error of an undecodable message.
_Item = tuple[int, P.TokenChunk | _Signal | P.ProtocolError]

# Bucket edges as vLLM uses them, so its dashboards read these histograms unchanged.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class Metrics:
    """Prometheus metrics in a registry of their own, so several apps can live in one process (tests)."""

    def __init__(self, model_name: str) -> None:
        r = self.registry = CollectorRegistry()
        m = ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token, seconds", m,
                              buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between token messages, seconds", m,
                             buckets=ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to last token, seconds", m,
                             buckets=E2E_BUCKETS, registry=r).labels(model_name)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens sent to workers", m,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated", m,
                                         registry=r).labels(model_name)
        self._success = Counter("vllm:request_success", "Finished requests (one per choice)",
                                [*m, "finished_reason"], registry=r)
        self.rejected = Counter("brigade:requests_rejected", "Requests refused before generation (400/401/404/429/503)",
                                ["code"], registry=r)
        self.failed = Counter("brigade:requests_failed", "Requests that failed during generation", ["code"],
                              registry=r)
        self.inflight = Gauge("brigade:gateway_requests_inflight",
                              "Sequences (prompts x n of each request) the gateway is serving", registry=r)
        self.replayed = Counter("brigade:requests_replayed", "Choices moved to another worker mid-generation, by why",
                                ["reason"], registry=r)
        self.streams_cut = Counter("brigade:streams_cut", "Streams cut off as their client stopped reading, by why",
                                   ["reason"], registry=r)
        self.model_name = model_name
        self.fleet = FleetCollector(model_name)  # every worker's engine metrics, from its heartbeats
        r.register(self.fleet)

    def success(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()


class Flow:
    """The bus side of one HTTP request: its choices' inboxes, their token streams, and their cancellation.

    `close()` is idempotent and synchronous, so it can run from any finally (including in a cancelled task):
    it frees the admission slot and leaves the Cancel/unsubscribe I/O to a background task.
    """

    def __init__(self, gw: Gateway, req: api.ApiRequest, t0: float, span: tracing.Span) -> None:
        self.gw = gw
        self.req = req
        self.t0 = t0  # loop time at arrival: TTFT and the request timeout count from here
        self.span = span  # the request's server span: ended by close()
        self.id = api.new_id(req.kind)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._trace_start()
        self.created = int(time.time())
        self.request_ids = [f"{self.id}-{i}" for i in range(req.num_choices)]
        self.finished = [False] * req.num_choices
        # Per choice, for replay (DESIGN §3.6): its inbox, the worker serving it, the tokens it has so far
        # and the chars of their text that reached the client.
        self.inboxes: list[str] = []
        self.worker = [""] * req.num_choices
        self.output: list[list[int]] = [[] for _ in range(req.num_choices)]
        self.text_sent = [0] * req.num_choices
        self.replays = [0] * req.num_choices
        self.order = [ChunkOrder() for _ in range(req.num_choices)]  # per choice: its current request id's seqs
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.closed = False
        # A stream's way to end its response at once (set by _EventStream); None for a JSON response, whose
        # consumer never waits on the client.
        self.on_cut: Callable[[], None] | None = None
        self.cut_reason: str | None = None
        gw.flows.add(self)

    async def start(self) -> None:
        """Give every choice an inbox, then route every choice; ApiError(503) when nobody takes one."""
        try:
            # Subscribed before the request leaves, so no token can arrive ahead of the subscription.
            await self.gw.subscribe_tokens()
        except Exception as e:  # a closed connection: nats-py raises its own types
            raise api.ApiError(503, f"bus unavailable ({e})", code="no_worker_available") from e
        self.inboxes = [self.gw.new_inbox() for _ in range(self.req.num_choices)]
        for i, (rid, inbox) in enumerate(zip(self.request_ids, self.inboxes, strict=True)):
            self.gw.by_request[rid] = self.gw.by_inbox[inbox] = (self, i)
        results = await asyncio.gather(*(self._route(i, inbox) for i, inbox in enumerate(self.inboxes)),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        self.gw.metrics.prompt_tokens.inc(sum(len(p.ids) for p in self.req.prompts))

    def _trace_start(self) -> None:
        r, p = self.req, self.req.choice_params(0)
        self.span.set_attributes({
            tracing.REQUEST_ID: self.id, tracing.REQUEST_MODEL: r.model, tracing.REQUEST_N: r.num_choices,
            tracing.REQUEST_MAX_TOKENS: p.max_tokens, tracing.REQUEST_TEMPERATURE: p.temperature,
            tracing.REQUEST_TOP_P: p.top_p, "brigade.stream": r.stream})

    async def _route(self, index: int, inbox: str) -> None:
        gw = self.gw
        msg = P.GenerateRequest(self.request_ids[index], list(self.req.prompt_of(index).ids),
                                asdict(self.req.choice_params(index)), inbox, model=self.req.model,
                                arrival=time.time(), output_ids=list(self.output[index]),
                                text_sent=self.text_sent[index], batch_to=gw.batch_subject)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + gw.config.route_timeout
        delay = 0.05
        while True:
            why = ""
            try:
                reply = await gw.bus.request(P.ROUTER_GENERATE, msg, timeout=max(deadline - loop.time(), 0.05),
                                             headers=tracing.headers(self.span))
                accepted = P.Accepted.decode(reply)
                if accepted.code != 503:
                    break
                why = accepted.error or "503"
            except NoResponders as e:
                why = str(e)
            except (BusError, P.ProtocolError, ConnectionClosedError) as e:
                raise api.ApiError(503, f"no worker available ({e})", code="no_worker_available") from e
            # No router subscribed, or no worker it can place the request on: right after the bus came back, both
            # are reconnecting (the router's heartbeats from workers are late). Ask again while the route timeout
            # lasts.
            if loop.time() + delay >= deadline:
                raise api.ApiError(503, f"no worker available ({why})", code="no_worker_available")
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.5)
        if accepted.code == 400:  # the worker judged the request itself invalid: the client's problem
            raise api.ApiError(400, accepted.error or "invalid request")
        if accepted.code != 200:
            raise api.ApiError(503, f"no worker available ({accepted.error or accepted.code})",
                               code="no_worker_available")
        self._serving(index, accepted.worker_id)

    def _serving(self, index: int, worker: str) -> None:
        """Choice `index` is on `worker` now; a worker we have not heard from yet gets its timeout from here."""
        self.worker[index] = worker
        self.gw.seen.setdefault(worker, asyncio.get_running_loop().time())

    async def replay(self, index: int, reason: str) -> None:
        """Send choice `index` again, with the tokens it already has, to whichever worker the router picks.

        A new request id, so that anything still coming from the old worker is ignored; seeded sampling is a
        function of (seed, position), so the continuation is the one the old worker would have produced.
        """
        if self.replays[index] >= self.gw.config.max_replays:
            raise api.ApiError(503, f"generation lost its worker {self.replays[index] + 1} times ({reason})",
                               code="worker_lost")
        old = self.request_ids[index]
        self.replays[index] += 1
        new = self.request_ids[index] = f"{self.id}-{index}-r{self.replays[index]}"
        self.gw.by_request.pop(old, None)  # whatever the old worker still sends is dropped
        self.gw.by_request[new] = (self, index)
        self.worker[index] = ""
        self.order[index].reset()  # the new request id is numbered from 1
        self.gw.metrics.replayed.labels(reason).inc()
        self.span.add_event("replayed", {"reason": reason, "choice": index, "tokens": len(self.output[index])})
        log.warning("%s: replaying on another worker after %d tokens (%s)", old, len(self.output[index]), reason)
        with contextlib.suppress(Exception):  # the old worker may still be alive (only slow): stop it
            await self.gw.bus.publish(P.CANCEL, P.Cancel(old))
        # No worker right now (the only one died and is being restarted): keep trying for a bounded time.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.gw.config.replay_timeout
        delay = 0.25
        while True:
            try:
                await self._route(index, self.inboxes[index])
                return
            except api.ApiError as e:
                if e.status != 503 or loop.time() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(2 * delay, 2.0)

    async def events(self) -> AsyncIterator[tuple[int, P.TokenChunk]]:
        """(choice index, chunk) until every choice has finished; ApiError on a worker error or a timeout."""
        cfg = self.gw.config
        metrics = self.gw.metrics
        loop = asyncio.get_running_loop()
        deadline = self.t0 + cfg.request_timeout
        last = [loop.time()] * len(self.finished)
        seen = [False] * len(self.finished)
        while not all(self.finished):
            try:
                index, chunk = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                silent_until = min(t + self._check_after() for t, done in zip(last, self.finished, strict=True)
                                   if not done)
                try:
                    # timeout_at, not wait_for: wait_for wraps the get in a new task, once per token.
                    async with asyncio.timeout_at(min(deadline, silent_until)):
                        index, chunk = await self.queue.get()
                except TimeoutError:
                    if loop.time() >= deadline:
                        raise api.ApiError(504, f"request timed out after {cfg.request_timeout}s",
                                           code="timeout") from None
                    for index in self._stalled(last):
                        await self.replay(index, "stalled")
                        last[index] = loop.time()
                    continue
            if not isinstance(chunk, P.TokenChunk):
                if chunk is _Signal.SHUTDOWN:
                    raise api.ApiError(503, "the server is shutting down", code="shutting_down")
                if isinstance(chunk, P.ProtocolError):
                    raise api.ApiError(500, f"bad token message: {chunk}", code="worker_error") from chunk
                if not self.finished[index]:  # _Signal.REPLAY
                    await self.replay(index, "worker_lost")
                    last[index] = loop.time()
                continue
            if chunk.request_id != self.request_ids[index] or self.finished[index]:
                continue  # a stray message (e.g. a late one after finish): not ours to show
            if chunk.error:
                if chunk.retry and self.replays[index] < self.gw.config.max_replays:
                    await self.replay(index, "handoff_lost")
                    last[index] = loop.time()
                    continue
                self.finished[index] = True  # the worker has already dropped it: nothing to cancel
                raise api.ApiError(500, f"generation failed: {chunk.error}", code="worker_error")
            order = self._order(index, chunk)
            if order is Order.DUPLICATE:
                continue
            if order is Order.GAP:  # chunks were lost on the way: resume from exactly what the client has
                await self.replay(index, "gap")
                last[index] = loop.time()
                continue
            now = loop.time()
            if chunk.worker_id and chunk.worker_id != self.worker[index]:
                self._serving(index, chunk.worker_id)  # e.g. the decode worker, after a handoff
            self.output[index].extend(chunk.token_ids)
            self.text_sent[index] += len(chunk.text)
            if chunk.token_ids:
                if seen[index]:
                    metrics.itl.observe(now - last[index])
                else:
                    metrics.ttft.observe(now - self.t0)
                    if not any(seen):
                        self.span.set_attribute(tracing.LATENCY_TTFT, now - self.t0)
                    seen[index] = True
            last[index] = now
            if chunk.finish_reason is not None:
                self.finished[index] = True
                metrics.e2e.observe(now - self.t0)
                metrics.success(chunk.finish_reason)
                self.prompt_tokens += chunk.prompt_tokens
                self.completion_tokens += chunk.completion_tokens
            yield index, chunk

    def _check_after(self) -> float:
        """Seconds of silence before a choice's worker is looked at (`_stalled`)."""
        return min(self.gw.config.token_timeout, self.gw.config.stall_timeout)

    def _stalled(self, last: list[float]) -> list[int]:
        """Choices silent for `_check_after()`: one on a live, busy worker is queued there and simply waits (its
        clock restarts); one whose worker is alive but idle has lost its tokens on the way (a bus node died
        with its last message, say) and is replayed from what the client has; with no replay left, a 504."""
        now = asyncio.get_running_loop().time()
        cfg = self.gw.config
        stalled = []
        for i, done in enumerate(self.finished):
            if done or last[i] + self._check_after() > now:
                continue
            if self.gw.busy(self.worker[i]):
                last[i] = now
            elif self.replays[i] < cfg.max_replays and self.worker[i]:
                stalled.append(i)
            elif last[i] + cfg.token_timeout <= now:
                raise api.ApiError(504, f"no tokens for {cfg.token_timeout}s", code="timeout")
        return stalled

    def push(self, index: int, item: P.TokenChunk | _Signal | P.ProtocolError) -> None:
        """Queue an item for choice `index`; a stream whose client has left this much unread is cut off."""
        if self.on_cut is not None and self.queue.qsize() >= self.gw.config.max_pending_events:
            self.cut("pending")
            return
        self.queue.put_nowait((index, item))

    def cut(self, reason: str) -> None:
        """Cut off a stream client that stopped reading: end its response and close (cancel, free the slot).

        Without this, its output piles up here and its admission slot stays taken for as long as it likes.
        """
        if self.cut_reason is not None:
            return
        self.cut_reason = reason
        self.gw.metrics.streams_cut.labels(reason).inc()
        self.span.add_event("cut", {"reason": reason, "pending": self.queue.qsize()})
        log.warning("%s: cutting off a client that stopped reading (%s)", self.id, reason)
        self.close()
        if self.on_cut is not None:
            self.on_cut()

    def _order(self, index: int, chunk: P.TokenChunk) -> Order:
        """Where `chunk` stands in its choice's stream; a final chunk whose token count disagrees with what was
        relayed (across replays) is a gap too: a lost chunk that its seq could not show (an unnumbered worker)."""
        order = self.order[index].check(chunk.seq)
        if (order is Order.NEXT and chunk.finish_reason is not None
                and count_mismatch(chunk.completion_tokens, len(self.output[index]) + len(chunk.token_ids))):
            return Order.GAP
        return order

    def close(self) -> None:
        """Free the slot and the inboxes; cancel every unfinished choice on the bus (in the background)."""
        if self.closed:
            return
        self.closed = True
        self.gw.flows.discard(self)
        for rid in self.request_ids:
            self.gw.by_request.pop(rid, None)
        for inbox in self.inboxes:
            self.gw.by_inbox.pop(inbox, None)
        self.gw.release_slot(self.req.num_choices)
        self.span.set_attributes({
            tracing.USAGE_PROMPT_TOKENS: self.prompt_tokens, tracing.USAGE_COMPLETION_TOKENS: self.completion_tokens,
            tracing.USAGE_NUM_SEQUENCES: sum(self.finished),
            tracing.LATENCY_E2E: asyncio.get_running_loop().time() - self.t0})
        self.span.end()
        pending = [rid for rid, done in zip(self.request_ids, self.finished, strict=True) if not done]
        if pending:
            self.gw.spawn(self._cancel(pending))

    async def _cancel(self, pending: list[str]) -> None:
        try:
            for rid in pending:
                await self.gw.bus.publish(P.CANCEL, P.Cancel(rid))
        except Exception as e:  # a closed bus: the workers' own timeouts reclaim the requests
            log.warning("cancelling %s: %s", self.id, e)


class _SendTimeout(Exception):
    """One send to the client did not complete within the stream's send timeout."""


class _EventStream(EventSourceResponse):
    """An SSE response that always runs `on_close` when it ends, even if the body never started.

    Each send to the client has `send_timeout` seconds (uvicorn's send waits while the socket's buffers are
    full); past it the stream ends and `on_stall` runs. `cut()` ends it at once, from anywhere on the loop.
    """

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None], send_timeout: float = 30.0,
                 on_stall: Callable[[], None] | None = None, ping: int = 0) -> None:
        # The grace period lets a stream told to stop (Gateway.shutdown) end with an error event and [DONE].
        # No keep-alive pings by default (ping=0), as OpenAI and vLLM send none: vLLM's benchmark client fails a
        # stream whose first event is an SSE comment, which a request queued for more than 15 s got.
        super().__init__(content, sep="\n", shutdown_grace_period=2.0, ping=ping)
        self.on_close = on_close
        self.on_stall = on_stall
        self.stream_send_timeout = send_timeout  # not sse-starlette's send_timeout: that one skips the last send
        self._scope: anyio.CancelScope | None = None  # while the response runs
        self._cut = False

    def cut(self) -> None:
        self._cut = True  # before the response starts: it ends as soon as it does
        if self._scope is not None:
            self._scope.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_within(message: Message) -> None:
            with anyio.move_on_after(self.stream_send_timeout) as timer:
                await send(message)
            if timer.cancelled_caught:
                raise _SendTimeout

        try:
            with anyio.CancelScope() as self._scope:
                if self._cut:
                    self._scope.cancel()
                await super().__call__(scope, receive, send_within)
        except _SendTimeout:
            if self.on_stall is not None:
                self.on_stall()
        finally:
            self.on_close()


def _trace_error(span: tracing.Span, e: api.ApiError) -> None:
    span.set_attribute("http.response.status_code", e.status)
    tracing.fail(span, str(e))


# json.dumps with any non-default option builds a new encoder per call: build it once.
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _events(bodies: list[Any]) -> bytes:
    """SSE `data:` events of JSON bodies, as sse-starlette frames a str with sep="\n" (JSON holds no raw newline).

    Bytes pass through sse-starlette untouched, and the events of one chunk go out in one write.
    """
    return "".join(f"data: {_dumps(b)}\n\n" for b in bodies).encode()


async def _wait_disconnect(request: Request) -> None:
    """Return once the client has gone (the body is already read, so receive() only reports disconnects)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 as soon as it passes `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise api.ApiError(413, f"request body of {declared} bytes is over the limit of {limit}",
                           code="request_too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise api.ApiError(413, f"request body is over the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


class Gateway:
    """Admission, fan-out and relaying for the HTTP routes."""

    def __init__(self, config: GatewayConfig, bus: Bus, tokenizer: Tokenizer, max_model_len: int) -> None:
        self.config = config
        self.bus = bus
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.served_names = served_names(config)
        self.served = self.served_names[0]  # the metrics' model_name label
        self.metrics = Metrics(self.served)
        self.inflight = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.flows: set[Flow] = set()
        self.token_text = lru_cache(maxsize=1 << 16)(self._token_text)
        self.seen: dict[str, float] = {}  # worker id -> loop time of its last heartbeat
        self.serving: set[str] = set()  # workers that run whole requests (decode, colocated): /health needs one
        self.stopping: set[str] = set()
        # Token inboxes: `<prefix>.<n>` per choice, `<prefix>.batch` for TokenBatches; one subscription to `<prefix>.*`.
        self.prefix = bus.inbox()
        self.batch_subject = f"{self.prefix}.batch"
        self._inbox_ids = itertools.count()
        self._tokens_sub: Subscription | None = None
        self._tokens_lock = asyncio.Lock()
        self.by_request: dict[str, tuple[Flow, int]] = {}  # request id -> its flow and choice index
        self.by_inbox: dict[str, tuple[Flow, int]] = {}  # choice inbox -> the same (for undecodable messages)

    async def start(self) -> None:
        """Watch the workers' heartbeats, so requests on a worker that dies are replayed elsewhere."""
        await self.subscribe_tokens()
        await self.bus.subscribe(P.HEARTBEAT, self._on_status)
        self.spawn(self._watch())

    async def subscribe_tokens(self) -> None:
        """Subscribe to this gateway's token inboxes, once (the first request does it if start() did not)."""
        if self._tokens_sub is not None:
            return
        async with self._tokens_lock:
            if self._tokens_sub is None:
                self._tokens_sub = await self.bus.subscribe(f"{self.prefix}.*", self._on_tokens)

    def new_inbox(self) -> str:
        return f"{self.prefix}.{next(self._inbox_ids)}"

    async def _on_tokens(self, msg: Msg) -> None:
        """Every token message of this gateway: decoded once, each chunk to its flow (unknown ids are dropped)."""
        try:
            chunks = P.decode_tokens(msg.data)
        except P.ProtocolError as e:
            route = self.by_inbox.get(msg.subject)  # a choice's own inbox: fail that choice, as a bad chunk
            if route is None:
                log.warning("dropping a bad token message on %s: %s", msg.subject, e)
            else:
                route[0].push(route[1], e)
            return
        by_request = self.by_request
        tokens = 0
        for chunk in chunks:
            route = by_request.get(chunk.request_id)
            if route is not None:
                route[0].push(route[1], chunk)
                tokens += len(chunk.token_ids)
        if tokens:
            self.metrics.generation_tokens.inc(tokens)  # once per message, not per chunk

    async def _on_status(self, msg: Msg) -> None:
        st = P.WorkerStatus.decode(msg.data)
        self.seen[st.worker_id] = asyncio.get_running_loop().time()
        self.metrics.fleet.update(st)
        if st.role in ("decode", "colocated"):
            self.serving.add(st.worker_id)
        if st.stopping:
            self.stopping.add(st.worker_id)
        else:
            self.stopping.discard(st.worker_id)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(WATCH_PERIOD_S)
            now = loop.time()
            gone = {w for w, t in self.seen.items() if now - t > self.config.worker_timeout} | self.stopping
            if not gone:
                continue
            if gone - self.stopping and not await self.bus.alive(1.0):
                continue  # the bus stalled, not the workers: replaying now would cancel healthy generations
            now = loop.time()
            gone = {w for w, t in self.seen.items() if now - t > self.config.worker_timeout} | self.stopping
            for flow in self.flows:
                for i, w in enumerate(flow.worker):
                    if w in gone and not flow.finished[i]:
                        flow.worker[i] = ""  # one replay per loss
                        flow.queue.put_nowait((i, _Signal.REPLAY))
            for w in gone - self.stopping:
                del self.seen[w]  # dead: forget it (a restarted worker beats again under its id)
                self.serving.discard(w)
                self.metrics.fleet.forget(w)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def busy(self, worker: str) -> bool:
        """True when `worker` is alive (heartbeats within worker_timeout, not stopping) and holds requests."""
        if not worker or worker in self.stopping:
            return False
        if asyncio.get_running_loop().time() - self.seen.get(worker, -1e9) > self.config.worker_timeout:
            return False
        st = self.metrics.fleet.latest.get(worker)
        return st is not None and st.running + st.waiting > 0

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)  # a strong reference, or the task may be collected mid-flight
        task.add_done_callback(self.tasks.discard)

    def release_slot(self, sequences: int = 1) -> None:
        self.inflight -= sequences
        self.metrics.inflight.dec(sequences)

    def shutdown(self) -> None:
        """End every request in flight with a 503 (streams: an error event, then [DONE])."""
        for flow in self.flows:
            flow.queue.put_nowait((0, _Signal.SHUTDOWN))

    async def aclose(self) -> None:
        """Wait for pending cancellations to reach the bus (before it is closed)."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=2.0)

    def error(self, e: api.ApiError, span: tracing.Span | None = None) -> JSONResponse:
        (self.metrics.failed if e.status in (500, 504) else self.metrics.rejected).labels(str(e.status)).inc()
        if span is not None:
            _trace_error(span, e)
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    # ---- routes ------------------------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, api.parse_completion)

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, partial(api.parse_chat,
                                                     tool_parser=self.config.tool_call_parser))

    async def _generate(self, request: Request, parse: Callable[..., api.ApiRequest]) -> Response:
        # The server span of the request; a client's own traceparent header makes it a child of the caller's.
        span = tracing.start(f"POST {request.url.path}", tracing.context_of(request.headers), tracing.SpanKind.SERVER,
                             {"http.request.method": "POST", "url.path": request.url.path})
        if self.inflight >= self.config.max_inflight:
            response = self.error(api.ApiError(429, f"too many concurrent requests (limit {self.config.max_inflight})",
                                               code="rate_limit_exceeded"), span)
            span.end()
            return response
        t0 = asyncio.get_running_loop().time()
        self.inflight += 1
        self.metrics.inflight.inc()
        flow: Flow | None = None
        handed_off = False  # once a stream response owns the flow, it closes it
        try:
            body = await _read_body(request, self.config.max_request_bytes)
            # Tokenizing (and chat templating) is CPU work: keep it off the event loop.
            req = await asyncio.to_thread(parse, body, self.tokenizer, self.served_names, self.max_model_len)
            if req.ignored:
                log.warning("ignoring fields this server does not know: %s", ", ".join(req.ignored))
            self._admit(req)
            flow = Flow(self, req, t0, span)
            await flow.start()
            if req.stream:
                handed_off = True
                stream = _EventStream(self._stream(flow), flow.close, self.config.send_timeout,
                                      on_stall=lambda: flow.cut("send_timeout"), ping=self.config.sse_ping)
                flow.on_cut = stream.cut
                return stream
            return await self._complete(request, flow)
        except api.ApiError as e:
            return self.error(e, span)
        except ClientDisconnect:
            span.set_attribute("http.response.status_code", 499)
            return Response(status_code=499)  # nobody is listening
        finally:
            if not handed_off:
                if flow is not None:
                    flow.close()
                else:
                    self.release_slot()
                    span.end()

    def _admit(self, req: api.ApiRequest) -> None:
        """Count the request's sequences (prompts x n), not the request: the slot taken on arrival is one."""
        extra = req.num_choices - 1
        if req.num_choices > self.config.max_inflight:
            raise api.ApiError(400, f"this request fans out to {req.num_choices} sequences (prompts x n); this "
                               f"server takes at most {self.config.max_inflight} at once", param="n")
        if self.inflight + extra > self.config.max_inflight:
            raise api.ApiError(429, f"too many concurrent sequences (limit {self.config.max_inflight})",
                               code="rate_limit_exceeded")
        self.inflight += extra
        self.metrics.inflight.inc(extra)

    async def _complete(self, request: Request, flow: Flow) -> Response:
        """Collect every choice; give up (and cancel) as soon as the client disconnects."""
        choices = api.new_choices(flow.req)

        async def collect() -> None:
            async for index, chunk in flow.events():
                choices[index].add(chunk)

        # uvicorn does not cancel a plain handler when its client leaves: watch for the disconnect ourselves.
        consumer = asyncio.create_task(collect())
        watcher = asyncio.create_task(_wait_disconnect(request))
        try:
            await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            consumer.cancel()
            watcher.cancel()
        if not consumer.done() or consumer.cancelled():
            return Response(status_code=499)
        consumer.result()  # re-raises an ApiError
        return JSONResponse(api.final_body(flow.req, flow.id, flow.created, choices, self.token_text))

    async def _stream(self, flow: Flow) -> AsyncIterator[bytes]:
        fmt = api.StreamFormatter(flow.req, flow.id, flow.created, self.token_text)
        try:
            tail: list[Any] = []
            try:
                if start := fmt.start():
                    yield _events(start)
                async for index, chunk in flow.events():
                    if bodies := fmt.on_chunk(index, chunk):
                        yield _events(bodies)
                tail = fmt.end()
            except api.ApiError as e:  # headers are gone: report in-band, as vLLM does
                self.metrics.failed.labels(str(e.status)).inc()
                _trace_error(flow.span, e)
                tail = [e.body()]
            yield _events(tail) + b"data: [DONE]\n\n"
        finally:
            flow.close()  # a client that went away cancels here (the task is cancelled under us)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{
            "id": name, "object": "model", "created": 0, "owned_by": "brigade", "root": self.config.model,
            "max_model_len": self.max_model_len} for name in self.served_names]})

    def ready(self) -> str | None:
        """None when a request sent now can be served; else why not."""
        if not self.bus.nc.is_connected:
            return "not connected to NATS"
        now = asyncio.get_running_loop().time()
        if not any(now - self.seen.get(w, -1e9) <= self.config.worker_timeout and w not in self.stopping
                   for w in self.serving):
            return "no worker serving the model yet"
        return None

    async def health(self, request: Request) -> Response:
        """200 once a worker can serve the model (as vLLM's, only once its engine runs), else 503."""
        reason = self.ready()
        if reason is None:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503,
                            headers={"Retry-After": "1"})

    async def prometheus(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document(self.served_names))


def served_names(config: GatewayConfig) -> tuple[str, ...]:
    """The names clients may send as `model`: --served-model-name's (comma-separated), else the model as
    given, plus a local path's directory name (`--model /models/llama` answers to `llama` too)."""
    names = [n.strip() for n in config.served_model_name.split(",") if n.strip()]
    return tuple(names) if names else default_served_names(config.model)


class ApiKeyMiddleware:
    """`Authorization: Bearer <key>` on /v1/* (401 otherwise), as vLLM's --api-key; /health stays open for probes,
    and /metrics for scrapers unless `metrics` says it needs the key too."""

    def __init__(self, app: Any, key: str, metrics: bool = False) -> None:
        """`key`: one key, or several comma-separated (any of them is accepted)."""
        self.app = app
        self.expected = [f"Bearer {k.strip()}".encode() for k in key.split(",") if k.strip()]
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path.startswith("/v1") or (self.metrics and path == "/metrics"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            # Compare with every key (no early exit), so the time taken says nothing about which came close.
            if not sum(hmac.compare_digest(given, want) for want in self.expected):
                body = api.ApiError(401, "invalid or missing API key (Authorization: Bearer ...)",
                                    code="invalid_api_key").body()
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(config: GatewayConfig, bus: Bus, tokenizer: Tokenizer, max_model_len: int) -> Starlette:
    """The HTTP app; `app.state.gateway` is the Gateway behind it."""
    gw = Gateway(config, bus, tokenizer, max_model_len)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        status = exc.status_code
        return JSONResponse(api.ApiError(status, str(exc.detail), code=None).body(), status_code=status)

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path, exc_info=exc)
        return JSONResponse(api.ApiError(500, "internal server error").body(), status_code=500)

    middleware = ([Middleware(ApiKeyMiddleware, key=config.api_key, metrics=config.api_key_metrics)]
                  if config.api_key else [])
    app = Starlette(
        middleware=middleware,
        routes=[
            Route("/v1/completions", gw.completions, methods=["POST"]),
            Route("/v1/chat/completions", gw.chat, methods=["POST"]),
            Route("/v1/models", gw.models, methods=["GET"]),
            Route("/health", gw.health, methods=["GET"]),
            Route("/metrics", gw.prometheus, methods=["GET"]),
            Route("/openapi.json", gw.openapi, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: internal_error},
    )
    app.state.gateway = gw
    return app


class _Server(uvicorn.Server):
    """uvicorn that stops on SIGINT/SIGTERM and returns, instead of re-raising the signal after shutdown."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_exit = on_exit

    def _exit(self, sig: int) -> None:
        self.on_exit()
        # handle_exit also tells sse-starlette to end open streams (it patches this method).
        self.handle_exit(sig, None)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        sigs = (signal.SIGINT, signal.SIGTERM)
        for sig in sigs:
            loop.add_signal_handler(sig, self._exit, sig)
        try:
            yield
        finally:
            for sig in sigs:
                loop.remove_signal_handler(sig)


async def serve(config: GatewayConfig) -> None:
    """Connect the bus, load the tokenizer, and serve HTTP until SIGINT/SIGTERM."""
    from brigade.model.config import load_config
    from brigade.model.resolve import resolve_model

    if config.tool_call_parser not in ("auto", *PARSERS):
        raise ValueError(f"unknown --tool-call-parser {config.tool_call_parser!r}; one of auto, {', '.join(PARSERS)}")
    model_dir = await asyncio.to_thread(resolve_model, config.model)
    tokenizer = await asyncio.to_thread(Tokenizer, model_dir)
    if config.chat_template:  # --chat-template: a file, else the template itself (as vLLM takes it)
        path = Path(config.chat_template)
        tokenizer.chat_template = path.read_text() if path.is_file() else config.chat_template
    max_position = load_config(model_dir).max_position
    max_model_len = min(config.max_model_len or max_position, max_position)  # as the workers' engines clip it
    tracing.setup("gateway")
    bus = await Bus.connect(config.nats, "gateway")
    app = build_app(config, bus, tokenizer, max_model_len)
    gw: Gateway = app.state.gateway
    await gw.start()
    server = _Server(uvicorn.Config(app, host=config.host, port=config.port, lifespan="off",
                                    timeout_graceful_shutdown=5, log_level="info"), on_exit=gw.shutdown)
    try:
        await server.serve()
    finally:
        await gw.aclose()
        await bus.close()
        tracing.shutdown()
