"""Drive an Engine from asyncio without ever blocking the event loop.

The engine is single-threaded: every call into it (add, abort, reserve, ...) and every step runs on one
dedicated thread, in order. That thread steps back to back and hands each step's outputs to the event loop,
which publishes them while the next step already runs; it never waits for the loop unless it is `MAX_AHEAD`
steps ahead. (Awaiting each step's publishing before starting the next left a served worker's cores idle ~25%
of the time at a 128-sequence batch.) Calls made while a step runs are applied before the next step, so a
cancelled request's blocks are freed within one step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from brigade.engine.engine import Engine, RequestOutput
from brigade.kernels import native

log = logging.getLogger("brigade.engine")
T = TypeVar("T")
MAX_AHEAD = 2  # steps whose outputs may wait for the event loop before the engine thread waits too
LEASE_POLL_S = 0.1  # how often reservations are checked for expiry while nothing else runs


class AsyncEngine:
    """Runs `engine.step()` in a loop on its own thread; `call` runs anything else between steps."""

    def __init__(self, engine: Engine, on_outputs: Callable[[list[RequestOutput]], Awaitable[None]],
                 on_step_error: Callable[[BaseException], Awaitable[None]] | None = None) -> None:
        self.engine = engine
        self.on_outputs = on_outputs
        self.on_step_error = on_step_error
        self._calls: deque[tuple[Callable[[], Any], asyncio.Future[Any]]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()  # set by calls, by delivered outputs and by stop
        self._error_handled = threading.Event()
        self._stopped = False
        self._ahead = 0  # steps delivered to the loop and not yet handled (guarded by _lock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[list[RequestOutput] | BaseException | None] | None = None
        self._handling_error = False  # on_step_error runs: the engine thread is idle

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn(*args) on the engine thread between steps; its exception propagates here."""
        if self._handling_error:
            # The engine thread waits for on_step_error (which typically aborts requests): no step runs, so
            # run here (after anything queued) rather than wait on that thread.
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
        self._error_handled.set()
        if self._loop is not None and self._queue is not None:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, None)

    async def run(self) -> None:
        """Start the engine thread and hand its outputs to `on_outputs`, in step order; returns after `stop`."""
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()  # holds at most MAX_AHEAD steps (the engine thread waits beyond that)
        # Any OpenMP pool this thread made (loading a model here, say) would make libgomp throttle the engine
        # thread's; a worker that loads elsewhere frees that thread's pool itself (build_engine).
        native.release_omp_threads()
        thread = threading.Thread(target=self._thread_main, name="engine", daemon=True)
        thread.start()
        try:
            while not self._stopped:
                item = await self._queue.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    await self._handle_error(item)
                    continue
                try:
                    await self.on_outputs(item)
                finally:
                    with self._lock:
                        self._ahead -= 1
                    self._wake.set()
        finally:
            self._stopped = True
            self._wake.set()
            self._error_handled.set()

    async def _handle_error(self, error: BaseException) -> None:
        try:
            if self.on_step_error is not None:
                self._handling_error = True
                await self.on_step_error(error)
        finally:
            self._handling_error = False
            self._error_handled.set()

    def _thread_main(self) -> None:
        """Engine thread: apply pending calls, expire leases, step; sleep when there is nothing to do."""
        engine = self.engine
        while not self._stopped:
            self._wake.clear()  # before looking: a call or a delivery after this wakes the wait below
            self._apply_calls()
            if engine.reserved:
                engine.expire_reservations()
            with self._lock:
                blocked = self._ahead >= MAX_AHEAD
            if blocked or not engine.has_unfinished():
                self._wake.wait(LEASE_POLL_S if engine.reserved else None)
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # a failed step must not kill the worker silently
                log.exception("engine step failed")
                self._error_handled.clear()
                self._post(e)
                self._error_handled.wait()
                continue
            if outputs:
                with self._lock:
                    self._ahead += 1
                self._post(outputs)

    def _post(self, item: list[RequestOutput] | BaseException) -> None:
        assert self._loop is not None and self._queue is not None
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the service is going away
            self._stopped = True

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
                self._set_later(fut, None, e)
            else:
                self._set_later(fut, result, None)

    def _set_later(self, fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(_set, fut, result, error)
        except RuntimeError:
            pass


def _set(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
