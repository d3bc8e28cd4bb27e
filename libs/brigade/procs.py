"""Process lifecycle helpers shared by the launcher, the embedded NATS server, services and benchmarks."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Iterable


def terminate(procs: Iterable[subprocess.Popen[bytes]], grace: float = 10.0) -> None:
    """SIGTERM every live process, wait up to `grace` seconds for all of them, SIGKILL the rest."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM: a service awaits it, then shuts down cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop
