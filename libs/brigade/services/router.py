"""The router (maître d'): tracks live workers and their cached prefixes, picks where each request runs."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

from nats.errors import NoRespondersError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from brigade import protocol as P
from brigade import tracing
from brigade.bus import Bus, BusError
from brigade.config import RouterConfig
from brigade.kv.hashing import hash_blocks
from brigade.procs import stop_on_signals
from brigade.routing.fleet import Fleet
from brigade.routing.index import PrefixIndex
from brigade.routing.policy import Policy, PrefixCost, decide

log = logging.getLogger("brigade.router")
MAX_ATTEMPTS = 3
MAX_ROUTING = 1024  # requests being placed at once; beyond that a 503 at once rather than an unbounded backlog
BUS_PROBE_S = 1.0  # a round trip to the server this slow means the bus stalled, not the workers


class RouterMetrics:
    """brigade:router_* series on the router's own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.decision = Histogram("brigade:router_decision_seconds", "Time to pick a worker", registry=r,
                                  buckets=(1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2))
        self.prompt_tokens = Counter("brigade:router_prompt_tokens", "Prompt tokens routed", ["worker"], registry=r)
        self.hit_tokens = Counter("brigade:router_prefix_hit_tokens", "Prompt tokens routed to a worker holding them",
                                  ["worker"], registry=r)
        self.gaps = Counter("brigade:router_kv_event_gaps", "KV event sequences with lost events", registry=r)
        self.recoveries = Counter("brigade:router_kv_dump_recoveries", "Registry resyncs from a worker dump",
                                  registry=r)
        self.registry_blocks = Gauge("brigade:router_registry_blocks", "Block hashes in the prefix registry",
                                     registry=r)
        self.workers = Gauge("brigade:router_workers", "Live workers", ["role"], registry=r)
        self.refused = Counter("brigade:router_workers_refused", "Workers refused (block size / hash seed)",
                               registry=r)


