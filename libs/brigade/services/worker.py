"""Prefill, decode and colocated workers: an Engine on the bus (wiring and I/O only).

- colocated: runs whole requests.
- decode: runs whole requests too (short prompts under conditional disaggregation, fallbacks), and
  continues requests handed off by prefill workers into blocks it reserved for them.
- prefill: computes the prompt and the first token, streams that token to the client, moves the KV
  pages into the decode worker's reserved blocks, hands the request over, frees its blocks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from dataclasses import asdict
from typing import Any

import torch
from prometheus_client import CollectorRegistry, start_http_server

from brigade import protocol as P
from brigade import tracing
from brigade.bus import Bus, BusError, heartbeat, publish_status
from brigade.config import WorkerConfig, parse_cpus, resolve_dtype
from brigade.engine.async_engine import AsyncEngine
from brigade.engine.engine import Engine, EngineConfig, InvalidRequest, RequestOutput
from brigade.engine.sampling import SamplingParams
from brigade.experts.remote import RemoteExperts
from brigade.kernels import native
from brigade.kernels.moe import MoEExecutor
from brigade.kv import transfer
from brigade.kv.pool import KvEvent
from brigade.model.resolve import resolve_model
from brigade.procs import stop_on_signals
from brigade.telemetry import TransferMetrics, engine_registry

log = logging.getLogger("brigade.worker")
CANCEL_MEMORY_S = 60.0  # a cancelled id is refused this long, so a late handoff cannot revive it
KV_EVENT_PERIOD_S = 0.02  # how often queued prefix-cache changes are published


class Worker:
    """One engine, its subscriptions, heartbeats and (for disaggregation) its KV transport."""

    def __init__(self, config: WorkerConfig, bus: Bus, engine: Engine,
                 registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.registry = registry or CollectorRegistry()  # served on /metrics with the engine's collector
        self.transfer_metrics = TransferMetrics(self.registry)
        self.bus = bus
        self.engine = engine
        self.id = config.worker_id
        self.aengine = AsyncEngine(engine, self._on_outputs, self._on_step_error)
        self.active: dict[str, P.GenerateRequest] = {}
        self.spans: dict[str, _Traced] = {}  # the span of every request this worker is serving
        self.cancelled: dict[str, float] = {}
        self.peers: dict[str, P.WorkerStatus] = {}  # other workers' last status (shm names for transfers)
        self.peer_seen: dict[str, float] = {}  # when each last beat (monotonic, our clock)
        self.leases: dict[str, str] = {}  # decode side: reserved for a handoff not yet arrived -> client inbox
        self.shm_name = ""
        self.receiver: Any = None  # decode side of the nats or nixl transport: expect/forget (and nixl's wait)
        self.sender: transfer.KvSender | None = None
        self.layout = transfer.KvLayout.of(engine.runner.cache, engine.pool.block_size)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.stopping = False
        self.served = 0
        # Prefix-cache changes, appended on the engine thread, published in numbered batches.
        self.kv_ops: list[list[Any]] = []
        self.kv_lock = threading.Lock()
        self.kv_event_id = -1
        engine.pool.on_event = self._on_kv_event

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        b = self.bus
        await b.subscribe(P.worker_generate(self.id), self._on_generate)
        await b.subscribe(P.CANCEL, self._on_cancel)
        await b.subscribe(P.HEARTBEAT, self._on_peer)
        await b.subscribe(P.worker_kv_dump(self.id), self._on_kv_dump)
        if self.config.role in ("decode", "colocated"):
            await b.subscribe(P.worker_allocate(self.id), self._on_allocate)
            await b.subscribe(P.worker_handoff(self.id), self._on_handoff)
            await b.subscribe(P.worker_release(self.id), self._on_release)
            if self.config.kv_transport == "nats":
                self.receiver = transfer.NatsReceiver()
                await self.receiver.start(b, self.id, self.engine.runner.cache, self.layout)
            elif self.config.kv_transport == "nixl":
                from brigade.kv.nixl import NixlReceiver, nixl_api

                nixl_api()  # a clear error naming the package, before anything else
                self.receiver = NixlReceiver()
                await self.receiver.start(self.id, self.engine.runner.cache, self.layout)
        if self.config.role == "prefill":
            self.sender = transfer.make_sender(self.config.kv_transport, b)
        self._spawn(self.aengine.run())
        self._spawn(heartbeat(self.bus, P.HEARTBEAT, self.status, self.config.heartbeat_s))
        self._spawn(self._kv_event_loop())
        await b.flush()
        await self._publish_status()  # routers learn about us at once, not after a period
        log.info("worker %s (%s) ready", self.id, self.config.role)

    async def stop(self) -> None:
        self.stopping = True
        await self._publish_status()
        self.aengine.stop()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.receiver is not None:
            await self.receiver.stop()
        if self.sender is not None:
            await self.sender.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ---- requests ----------------------------------------------------------------------------
    async def _on_generate(self, msg: Any) -> None:
        req = P.GenerateRequest.decode(msg.data)
        if req.request_id in self.cancelled:
            await self.bus.respond(msg, P.Accepted(req.request_id, error="request was cancelled", code=499))
            return
        try:
            params = SamplingParams.from_dict(req.params)
            self.engine.validate(req.prompt_ids, params, req.output_ids)
        except (InvalidRequest, ValueError) as e:
            await self.bus.respond(msg, P.Accepted(req.request_id, error=str(e), code=400))
            return
        # Accept now and queue the add: a step in progress (a long prefill takes seconds) must not hold up
        # the answer, or the router times out on a healthy worker.
        self.active[req.request_id] = req
        prefill_only = self.config.role == "prefill" and bool(req.decode_worker)
        self._trace(req.request_id, "prefill" if prefill_only else "generate", tracing.context_of(msg))
        await self.bus.respond(msg, P.Accepted(req.request_id, worker_id=self.id))
        self._spawn(self._add(req, params, prefill_only))

    async def _add(self, req: P.GenerateRequest, params: SamplingParams, prefill_only: bool) -> None:
        try:
            await self._compile(params)
            await self.aengine.call(self.engine.add_request, req.request_id, req.prompt_ids, params,
                                    req.output_ids, prefill_only, req.text_sent)
        except (InvalidRequest, ValueError) as e:
            self._end_trace(req.request_id, str(e))
            if self.active.pop(req.request_id, None) is not None:
                await self.bus.publish(req.reply_to, P.TokenChunk(req.request_id, [], "", "error", error=str(e),
                                                                  worker_id=self.id))

    async def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        """Stream one step's tokens: one TokenBatch per gateway (batch_to), a TokenChunk to any other sender."""
        batches: dict[str, list[P.TokenChunk]] = {}
        singles: list[tuple[str, P.TokenChunk]] = []
        handoffs: list[tuple[P.GenerateRequest, RequestOutput]] = []
        for out in outputs:
            req = self.active.get(out.request_id)
            if req is None:
                continue
            handoff = out.finish_reason == "handoff"
            # Numbered on the request itself, which a handoff or its fallback carries on: the next worker
            # continues from this seq.
            req.seq += 1
            chunk = P.TokenChunk(
                out.request_id, out.new_token_ids, out.new_text,
                None if handoff else out.finish_reason, out.stop_reason, out.num_prompt_tokens,
                out.num_output_tokens, out.num_cached_tokens, _logprobs(out), self.id, seq=req.seq)
            if req.batch_to:
                batches.setdefault(req.batch_to, []).append(chunk)
            else:
                singles.append((req.reply_to, chunk))
            traced = self.spans.get(out.request_id)
            if traced is not None:
                traced.on_output(out)
            if handoff:
                handoffs.append((req, out))
            elif out.finished:
                del self.active[out.request_id]
                self.served += 1
                self._end_trace(out.request_id)
        for subject, chunk in singles:
            await self.bus.publish(subject, chunk)
        for subject, chunks in batches.items():
            await self._publish_batch(subject, chunks)
        # After the publishes: the first token is on the wire before its handoff (and the decode worker's tokens).
        for req, out in handoffs:
            self._spawn(self._handoff(req, out))

    async def _publish_batch(self, subject: str, chunks: list[P.TokenChunk]) -> None:
        """One TokenBatch, or halves of it in order while it exceeds the bus's max payload."""
        data = P.TokenBatch(chunks).encode()
        if len(data) > self.bus.max_payload and len(chunks) > 1:
            half = len(chunks) // 2
            await self._publish_batch(subject, chunks[:half])
            await self._publish_batch(subject, chunks[half:])
            return
        await self.bus.publish(subject, data)

    async def _on_step_error(self, error: BaseException) -> None:
        """A step raised: fail every request this worker holds rather than leave clients hanging."""
        for rid, req in list(self.active.items()):
            await self.bus.publish(req.reply_to, P.TokenChunk(rid, [], "", "error", error=f"worker error: {error}",
                                                              worker_id=self.id))
            await self.aengine.call(self.engine.abort, rid)
            del self.active[rid]
            self._end_trace(rid, f"worker error: {error}")

    async def _on_cancel(self, msg: Any) -> None:
        rid = P.Cancel.decode(msg.data).request_id
        now = time.monotonic()
        self.cancelled[rid] = now
        for old in [k for k, t in self.cancelled.items() if now - t > CANCEL_MEMORY_S]:
            del self.cancelled[old]
        self.leases.pop(rid, None)
        self.active.pop(rid, None)
        traced = self.spans.get(rid)
        if traced is not None:
            traced.span.add_event("cancelled")
            self._end_trace(rid)
        if self.receiver is not None:
            self.receiver.forget(rid)
        # Always queue the abort: engine calls run in order, so one still queued for this request (a
        # reservation, an add) is undone too, even though the engine does not know the id yet.
        await self.aengine.call(self.engine.abort, rid)

    # ---- disaggregation: prefill side --------------------------------------------------------
    async def _handoff(self, req: P.GenerateRequest, first: RequestOutput) -> None:
        """Move the prompt's KV to the decode worker and hand the request over; fall back on failure."""
        rid, dest = req.request_id, str(req.decode_worker)
        timeout = self.config.lease_s / 2
        traced = self.spans.get(rid)
        parent = traced.span if traced is not None else None
        span = tracing.start("kv_transfer", parent, attributes={
            tracing.REQUEST_ID: rid, tracing.TRANSPORT: self.config.kv_transport, tracing.DECODE_WORKER: dest})
        error: str | None = None
        allocated = False
        try:
            held = self.engine.held.get(rid)
            if held is None or rid in self.cancelled:
                return
            computed = held.num_computed  # the prompt, and the tokens a replayed request had generated
            alloc = P.Allocation.decode(await self.bus.request(
                P.worker_allocate(dest), P.Allocate(rid, computed, self.config.lease_s, req.reply_to),
                timeout=timeout, headers=tracing.headers(span)))
            if alloc.error:
                raise transfer.TransferError(f"decode worker {dest} refused allocation: {alloc.error}")
            allocated = True
            if alloc.status:
                self._on_status(P.WorkerStatus.from_dict(alloc.status))
            src = list(held.block_ids[:len(alloc.block_ids)])
            peer = self._peer(dest)
            assert self.sender is not None
            t0 = time.perf_counter()
            await self.sender.send(rid, self.engine.runner.cache, src, peer, alloc.block_ids)
            seconds = time.perf_counter() - t0
            nbytes = len(src) * self.layout.bytes_per_block
            self.transfer_metrics.observe(self.config.kv_transport, len(src), nbytes, seconds)
            span.set_attributes({tracing.TRANSFER_BLOCKS: len(src), tracing.TRANSFER_BYTES: nbytes,
                                 tracing.TRANSFER_SECONDS: seconds})
            span.end()
            handoff = P.Handoff(asdict(req), first.new_token_ids[0], alloc.block_ids, first.num_cached_tokens,
                                text_sent=len(first.new_text))
            ack = P.Ack.decode(await self.bus.request(P.worker_handoff(dest), handoff, timeout=timeout,
                                                      headers=tracing.headers(parent) if parent else None))
            if not ack.ok:
                raise transfer.TransferError(f"handoff refused by {dest}: {ack.error}")
        except (BusError, transfer.TransferError, P.ProtocolError, KeyError) as e:
            log.warning("handoff of %s to %s failed (%s); falling back to local prefill there", rid, dest, e)
            self.transfer_metrics.failures.labels(self.config.kv_transport).inc()
            tracing.fail(span, str(e))
            error = f"handoff failed: {e}"
            if allocated:  # best effort: a live decode worker frees the blocks now rather than at its lease's end
                try:
                    await self.bus.publish(P.worker_release(dest), P.Release(rid))
                except Exception as release_error:  # a closed bus: the lease frees them
                    log.debug("release of %s on %s failed: %s", rid, dest, release_error)
        finally:
            if span.is_recording():  # not ended yet: the transfer failed or never started
                span.end()
            self.active.pop(rid, None)
            self._end_trace(rid, error)
            await self.aengine.call(self.engine.release, rid)
        if error is not None:  # after the release: the fallback may be this worker, under the same request id
            await self._fallback(req, first)

    def _fallback_targets(self, failed: str) -> list[str]:
        """Live decode workers, least loaded first, the one that just failed last; then this worker."""
        now = time.monotonic()
        live = [st for w, st in self.peers.items() if st.role in ("decode", "colocated") and not st.stopping
                and now - self.peer_seen.get(w, 0.0) < 3 * self.config.heartbeat_s]
        live.sort(key=lambda st: (st.worker_id == failed, st.running + st.waiting, st.kv_used / max(st.kv_total, 1)))
        return [st.worker_id for st in live] + [self.id]

    async def _fallback(self, req: P.GenerateRequest, first: RequestOutput) -> None:
        """Resend the request (with its first token) to a live decode worker, which prefills it itself."""
        if req.request_id in self.cancelled:
            return
        resume = P.GenerateRequest(**{**asdict(req), "output_ids": list(first.new_token_ids),
                                      "text_sent": len(first.new_text), "decode_worker": None})
        traced = self.spans.get(req.request_id)
        headers = tracing.headers(traced.span) if traced is not None else None
        for target in self._fallback_targets(str(req.decode_worker)):
            try:
                acc = P.Accepted.decode(await self.bus.request(P.worker_generate(target), resume, timeout=2.0,
                                                               headers=headers))
            except BusError:
                continue
            if not acc.error:
                return
        await self.bus.publish(req.reply_to, P.TokenChunk(req.request_id, [], "", "error",
                                                          error="KV handoff failed and no worker took the request",
                                                          worker_id=self.id))

    def _peer(self, worker_id: str) -> transfer.PeerInfo:
        status = self.peers.get(worker_id)
        if status is None:
            raise transfer.TransferError(f"no status seen from decode worker {worker_id}")
        if self.config.kv_transport == "shm" and status.host != socket.gethostname():
            raise transfer.TransferError(f"{worker_id} is on another host; shm transport needs the same host")
        if not status.kv_layout:
            raise transfer.TransferError(f"{worker_id} advertises no KV layout")
        return transfer.PeerInfo(worker_id, status.shm_name, transfer.KvLayout.from_dict(status.kv_layout), status.host,
                                 nixl=status.nixl or None)

    # ---- disaggregation: decode side ---------------------------------------------------------
    async def _on_allocate(self, msg: Any) -> None:
        a = P.Allocate.decode(msg.data)
        if a.request_id in self.cancelled:
            await self.bus.respond(msg, P.Allocation(a.request_id, error="request was cancelled"))
            return
        blocks = await self.aengine.call(self.engine.reserve, a.request_id, a.num_tokens, a.lease_s)
        if blocks is not None and a.request_id in self.cancelled:  # cancelled while we reserved
            await self.aengine.call(self.engine.unreserve, a.request_id)
            blocks = None
        if blocks is None:
            await self.bus.respond(msg, P.Allocation(a.request_id, error="no free KV blocks"))
            return
        if self.receiver is not None:
            self.receiver.expect(a.request_id, blocks)
        # A sender that dies never hands off: once the lease is over, forget the request and tell its client.
        self.leases[a.request_id] = a.reply_to
        asyncio.get_running_loop().call_later(a.lease_s + 0.5, self._lease_over, a.request_id)
        await self.bus.respond(msg, P.Allocation(a.request_id, blocks, status=asdict(self.status())))

    def _lease_over(self, rid: str) -> None:
        reply_to = self.leases.pop(rid, None)
        if reply_to is None:
            return  # handed off, released or cancelled in time
        if self.receiver is not None:
            self.receiver.forget(rid)
        log.warning("no handoff of %s within its lease: its prefill worker is gone; blocks freed", rid)
        if reply_to and rid not in self.cancelled:
            self._spawn(self.bus.publish(reply_to, P.TokenChunk(
                rid, [], "", "error", error="the prefill worker stopped while handing the request over (KV lease "
                "expired)", worker_id=self.id, retry=True)))

    async def _on_release(self, msg: Any) -> None:
        rid = P.Release.decode(msg.data).request_id
        if self.leases.pop(rid, None) is None:
            return
        if self.receiver is not None:
            self.receiver.forget(rid)
        await self.aengine.call(self.engine.unreserve, rid)

    async def _on_handoff(self, msg: Any) -> None:
        h = P.Handoff.decode(msg.data)
        req = P.GenerateRequest.from_dict(h.request)
        rid = req.request_id
        self.leases.pop(rid, None)  # arrived: whatever happens now, the prefill worker hears of it in the Ack
        if self.receiver is not None:
            # nixl: the sender saw its WRITE complete; its notification (sent after the data) is the receiving
            # side's own proof that every block is in. nats acks every chunk, so it is complete already.
            waiting = getattr(self.receiver, "wait", None)
            if waiting is not None and not await waiting(rid, self.config.lease_s / 2):
                self.receiver.forget(rid)
                await self.aengine.call(self.engine.unreserve, rid)
                await self.bus.respond(msg, P.Ack(False, "KV notification did not arrive"))
                return
            self.receiver.forget(rid)
        if rid in self.cancelled:
            await self.aengine.call(self.engine.abort, rid)
            await self.bus.respond(msg, P.Ack(False, "request was cancelled"))
            return
        # Active before the add: the engine thread steps right after it, and that step's outputs can reach
        # _on_outputs before this coroutine resumes; they would be dropped as an unknown request's.
        self.active[rid] = req
        try:
            params = SamplingParams.from_dict(req.params)
            await self._compile(params)
            await self.aengine.call(self.engine.add_prefilled, rid, req.prompt_ids, h.first_token, params, h.num_cached,
                                    h.text_sent, req.output_ids, req.text_sent)
        except (InvalidRequest, ValueError) as e:
            self.active.pop(rid, None)
            await self.aengine.call(self.engine.abort, rid)
            await self.bus.respond(msg, P.Ack(False, str(e)))
            return
        self._trace(rid, "decode", tracing.context_of(msg))
        await self.bus.respond(msg, P.Ack(True))

    async def _compile(self, params: SamplingParams) -> None:
        """Compile a constrained request's grammar (or find it cached) in a thread: neither the event loop nor
        the engine thread waits for a new schema."""
        if params.structured is not None:
            await asyncio.to_thread(self.engine.grammars.prepare, *params.structured)

    # ---- tracing -----------------------------------------------------------------------------
    def _trace(self, rid: str, name: str, parent: Any) -> None:
        span = tracing.start(name, parent, tracing.SpanKind.SERVER, {
            tracing.REQUEST_ID: rid, tracing.WORKER: self.id, tracing.ROLE: self.config.role})
        self.spans[rid] = _Traced(span, ttft=name != "decode")  # decode continues after the first token

    def step_span(self) -> tracing.Span | None:
        """Engine thread: the span of the first traced request in the step in progress (MoE dispatches join it)."""
        for seq in self.engine.current:
            traced = self.spans.get(seq.request_id)
            if traced is not None:
                return traced.span
        return None

    def _end_trace(self, rid: str, error: str | None = None) -> None:
        traced = self.spans.pop(rid, None)
        if traced is None:
            return
        if error:
            tracing.fail(traced.span, error)
        traced.span.set_attribute(tracing.LATENCY_E2E, time.monotonic() - traced.start)
        traced.span.end()

    # ---- prefix-cache events for the routers ----------------------------------------------------
    def _on_kv_event(self, ev: KvEvent) -> None:
        """Engine thread: queue one change, merging runs (a chain of stored blocks is one op)."""
        with self.kv_lock:
            last = self.kv_ops[-1] if self.kv_ops else None
            if last is not None and last[0] == ev.kind == "stored" and ev.parent_hash == last[1][-1]:
                last[1].extend(ev.block_hashes)
            elif last is not None and last[0] == ev.kind == "removed":
                last[1].extend(ev.block_hashes)
            else:
                self.kv_ops.append([ev.kind, list(ev.block_hashes), ev.parent_hash])

    def _take_kv_ops(self) -> tuple[int, list[list[Any]]]:
        """Swap out the queued ops and number them as the next batch ((-1, []) when there are none)."""
        with self.kv_lock:
            ops, self.kv_ops = self.kv_ops, []
            if not ops:
                return self.kv_event_id, []
            self.kv_event_id += 1
            return self.kv_event_id, ops

    async def _kv_event_loop(self) -> None:
        while True:
            await asyncio.sleep(KV_EVENT_PERIOD_S)
            event_id, ops = self._take_kv_ops()
            if ops:
                await self.bus.publish(P.KV_EVENTS, P.KvEvents(self.id, event_id, ops))

    async def _on_kv_dump(self, msg: Any) -> None:
        """Every cached hash, as of our last numbered batch.

        Taken on the engine thread between steps. Changes queued but not yet published are already in
        the snapshot; the batch that carries them later re-applies them, which is harmless (set adds and
        removes replayed onto their own result give the same set).
        """

        def snapshot() -> tuple[int, list[int]]:
            with self.kv_lock:
                event_id = self.kv_event_id
            return event_id, list(self.engine.pool.by_hash)

        event_id, hashes = await self.aengine.call(snapshot)
        await self.bus.respond(msg, P.KvDump(self.id, event_id, hashes, self.config.block_size, self.config.hash_seed))

    # ---- status ------------------------------------------------------------------------------
    async def _on_peer(self, msg: Any) -> None:
        self._on_status(P.WorkerStatus.decode(msg.data))

    def _on_status(self, status: P.WorkerStatus) -> None:
        """A peer's heartbeat, or the status a decode worker put in its Allocation."""
        if status.worker_id != self.id:
            self.peers[status.worker_id] = status
            self.peer_seen[status.worker_id] = time.monotonic()

    def status(self) -> P.WorkerStatus:
        e = self.engine
        queued = sum(s.num_tokens - s.num_computed for s in e.scheduler.waiting)
        transports = [self.config.kv_transport] if self.config.role in ("decode", "colocated") else []
        return P.WorkerStatus(
            self.id, self.config.role, e.model.cfg.name, self.config.block_size, self.config.hash_seed,
            running=len(e.scheduler.running), waiting=len(e.scheduler.waiting), kv_used=e.pool.num_used,
            kv_total=e.pool.num_blocks, prefill_queued=queued, served=self.served,
            prefix_queries=e.pool.stats.prefix_queries, prefix_hits=e.pool.stats.prefix_hits,
            preemptions=e.pool.stats.preemptions, kv_transfer_bytes=self.transfer_metrics.total_bytes,
            transports=transports,
            host=socket.gethostname(), shm_name=self.shm_name, kv_layout=self.layout.to_dict(), time=time.time(),
            stopping=self.stopping, nixl=self.receiver.peer().to_dict() if hasattr(self.receiver, "peer") else {})

    async def _publish_status(self) -> None:
        await publish_status(self.bus, P.HEARTBEAT, self.status())


