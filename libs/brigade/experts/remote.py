"""`RemoteExperts`: the worker-side `MoEExecutor` that runs a layer's experts on `brigade experts` shards.

The model forward runs on the engine thread. Per layer the executor plans there (group tokens by shard,
encode), then exchanges with every shard at once: shards on this host over their Unix sockets, straight
from the engine thread (experts/channel.py, the data plane: no bus hop, no event-loop wake-up); others
over the bus, handed to the worker's event loop (`run_coroutine_threadsafe`). It waits with a timeout,
then decodes and sums on the engine thread.
A shard that does not answer raises `ExpertsError`, which fails the step (the worker fails its requests);
the failed shard leaves the live placement until its next heartbeat, so a restarted or replacement shard is
used again as soon as it announces itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter

from brigade import protocol as P
from brigade import tracing
from brigade.bus import Bus, BusError
from brigade.experts import dispatch
from brigade.experts.channel import ChannelClient, ChannelError
from brigade.experts.placement import LivePlacement
from brigade.experts.shard import TOKENS_METRIC
from brigade.model.config import ModelConfig, ModelError, load_config

log = logging.getLogger("brigade.experts")


class ExpertsError(RuntimeError):
    """Remote experts failed: a shard did not answer in time, answered an error, or no live shard holds an expert."""


@dataclass
class DispatchStats:
    """Totals since the last `reset`, for benchmarks: bus bytes both ways, time, shard compute time."""

    calls: int = 0  # layer dispatches (all shards of one layer of one step)
    tokens: int = 0  # tokens entering those layers
    messages: int = 0  # requests sent (a shard's chunks each count)
    direct: int = 0  # of those, sent over a shard's Unix socket rather than the bus
    bytes_out: int = 0  # request payloads
    bytes_in: int = 0  # reply payloads
    wall_s: float = 0.0  # time inside the executor
    compute_s: float = 0.0  # per call, the slowest shard's expert compute (shards run concurrently)


class RemoteExperts:
    """MoEExecutor over the bus. Call `start` on the event loop before the first forward."""

    def __init__(self, bus: Bus, loop: asyncio.AbstractEventLoop, cfg: ModelConfig, timeout: float = 5.0,
                 heartbeat_timeout: float = 3.0, registry: CollectorRegistry | None = None,
                 direct: bool = True) -> None:
        self.bus = bus
        self.loop = loop
        self.cfg = cfg
        self.timeout = timeout
        self.placement = LivePlacement(cfg.num_layers, cfg.num_experts, heartbeat_timeout)
        self.stats = DispatchStats()
        self._rr = [[0] * cfg.num_experts for _ in range(cfg.num_layers)]  # replica round-robin offsets
        self._changed = asyncio.Event()
        self._loop_thread: int | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._ignored: set[str] = set()
        # Shards on this host (when `direct`) are recorded with their Unix socket; the rest go over the bus.
        self.direct = direct
        self._host = socket.gethostname()
        self._channel = ChannelClient()
        self.registry = registry or CollectorRegistry()
        tokens = Counter(TOKENS_METRIC, "Token assignments routed, per MoE layer and expert", ["layer", "expert"],
                         registry=self.registry)
        self._tokens = [[tokens.labels(str(i), str(e)) for e in range(cfg.num_experts)]
                        for i in range(cfg.num_layers)]
        self._bytes = Counter("brigade:expert_dispatch_bytes", "Payload bytes of expert dispatch and combine",
                              ["direction"], registry=self.registry)
        self._errors = Counter("brigade:expert_dispatch_errors", "Expert dispatches that failed", ["shard"],
                               registry=self.registry)
        # With tracing on, the worker sets this: the span (of one request in the step) that dispatches join.
        self.trace_parent: Callable[[], tracing.Span | None] | None = None

    @classmethod
    async def create(cls, bus: Bus, model_dir: str, timeout: float = 5.0, direct: bool = True) -> RemoteExperts:
        """For the MoE model in `model_dir`, on the running loop, already listening to shard heartbeats."""
        cfg = load_config(model_dir)
        if not cfg.is_moe:
            raise ModelError(f"{cfg.name} has no experts: remote experts need a mixture-of-experts model")
        experts = cls(bus, asyncio.get_running_loop(), cfg, timeout, direct=direct)
        await experts.start()
        return experts

    def reset_stats(self) -> None:
        self.stats = DispatchStats()

    # ---- event loop side -----------------------------------------------------------------------
    async def start(self) -> None:
        """Listen to shard heartbeats (the published placement)."""
        self._loop_thread = threading.get_ident()
        await self.bus.subscribe(P.EXPERTS_HEARTBEAT, self._on_status)
        self._tasks.append(asyncio.ensure_future(self._purge_loop()))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def wait_ready(self, timeout: float) -> bool:
        """Wait until every expert of every layer has a live shard; False on timeout."""
        deadline = self.loop.time() + timeout
        for layer in range(self.cfg.num_layers):
            if not await self._wait_covered(layer, deadline):
                return False
        return True

    async def _on_status(self, msg: Any) -> None:
        st = P.ExpertsStatus.decode(msg.data)
        if (st.model, st.num_experts, st.hidden_size) != (self.cfg.name, self.cfg.num_experts, self.cfg.hidden_size):
            if st.shard_id not in self._ignored:
                self._ignored.add(st.shard_id)
                log.warning("ignoring experts shard %s: it serves %s (%d experts, hidden %d), not %s",
                            st.shard_id, st.model, st.num_experts, st.hidden_size, self.cfg.name)
            return
        if st.stopping:
            changed = self.placement.remove(st.shard_id)
        else:
            near = self.direct and st.socket and st.host == self._host and os.path.exists(st.socket)
            changed = self.placement.update(st.shard_id, st.experts, time.monotonic(), st.socket if near else "")
        if changed:
            log.info("experts placement changed: live shards %s", self.placement.shards())
            self._notify()

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(self.placement.timeout / 3)
            for shard in self.placement.purge(time.monotonic()):
                log.warning("experts shard %s missed its heartbeats", shard)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_covered(self, layer: int, deadline: float) -> bool:
        while self.placement.missing(layer):
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), max(0.0, deadline - self.loop.time()))
            except TimeoutError:
                return not self.placement.missing(layer)
        return True

    async def _exchange(self, layer: int, requests: list[tuple[str, list[bytes]]],
                        headers: dict[str, str] | None = None) -> list[list[bytes]]:
        """Send every shard's chunks at once; the replies in order, or ExpertsError on the first failure."""
        tasks = [asyncio.ensure_future(self._ask(layer, shard, data, headers))
                 for shard, chunks in requests for data in chunks]
        try:
            replies = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            raise
        out, i = [], 0
        for _, chunks in requests:
            out.append(replies[i:i + len(chunks)])
            i += len(chunks)
        return out

    async def _ask(self, layer: int, shard: str, data: bytes, headers: dict[str, str] | None) -> bytes:
        try:
            return await self.bus.request(P.experts_dispatch(shard), data, timeout=self.timeout, headers=headers)
        except BusError as e:
            self._failed(shard)
            raise ExpertsError(f"experts shard {shard} failed on layer {layer}: {e}") from e

    def _failed(self, shard: str) -> None:
        """Count a shard's failure and drop it from the placement until its next heartbeat (a replica, if any,
        takes over). Any thread."""
        self._errors.labels(shard).inc()
        if self.placement.remove(shard):
            self.loop.call_soon_threadsafe(self._notify)

    # ---- engine thread side -------------------------------------------------------------------
    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if threading.get_ident() == self._loop_thread:
            raise ExpertsError("RemoteExperts must run off the event loop thread (it waits for the loop)")
        t0 = time.perf_counter()
        ids, weights = ids.cpu(), weights.cpu()
        counts = torch.bincount(ids.reshape(-1), minlength=self.cfg.num_experts).tolist()
        owners = self.placement.owners(layer)
        if any(not o for o in owners):
            deadline = self.loop.time() + self.timeout
            self._run(self._wait_covered(layer, deadline), self.timeout + 1.0)
            owners = self.placement.owners(layer)
            missing = [e for e, o in enumerate(owners) if not o]
            if missing:
                raise ExpertsError(f"no live experts shard holds experts {missing} of layer {layer} "
                                   f"(live shards: {self.placement.shards() or 'none'}; waited {self.timeout}s)")
        batches = dispatch.plan(ids, weights, owners, self._rr[layer])
        for e, c in enumerate(counts):
            self._rr[layer][e] += c
        xc = x.detach().cpu()
        parent = self.trace_parent() if self.trace_parent is not None else None
        span = None
        if parent is not None:
            span = tracing.start("experts.dispatch", parent, tracing.SpanKind.CLIENT, {
                "brigade.moe.layer": layer, "brigade.moe.tokens": x.shape[0], "brigade.moe.shards": len(batches)})
        headers = tracing.headers(span) if span is not None else None
        sockets = self.placement.sockets()
        # Direct shards get one message each, carrying the trace context (no payload limit and no headers on a
        # socket); bus shards get chunks under the limit, the context in their headers.
        requests = [(b.shard, dispatch.encode(layer, xc, b, 0, headers) if b.shard in sockets
                     else dispatch.encode(layer, xc, b, self.bus.max_payload)) for b in batches]
        try:
            replies = self._exchange_all(layer, requests, sockets, headers)
        except ExpertsError as e:
            if span is not None:
                tracing.fail(span, str(e))
                span.end()
            raise
        outputs, compute = [], 0.0
        for b, chunks in zip(batches, replies, strict=True):
            parts = []
            for data in chunks:
                res = P.ExpertsResult.decode(data)
                if res.error:
                    raise ExpertsError(f"experts shard {b.shard} refused layer {layer}: {res.error}")
                compute = max(compute, res.compute_s)
                parts.append(dispatch.from_bytes(res.data, x.dtype, (len(res.data) // (x.shape[1] * x.element_size()),
                                                                     x.shape[1])))
            outputs.append(torch.cat(parts) if len(parts) > 1 else parts[0])
        out = dispatch.combine((x.shape[0], x.shape[1]), x.dtype, batches, outputs)
        for e, c in enumerate(counts):
            if c:
                self._tokens[layer][e].inc(c)
        sent = sum(len(d) for _, chunks in requests for d in chunks)
        got = sum(len(d) for chunks in replies for d in chunks)
        self._bytes.labels("dispatch").inc(sent)
        self._bytes.labels("combine").inc(got)
        if span is not None:
            span.set_attributes({"brigade.moe.bytes_out": sent, "brigade.moe.bytes_in": got,
                                 "brigade.moe.compute_seconds": compute})
            span.end()
        s = self.stats
        s.calls += 1
        s.tokens += x.shape[0]
        s.messages += sum(len(chunks) for _, chunks in requests)
        s.direct += sum(1 for shard, _ in requests if shard in sockets)
        s.bytes_out += sent
        s.bytes_in += got
        s.compute_s += compute
        s.wall_s += time.perf_counter() - t0
        return out.to(x.device)

    def _exchange_all(self, layer: int, requests: list[tuple[str, list[bytes]]], sockets: dict[str, str],
                      headers: dict[str, str] | None) -> list[list[bytes]]:
        """Every shard's replies, in order: bus shards started on the loop first, then direct shards from here."""
        remote = [(shard, chunks) for shard, chunks in requests if shard not in sockets]
        local = [(sockets[shard], chunks[0]) for shard, chunks in requests if shard in sockets]
        fut = asyncio.run_coroutine_threadsafe(self._exchange(layer, remote, headers), self.loop) if remote else None
        try:
            got = self._channel.exchange(local, self.timeout) if local else []
        except ChannelError as e:
            if fut is not None:
                fut.cancel()
            shard = next(s for s, p in sockets.items() if p == e.path)
            self._failed(shard)
            raise ExpertsError(f"experts shard {shard} failed on layer {layer}: {e.reason}") from e
        far = self._wait(fut, self.timeout + 1.0) if fut is not None else []
        direct, bus = iter(got), iter(far)
        return [[next(direct)] if shard in sockets else next(bus) for shard, _ in requests]

    def _run(self, coro: Any, timeout: float) -> Any:
        """Run a coroutine on the event loop from the engine thread; never wait longer than `timeout`."""
        return self._wait(asyncio.run_coroutine_threadsafe(coro, self.loop), timeout)

    def _wait(self, fut: concurrent.futures.Future[Any], timeout: float) -> Any:
        try:
            return fut.result(timeout=timeout)
        except concurrent.futures.TimeoutError as e:
            fut.cancel()
            raise ExpertsError(f"expert dispatch did not complete within {timeout}s (event loop stalled?)") from e
