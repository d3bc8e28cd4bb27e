"""An expert shard (`brigade experts --shard I/N`): its experts of every MoE layer, served over the bus.

Wiring and I/O only: heartbeats announce the experts held (the published placement) and the shard's
Unix socket (the direct data plane for workers on this host, experts/channel.py); dispatches from either
path run one at a time, on threads set to the process's torch thread count.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import torch
from prometheus_client import start_http_server

from brigade import protocol as P
from brigade import tracing
from brigade.bus import Bus, heartbeat, publish_status
from brigade.config import ExpertsConfig, parse_cpus
from brigade.experts.channel import ChannelServer, socket_path
from brigade.experts.dispatch import DTYPES
from brigade.experts.placement import parse_placement, parse_shard
from brigade.experts.shard import ExpertShard
from brigade.kernels import native
from brigade.model.config import load_config
from brigade.model.resolve import resolve_model
from brigade.procs import stop_on_signals

log = logging.getLogger("brigade.experts")


class ExpertsService:
    """Subscribes to this shard's dispatch subject and beats its status."""

    def __init__(self, config: ExpertsConfig, bus: Bus, shard: ExpertShard, threads: int = 1) -> None:
        self.config = config
        self.bus = bus
        self.shard = shard
        self.index, self.num_shards = parse_shard(config.shard)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="experts")
        self.pool.submit(torch.set_num_threads, threads).result()  # the compute thread's own OpenMP setting
        self._compute_lock = threading.Lock()  # one dispatch at a time, whichever path it came by
        self.channel = ChannelServer(socket_path(shard.shard_id), self._on_direct,
                                     init=lambda: torch.set_num_threads(threads)) if config.direct else None
        self.tasks: list[asyncio.Task[Any]] = []
        self.metrics_port = 0
        self.stopping = False

    async def start(self) -> None:
        if self.channel is not None:
            self.channel.start()
        # A queue group: a second process started for the same shard (a replacement) shares the work.
        await self.bus.subscribe(P.experts_dispatch(self.shard.shard_id), self._on_dispatch, queue="experts")
        await self.bus.flush()
        beat = heartbeat(self.bus, P.EXPERTS_HEARTBEAT, self.status, self.config.heartbeat_s)
        self.tasks.append(asyncio.ensure_future(beat))
        await self._publish_status()
        log.info("experts shard %s ready: experts %s of %d layers", self.shard.shard_id, self.shard.held[0],
                 len(self.shard.held))

    async def stop(self) -> None:
        self.stopping = True
        await self._publish_status()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.channel is not None:
            self.channel.close()

    async def _on_dispatch(self, msg: Any) -> None:
        try:
            req = P.ExpertsDispatch.decode(msg.data)
        except P.ProtocolError as e:
            await self.bus.respond(msg, P.ExpertsResult(error=str(e)))
            return
        result = await asyncio.get_running_loop().run_in_executor(self.pool, self._run, req, tracing.context_of(msg))
        await self.bus.respond(msg, result)

    def _on_direct(self, data: bytes) -> bytes:
        """A dispatch from the Unix socket, answered on the connection's thread."""
        try:
            req = P.ExpertsDispatch.decode(data)
        except P.ProtocolError as e:
            return P.ExpertsResult(error=str(e)).encode()
        return self._run(req, tracing.context_of(req.trace)).encode()

    def _run(self, req: P.ExpertsDispatch, parent: tracing.Context | None) -> P.ExpertsResult:
        span = tracing.start("experts", parent, tracing.SpanKind.SERVER, {
            "brigade.moe.layer": req.layer, "brigade.moe.rows": req.rows, "brigade.moe.shard": self.shard.shard_id})
        with self._compute_lock:
            result = self.shard.run(req)
        span.set_attribute("brigade.moe.compute_seconds", result.compute_s)
        if result.error:
            tracing.fail(span, result.error)
        span.end()
        return result

    def status(self) -> P.ExpertsStatus:
        return replace(self.shard.status(), shard=self.index, num_shards=self.num_shards, host=socket.gethostname(),
                       socket=self.channel.path if self.channel is not None else "", metrics_port=self.metrics_port,
                       stopping=self.stopping, time=time.time())

    async def _publish_status(self) -> None:
        await publish_status(self.bus, P.EXPERTS_HEARTBEAT, self.status())


def load_shard(config: ExpertsConfig) -> ExpertShard:
    """This shard's experts, read alone from the checkpoint."""
    model = str(resolve_model(config.model))
    index, num_shards = parse_shard(config.shard)
    cfg = load_config(model)
    held = parse_placement(config.placement, cfg.num_experts, num_shards)[index]
    kernel = config.kernel
    if kernel == "auto":
        kernel = "triton" if config.device.startswith("cuda") else "torch"
    shard_id = config.shard_id or f"{re.sub(r'[^A-Za-z0-9_-]', '_', cfg.name)}-{index}of{num_shards}"
    return ExpertShard.load(model, shard_id, [held] * cfg.num_layers, DTYPES[config.dtype], config.device, kernel)


def _load(config: ExpertsConfig) -> ExpertShard:
    """Load the shard, then free this thread's OpenMP pool: the shard computes on other threads, and a second
    live pool makes libgomp throttle their spin-waits (see native.release_omp_threads)."""
    shard = load_shard(config)
    native.release_omp_threads()
    return shard


async def serve(config: ExpertsConfig) -> None:
    """Run one expert shard until SIGINT/SIGTERM."""
    if config.cpus:
        os.sched_setaffinity(0, parse_cpus(config.cpus))
    threads = config.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    shard = await asyncio.to_thread(_load, config)
    tracing.setup("experts", shard.shard_id)
    bus = await Bus.connect(config.nats, f"experts-{shard.shard_id}")
    service = ExpertsService(config, bus, shard, threads)
    if config.metrics_port:
        start_http_server(config.metrics_port, registry=shard.registry)
        service.metrics_port = config.metrics_port
    stop = stop_on_signals()
    await service.start()
    try:
        await stop.wait()
    finally:
        await service.stop()
        await bus.close()
        tracing.shutdown()
