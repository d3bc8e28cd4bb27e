"""The router (maître d'): tracks live workers, picks where each request runs, forwards it."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import replace
from typing import Any

from brigade import protocol as P
from brigade.bus import Bus, BusError
from brigade.config import RouterConfig
from brigade.routing.fleet import Fleet
from brigade.routing.policy import Policy, decide

log = logging.getLogger("brigade.router")
MAX_ATTEMPTS = 3


class Router:
    """Subscribes to heartbeats and generate requests; one decision per request."""

    def __init__(self, config: RouterConfig, bus: Bus) -> None:
        self.config = config
        self.bus = bus
        self.fleet = Fleet(config.heartbeat_timeout)
        self.policy = Policy(config.policy)
        self.tasks: list[asyncio.Task[Any]] = []

    async def start(self) -> None:
        await self.bus.subscribe(P.HEARTBEAT, self._on_status)
        # A queue group: several routers share the requests, each request goes to one of them.
        await self.bus.subscribe(P.ROUTER_GENERATE, self._on_generate, queue="routers")
        self.tasks.append(asyncio.ensure_future(self._purge_loop()))
        await self.bus.flush()

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _on_status(self, msg: Any) -> None:
        self.fleet.update(P.WorkerStatus.decode(msg.data), time.monotonic())

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_timeout / 3)
            for w in self.fleet.purge(time.monotonic()):
                log.warning("worker %s missed its heartbeats; no longer routed to", w)

    async def _on_generate(self, msg: Any) -> None:
        req = P.GenerateRequest.decode(msg.data)
        failed: set[str] = set()
        for _ in range(MAX_ATTEMPTS):
            d = decide(self.fleet, self.policy, len(req.prompt_ids), self.config.disagg_threshold,
                       time.monotonic(), failed)
            if d is None:
                break
            fwd = replace(req, decode_worker=d.decode)
            self.fleet.book(d.worker, len(req.prompt_ids))
            if d.decode:
                self.fleet.book(d.decode, 0)
            try:
                reply = await self.bus.request(P.worker_generate(d.worker), fwd, timeout=self.config.forward_timeout)
            except BusError as e:
                log.warning("worker %s did not take %s: %s", d.worker, req.request_id, e)
                failed.add(d.worker)
                self.fleet.remove(d.worker)
                continue
            await self.bus.respond(msg, reply)
            return
        await self.bus.respond(msg, P.Accepted(req.request_id, error="no worker available", code=503))


async def serve(config: RouterConfig) -> None:
    bus = await Bus.connect(config.nats, "router")
    router = Router(config, bus)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await router.start()
    log.info("router ready (policy %s)", config.policy)
    try:
        await stop.wait()
    finally:
        await router.stop()
        await bus.close()
