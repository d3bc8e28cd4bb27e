"""Drive an Engine from asyncio without ever blocking the event loop.

The engine is single-threaded: every call into it (add, abort, reserve, ...) and every step runs on
one dedicated thread, in order. Calls made while a step runs wait for it and are applied before the
next step, so a cancelled request's blocks are freed within one step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from brigade.engine.engine import Engine, RequestOutput

log = logging.getLogger("brigade.engine")
T = TypeVar("T")


class AsyncEngine:
    """Runs `engine.step()` in a loop on its own thread; `call` runs anything else between steps."""

    def __init__(self, engine: Engine, on_outputs: Callable[[list[RequestOutput]], Awaitable[None]],
                 on_step_error: Callable[[BaseException], Awaitable[None]] | None = None) -> None:
        self.engine = engine
        self.on_outputs = on_outputs
        self.on_step_error = on_step_error
        self._calls: deque[tuple[Callable[[], Any], asyncio.Future[Any]]] = deque()
        self._lock = threading.Lock()
        self._wake = asyncio.Event()
        self._stopped = False
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handling_error = False  # on_step_error runs: the engine thread is idle

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn(*args) on the engine thread between steps; its exception propagates here."""
        if self._handling_error:
            # The step loop is waiting for on_step_error (which typically aborts requests): no step runs
            # and the engine thread is idle, so run here (after anything queued) rather than wait on that loop.
            self._apply_calls()
            return fn(*args, **kwargs)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        with self._lock:
            self._calls.append((lambda: fn(*args, **kwargs), fut))
        self._wake.set()
        return await fut

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    async def run(self) -> None:
        """The step loop; returns after `stop`."""
        self._loop = asyncio.get_running_loop()
        try:
            while not self._stopped:
                if not self._calls and not self.engine.has_unfinished() and not self.engine.reserved:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                try:
                    outputs = await self._loop.run_in_executor(self._pool, self._tick)
                except Exception as e:  # a failed step must not kill the worker silently
                    log.exception("engine step failed")
                    if self.on_step_error is not None:
                        self._handling_error = True
                        try:
                            await self.on_step_error(e)
                        finally:
                            self._handling_error = False
                    continue
                if outputs:
                    await self.on_outputs(outputs)
                elif not self.engine.has_unfinished() and self.engine.reserved:
                    # Only leases are pending: wake up now and then to expire them.
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout=0.1)
                    except TimeoutError:
                        pass
                    self._wake.clear()
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _tick(self) -> list[RequestOutput]:
        """Engine thread: apply pending calls, expire leases, then one step."""
        self._apply_calls()
        if self.engine.reserved:
            self.engine.expire_reservations()
        if not self.engine.has_unfinished():
            return []
        return self.engine.step()

    def _apply_calls(self) -> None:
        """Run the queued calls in order, handing each result or exception to its caller."""
        assert self._loop is not None
        while True:
            with self._lock:
                if not self._calls:
                    break
                fn, fut = self._calls.popleft()
            try:
                result = fn()
            except BaseException as e:  # handed back to the awaiting caller
                self._loop.call_soon_threadsafe(_set, fut, None, e)
            else:
                self._loop.call_soon_threadsafe(_set, fut, result, None)


def _set(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