class _Traced:
    """A request's span on this worker and what it records as outputs arrive."""

    __slots__ = ("span", "start", "first")

    def __init__(self, span: tracing.Span, ttft: bool = True) -> None:
        self.span = span
        self.start = time.monotonic()
        self.first = ttft

    def on_output(self, out: RequestOutput) -> None:
        if self.first:
            self.first = False
            self.span.set_attributes({
                tracing.LATENCY_TTFT: time.monotonic() - self.start, tracing.LATENCY_QUEUE: out.time_in_queue,
                tracing.CACHED_TOKENS: out.num_cached_tokens, tracing.USAGE_PROMPT_TOKENS: out.num_prompt_tokens})
        if out.finished:
            self.span.set_attributes({tracing.USAGE_COMPLETION_TOKENS: out.num_output_tokens,
                                      "gen_ai.response.finish_reasons": [out.finish_reason or ""]})


def _logprobs(out: RequestOutput) -> list[Any] | None:
    if out.logprobs is None:
        return None
    return [[s.token_id, s.logprob, [list(p) for p in (s.top_logprobs or [])]] for s in out.logprobs]


def pin(config: WorkerConfig) -> int:
    """Pin to config.cpus (if set) and return the torch thread count: the cores this process owns."""
    if config.cpus:
        os.sched_setaffinity(0, parse_cpus(config.cpus))
    return config.threads or len(os.sched_getaffinity(0))


def build_engine(config: WorkerConfig, threads: int, experts: MoEExecutor | None = None) -> tuple[Engine, Any]:
    """The engine, with its KV cache in shared memory when prefill workers write into it; `experts`: remote MoE."""
    shm = None
    allocate = None
    if config.role in ("decode", "colocated") and config.kv_transport == "shm":
        def allocate(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            nonlocal shm
            tensor, shm = transfer.shared_cache(None, shape, dtype, create=True)
            return tensor
    model = resolve_model(config.model)
    ec = EngineConfig(
        model=str(model), dtype=resolve_dtype(model, config.dtype), block_size=config.block_size,
        num_blocks=config.num_blocks or None,
        kv_cache_bytes=config.kv_cache_bytes, max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens, long_prefill_tokens=config.long_prefill_tokens,
        chunked_prefill=config.chunked_prefill,
        prefix_caching=config.prefix_caching, max_model_len=config.max_model_len or None,
        attention=config.attention, device=config.device, threads=threads, hash_seed=config.hash_seed)
    engine = Engine(ec, allocate_cache=allocate, experts=experts)
    # This (loading) thread's OpenMP pool would make libgomp throttle the engine thread's: see release_omp_threads.
    native.release_omp_threads()
    return engine, shm


async def serve(config: WorkerConfig) -> None:
    """Run one worker until SIGINT/SIGTERM."""
    threads = pin(config)
    torch.set_num_threads(threads)
    tracing.setup(config.role, config.worker_id)
    bus = await Bus.connect(config.nats, f"worker-{config.worker_id}")
    experts = None
    if config.experts:  # MoE experts on `brigade experts` shards, found through their heartbeats
        experts = await RemoteExperts.create(bus, str(resolve_model(config.model)), config.experts_timeout,
                                             config.experts_direct)
    engine, shm = await asyncio.to_thread(build_engine, config, threads, experts)
    registry = engine_registry(engine, engine.model.cfg.name, config.worker_id,
                               experts.registry if experts is not None else None)
    worker = Worker(config, bus, engine, registry)
    if experts is not None and tracing.enabled():
        experts.trace_parent = worker.step_span
    if config.metrics_port:
        start_http_server(config.metrics_port, registry=registry)
    if shm is not None:
        worker.shm_name = shm.name
    stop = stop_on_signals()
    await worker.start()
    await worker.aengine.call(torch.set_num_threads, threads)  # the engine thread's own OpenMP setting
    try:
        await stop.wait()
    finally:
        await worker.stop()
        if experts is not None:
            await experts.stop()
        await bus.close()
        if shm is not None:
            shm.close()  # the owner's close also unlinks the segment
        tracing.shutdown()