class Router:
    """Subscribes to heartbeats, KV events and generate requests; one decision per request."""

    def __init__(self, config: RouterConfig, bus: Bus) -> None:
        self.config = config
        self.bus = bus
        self.fleet = Fleet(config.heartbeat_timeout)
        self.index = PrefixIndex(capacity=config.registry_capacity)
        self.policy = Policy(config.policy, PrefixCost(config.block_size, config.prefill_weight, config.temperature))
        self.metrics = RouterMetrics()
        self.refused: set[str] = set()
        self.dumping: set[str] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.routing: set[asyncio.Task[Any]] = set()  # requests being placed

    async def start(self) -> None:
        await self.bus.subscribe(P.HEARTBEAT, self._on_status)
        await self.bus.subscribe(P.KV_EVENTS, self._on_kv_events)
        # A queue group: several routers share the requests; every router sees every event.
        await self.bus.subscribe(P.ROUTER_GENERATE, self._on_generate, queue="routers")
        self._spawn(self._purge_loop())
        await self.bus.flush()

    async def stop(self) -> None:
        for t in [*self.tasks, *self.routing]:
            t.cancel()
        await asyncio.gather(*self.tasks, *self.routing, return_exceptions=True)

    # ---- workers ------------------------------------------------------------------------------
    async def _on_status(self, msg: Any) -> None:
        st = P.WorkerStatus.decode(msg.data)
        if st.block_size != self.config.block_size or st.hash_seed != self.config.hash_seed:
            if st.worker_id not in self.refused:
                self.refused.add(st.worker_id)
                self.metrics.refused.inc()
                log.error("refusing worker %s: block size %d / hash seed %d, router expects %d / %d",
                          st.worker_id, st.block_size, st.hash_seed, self.config.block_size, self.config.hash_seed)
            return
        self.fleet.update(st, time.monotonic())
        if st.stopping:
            self.index.purge(st.worker_id)
        elif self.index.needs_dump(st.worker_id):
            self._request_dump(st.worker_id)  # a worker we have no registry for (new, or we restarted)

    async def _on_kv_events(self, msg: Any) -> None:
        ev = P.KvEvents.decode(msg.data)
        if ev.worker_id in self.refused:
            return
        gaps = self.index.events[ev.worker_id].gaps if ev.worker_id in self.index.events else 0
        if not self.index.apply(ev.worker_id, ev.event_id, ev.ops):
            if ev.worker_id in self.index.events and self.index.events[ev.worker_id].gaps > gaps:
                self.metrics.gaps.inc()
                log.warning("lost KV events from %s (now at %d); asking for a dump", ev.worker_id, ev.event_id)
            self._request_dump(ev.worker_id)
        self.metrics.registry_blocks.set(len(self.index))

    def _request_dump(self, worker: str) -> None:
        if worker in self.dumping:
            return
        self.dumping.add(worker)
        self._spawn(self._dump(worker))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _dump(self, worker: str) -> None:
        try:
            data = await self.bus.request(P.worker_kv_dump(worker), P.KvDumpRequest(worker), timeout=5.0)
            dump = P.KvDump.decode(data)
            self.index.load_dump(worker, dump.event_id, dump.hashes)
            self.metrics.recoveries.inc()
            self.metrics.registry_blocks.set(len(self.index))
            log.info("registry synced from %s: %d blocks as of event %d", worker, len(dump.hashes), dump.event_id)
        except (BusError, P.ProtocolError) as e:
            log.warning("KV dump from %s failed: %s", worker, e)
        finally:
            self.dumping.discard(worker)

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_timeout / 3)
            if not await self.bus.alive(BUS_PROBE_S):
                continue  # the bus stalled: silence says nothing about the workers
            for w in self.fleet.purge(time.monotonic()):
                self.index.purge(w)
                log.warning("worker %s missed its heartbeats; no longer routed to", w)
            for role in ("prefill", "decode", "colocated"):
                self.metrics.workers.labels(role).set(len(self.fleet.live((role,), time.monotonic())))

    # ---- requests -----------------------------------------------------------------------------
    def _hashes(self, prompt_ids: list[int]) -> list[int]:
        """The prompt's block hashes as workers compute them (model name as the extra, same seed)."""
        if self.policy.name != "prefix" or not self.fleet.workers:
            return []
        model = next(iter(self.fleet.workers.values())).status.model
        return hash_blocks(prompt_ids, self.config.block_size, extra=model.encode(), seed=self.config.hash_seed)

    async def _on_generate(self, msg: Any) -> None:
        """Place each request in a task of its own: NATS runs a subscription's callbacks one at a time, and one
        slow or stuck worker's reply must not hold up every other request's routing."""
        if len(self.routing) >= MAX_ROUTING:
            req = P.GenerateRequest.decode(msg.data)
            await self.bus.respond(msg, P.Accepted(req.request_id, error="router overloaded", code=503))
            return
        task = asyncio.ensure_future(self._place(msg))
        self.routing.add(task)
        task.add_done_callback(self.routing.discard)

    async def _place(self, msg: Any) -> None:
        req = P.GenerateRequest.decode(msg.data)
        span = tracing.start("route", tracing.context_of(msg), tracing.SpanKind.SERVER, {
            tracing.REQUEST_ID: req.request_id, tracing.POLICY: self.policy.name,
            tracing.USAGE_PROMPT_TOKENS: len(req.prompt_ids)})
        try:
            reply = await self._route(req, span)
        finally:
            span.end()
        await self.bus.respond(msg, reply)

    def _suspect(self, now: float, failed: set[str]) -> set[str]:
        """Workers whose heartbeats are late (stopped, swapping, stuck): avoided while others beat on time.
        When all are late it is the bus, not them: then none is avoided."""
        late = {w for w, st in self.fleet.workers.items() if now - st.last_seen > self.config.suspect_after}
        return late if set(self.fleet.workers) - late - failed else set()

    async def _route(self, req: P.GenerateRequest, span: tracing.Span) -> P.Accepted | bytes:
        """Forward `req` to the best worker that takes it (up to MAX_ATTEMPTS); its Accepted, or a 503."""
        failed: set[str] = set()
        prompt = req.prompt_ids + req.output_ids
        bs = self.config.block_size
        # Inside the gateway's own route timeout, so a retry on another worker still reaches the client.
        deadline = time.monotonic() + self.config.route_deadline
        for _ in range(MAX_ATTEMPTS):
            t0 = time.perf_counter()
            now = time.monotonic()
            if now >= deadline:
                break
            hashes = self._hashes(prompt)
            d = decide(self.fleet, self.policy, len(prompt), self.config.disagg_threshold, now,
                       failed | self._suspect(now, failed), hashes, self.index)
            self.metrics.decision.observe(time.perf_counter() - t0)
            if d is None:
                break
            uncached = max(len(prompt) - d.cached_blocks * bs, 0)
            self.fleet.book(d.worker, uncached, -(-uncached // bs))
            if d.decode:
                self.fleet.book(d.decode, 0, -(-len(prompt) // bs))
            if hashes:
                self.index.remember(hashes, d.worker, self.config.recent_ttl)
            self.metrics.prompt_tokens.labels(d.worker).inc(len(prompt))
            cached = min(d.cached_blocks * bs, len(prompt))
            self.metrics.hit_tokens.labels(d.worker).inc(cached)
            fwd = replace(req, decode_worker=d.decode)
            span.set_attributes({tracing.WORKER: d.worker, tracing.CACHED_TOKENS: cached,
                                 **({tracing.DECODE_WORKER: d.decode} if d.decode else {})})
            try:
                timeout = min(self.config.forward_timeout, max(deadline - time.monotonic(), 0.05))
                reply = await self.bus.request(P.worker_generate(d.worker), fwd, timeout=timeout,
                                               headers=tracing.headers(span))
            except BusError as e:
                span.add_event("worker_refused", {tracing.WORKER: d.worker, "error": str(e)})
                log.warning("worker %s did not take %s: %s", d.worker, req.request_id, e)
                failed.add(d.worker)
                if isinstance(e.__cause__, NoRespondersError):  # gone, not just slow: stop routing there now
                    self.fleet.remove(d.worker)
                    self.index.purge(d.worker)
                continue
            return reply
        tracing.fail(span, "no worker available")
        return P.Accepted(req.request_id, error="no worker available", code=503)


async def serve(config: RouterConfig) -> None:
    tracing.setup("router")
    bus = await Bus.connect(config.nats, "router")
    router = Router(config, bus)
    if config.metrics_port:
        start_http_server(config.metrics_port, registry=router.metrics.registry)
    stop = stop_on_signals()
    await router.start()
    log.info("router ready (policy %s)", config.policy)
    try:
        await stop.wait()
    finally:
        await router.stop()
        await bus.close()
        tracing.shutdown()
