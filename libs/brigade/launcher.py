"""`brigade up`: an embedded NATS server plus every service as a child process, on one machine."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from brigade import protocol as P
from brigade.bus import Bus
from brigade.config import DEFAULT_DTYPE
from brigade.model.make import resolve_model
from brigade.nats_server import NatsServer
from brigade.procs import terminate


@dataclass(frozen=True)
class UpConfig:
    model: str = "demo"
    host: str = "127.0.0.1"
    port: int = 8000
    mode: str = "colocated"  # colocated | disagg
    prefill: int = 1
    decode: int = 1
    router: str = "prefix"
    nats: str = ""  # an existing server; empty: start an embedded one
    kv_transport: str = "shm"
    disagg_threshold: int = 64
    worker_args: tuple[str, ...] = field(default_factory=tuple)  # extra flags for every worker
    experts: int = 0  # MoE expert shards (`brigade experts`); 0: experts run inside the workers
    otlp: str = ""  # OTLP/HTTP endpoint for every service's traces (sets OTEL_EXPORTER_OTLP_ENDPOINT)
    metrics_port: int = 0  # >0: the router serves /metrics here, worker i (in command order) on the next ports
    dtype: str = DEFAULT_DTYPE  # every worker's and expert shard's --dtype (auto: each resolves the checkpoint's)


def _ephemeral() -> range:
    """The kernel's range for outgoing connections' local ports (Linux; a common default elsewhere)."""
    try:
        lo, hi = open("/proc/sys/net/ipv4/ip_local_port_range").read().split()
        return range(int(lo), int(hi) + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


_handed_out: set[int] = set()


def free_ports(n: int = 1, host: str = "127.0.0.1") -> int:
    """The first of `n` consecutive TCP ports nothing is bound to right now. They come from below the
    ephemeral range: a port the kernel handed out (bind to 0) can be taken by any outgoing connection
    before the service that was meant to listen on it binds it, and `metrics_port + k` are not probed
    at all by a single-port probe."""
    eph = _ephemeral()
    pool = [p for p in range(20000, 32000 - n) if p not in eph and p + n - 1 not in eph]
    pool = pool or list(range(1024, 65536 - n))  # the ephemeral range covers nearly every port: probe any
    for base in random.sample(pool, min(len(pool), 200)):
        ports = range(base, base + n)
        if not _handed_out.intersection(ports) and all(_bindable(host, p) for p in ports):
            _handed_out.update(ports)  # two calls before either binds must not get the same port
            return base
    raise OSError(f"no {n} consecutive free ports on {host}")


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing is bound to right now (for a second system beside one already on 8000)."""
    return free_ports(1, host)


def split_cores(cores: list[int], processes: int) -> list[list[int]]:
    """Give each model process its own cores (DESIGN §8): contiguous equal shares, or one core each
    round-robin when there are more processes than cores (then some share)."""
    if processes <= 0:
        return []
    if processes <= len(cores):
        share = len(cores) // processes
        return [cores[i * share:(i + 1) * share] for i in range(processes)]
    return [[cores[i % len(cores)]] for i in range(processes)]


def _cpus(cores: list[int]) -> str:
    return ",".join(map(str, cores))


# OpenMP threads spin this many rounds after a parallel region before they sleep. libgomp's default (300,000,
# milliseconds on these cores) keeps a worker's idle OpenMP thread on the core an expert shard needs while
# the worker waits for that shard's reply: measured 2.8 ms of a ~7 ms layer dispatch lost to it (issue 6).
# Short spins keep most of the gain of spinning for the worker's own back-to-back ops.
MOE_SPINCOUNT = "10000"


def spin_env() -> dict[str, str]:
    """The OpenMP spin limit for processes that share cores with expert shards (unless the user set one)."""
    return {} if "GOMP_SPINCOUNT" in os.environ else {"GOMP_SPINCOUNT": MOE_SPINCOUNT}


def commands(cfg: UpConfig, nats_url: str, model: str) -> list[tuple[str, list[str], dict[str, str]]]:
    """(name, argv, extra env) of every child process."""
    py = [sys.executable, "-m", "brigade.cli"]
    roles = ["decode"] * cfg.decode
    if cfg.mode == "disagg":
        roles = ["prefill"] * cfg.prefill + roles
    elif cfg.mode != "colocated":
        raise ValueError(f"unknown mode {cfg.mode!r} (colocated, disagg)")
    shares = split_cores(sorted(os.sched_getaffinity(0)), len(roles) + cfg.experts)
    expert_flags = ["--experts", str(cfg.experts)] if cfg.experts else []
    def metrics(k: int) -> list[str]:
        return ["--metrics-port", str(cfg.metrics_port + k)] if cfg.metrics_port else []

    out = [("router", py + ["router", "--nats", nats_url, "--policy", cfg.router,
                             "--disagg-threshold", str(cfg.disagg_threshold), *metrics(0)], {})]
    for i, (role, cores) in enumerate(zip(roles, shares[:len(roles)], strict=True)):
        env = {"OMP_NUM_THREADS": str(len(cores)), **(spin_env() if cfg.experts else {})}
        argv = py + [role, "--nats", nats_url, "--model", model, "--worker-id", f"{role}-{i}",
                     "--cpus", _cpus(cores), "--threads", str(len(cores)), "--kv-transport", cfg.kv_transport,
                     "--dtype", cfg.dtype, *expert_flags, *metrics(1 + i), *cfg.worker_args]
        out.append((f"{role}-{i}", argv, env))
    for i, cores in enumerate(shares[len(roles):]):
        argv = py + ["experts", "--nats", nats_url, "--model", model, "--shard", f"{i}/{cfg.experts}",
                     "--cpus", _cpus(cores), "--threads", str(len(cores)), "--dtype", cfg.dtype]
        out.append((f"experts-{i}", argv, {"OMP_NUM_THREADS": str(len(cores)), **spin_env()}))
    out.append(("gateway", py + ["gateway", "--nats", nats_url, "--model", model, "--host", cfg.host,
                                 "--port", str(cfg.port)], {}))
    if cfg.otlp:
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": cfg.otlp, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
        out = [(name, argv, {**env, **otel}) for name, argv, env in out]
    return out


async def _wait_workers(nats_url: str, expected: int, timeout: float, shards: int = 0) -> None:
    """Return once `expected` distinct workers and `shards` expert shards have published a status."""
    bus = await Bus.connect(nats_url, "up")
    seen: set[str] = set()
    seen_shards: set[str] = set()
    done = asyncio.Event()

    def check() -> None:
        if len(seen) >= expected and len(seen_shards) >= shards:
            done.set()

    async def on_status(msg: object) -> None:
        seen.add(P.WorkerStatus.decode(msg.data).worker_id)  # type: ignore[attr-defined]
        check()

    async def on_shard(msg: object) -> None:
        seen_shards.add(P.ExpertsStatus.decode(msg.data).shard_id)  # type: ignore[attr-defined]
        check()

    await bus.subscribe(P.HEARTBEAT, on_status)
    if shards:
        await bus.subscribe(P.EXPERTS_HEARTBEAT, on_shard)
    try:
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        await bus.close()


def _wait_http(url: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not become healthy")


class Up:
    """Owns the embedded NATS server and the children; `stop` ends them all."""

    def __init__(self, cfg: UpConfig, wrap: Callable[[str, list[str]], list[str]] | None = None) -> None:
        """`wrap(name, argv)`: the command line that runs child `name` (e.g. under `ip netns exec`, `numactl`)."""
        self.cfg = cfg
        self.wrap = wrap
        self.nats: NatsServer | None = None
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.argv: dict[str, tuple[list[str], dict[str, str]]] = {}

    def __enter__(self) -> Up:
        """`with Up(cfg) as up:` starts everything (the gateway URL is `up.url`) and stops it on the way out."""
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The gateway's base URL."""
        return f"http://{self.cfg.host}:{self.cfg.port}"

    def start(self, timeout: float = 120.0) -> str:
        """Start everything; return the gateway URL once workers report and the gateway is healthy."""
        if self.cfg.kv_transport == "nixl" and self.cfg.mode == "disagg":
            from brigade.kv.nixl import nixl_api

            nixl_api()  # not installed: say so now, not as every worker's dying log line
        model = str(resolve_model(self.cfg.model))  # made once here, not raced by the children
        url = self.cfg.nats
        if not url:
            self.nats = NatsServer()
            url = self.nats.start()
        cmds = commands(self.cfg, url, model)
        for name, argv, env in cmds:
            self.argv[name] = (self.wrap(name, argv) if self.wrap else argv, env)
            self.procs.append((name, self._spawn(name)))
        workers = sum(1 for name, _, _ in cmds if name not in ("router", "gateway") and not name.startswith("experts"))
        try:
            asyncio.run(_wait_workers(url, workers, timeout, self.cfg.experts))
            _wait_http(self.url + "/health", timeout)
        except BaseException:
            self.stop()
            raise
        return self.url

    def _spawn(self, name: str) -> subprocess.Popen[bytes]:
        argv, env = self.argv[name]
        return subprocess.Popen(argv, env={**os.environ, **env}, start_new_session=True)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Stop one child (tests use it to fail a worker or the router)."""
        for n, p in self.procs:
            if n == name and p.poll() is None:
                p.send_signal(sig)
                p.wait(timeout=30)

    def restart(self, name: str) -> None:
        """Kill one child and start it again with the same command."""
        self.kill(name)
        self.procs = [(n, p) for n, p in self.procs if n != name] + [(name, self._spawn(name))]

    def failed(self) -> list[str]:
        return [name for name, p in self.procs if p.poll() is not None]

    def stop(self, grace: float = 10.0) -> None:
        terminate((p for _, p in self.procs), grace)
        self.procs.clear()
        if self.nats is not None:
            self.nats.stop()
            self.nats = None


def run(cfg: UpConfig) -> int:
    """Foreground `brigade up`: start, print the URL, wait for Ctrl-C or a child's death."""
    up = Up(cfg)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    url = up.start()
    print(f"Brigade is up: {url}  (OpenAI API at {url}/v1; Ctrl-C stops everything)", flush=True)
    code = 0
    while not stop:
        dead = up.failed()
        if dead:
            print(f"brigade up: {', '.join(dead)} exited; stopping", file=sys.stderr, flush=True)
            code = 1
            break
        time.sleep(0.5)
    up.stop()
    return code
