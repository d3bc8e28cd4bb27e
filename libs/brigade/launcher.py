"""`brigade up`: an embedded NATS server plus every service as a child process, on one machine."""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from brigade import protocol as P
from brigade.bus import Bus
from brigade.config import DEFAULT_DTYPE, default_served_names
from brigade.model.config import ModelError, load_config
from brigade.model.resolve import resolve_model
from brigade.nats_server import NatsCluster, NatsServer
from brigade.procs import die_with_parent, terminate


@dataclass(frozen=True)
class UpConfig:
    model: str = "demo"
    host: str = "127.0.0.1"
    port: int = 8000
    mode: str = "colocated"  # colocated | disagg
    prefill: int = 1
    decode: int = 1
    router: str = "prefix"
    nats: str = ""  # an existing server (or several, comma-separated); empty: start an embedded one
    nats_cluster: int = 0  # > 1: start that many embedded servers routed into a cluster (clients fail over)
    kv_transport: str = "shm"
    disagg_threshold: int = 64
    worker_args: tuple[str, ...] = field(default_factory=tuple)  # extra flags for every worker
    experts: int = 0  # MoE expert shards (`brigade experts`); 0: experts run inside the workers
    otlp: str = ""  # OTLP/HTTP endpoint for every service's traces (sets OTEL_EXPORTER_OTLP_ENDPOINT)
    metrics_port: int = 0  # >0: the router serves /metrics here, worker i (in command order) on the next ports
    dtype: str = DEFAULT_DTYPE  # every worker's and expert shard's --dtype (auto: each resolves the checkpoint's)
    served_model_name: tuple[str, ...] = ()  # names clients send as `model`; empty: the model as given
    max_model_len: int = 0  # gateway and workers alike; 0: the checkpoint's
    kv_cache_bytes: int = 0  # every worker's KV cache; 0: automatic
    max_num_seqs: int = 0  # 0: the workers' default
    max_num_batched_tokens: int = 0  # 0: the workers' default
    api_key: str = ""  # the gateway asks clients for `Authorization: Bearer <key>`
    chat_template: str = ""  # the gateway's chat template (a file or the template itself); empty: the model's
    tool_call_parser: str = "auto"  # the gateway's --tool-call-parser


NATS = "nats"  # the embedded server's name among the children, for restarts

MAX_RESTARTS = 5  # restarts of one child within RESTART_WINDOW_S before `brigade up` gives up
RESTART_WINDOW_S = 60.0
RESTART_BACKOFF_S = 0.5  # delay before the second restart within the window; doubling after that
RESTART_MAX_DELAY_S = 10.0
TAIL_LINES = 40  # of each child's stderr, kept for the error report when it dies during start-up


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
    engine = (("--max-model-len", cfg.max_model_len), ("--kv-cache-bytes", cfg.kv_cache_bytes),
              ("--max-num-seqs", cfg.max_num_seqs), ("--max-num-batched-tokens", cfg.max_num_batched_tokens))
    engine_flags = [f for name, value in engine if value for f in (name, str(value))]
    def metrics(k: int) -> list[str]:
        return ["--metrics-port", str(cfg.metrics_port + k)] if cfg.metrics_port else []

    out = [("router", py + ["router", "--nats", nats_url, "--policy", cfg.router,
                             "--disagg-threshold", str(cfg.disagg_threshold), *metrics(0)], {})]
    for i, (role, cores) in enumerate(zip(roles, shares[:len(roles)], strict=True)):
        env = {"OMP_NUM_THREADS": str(len(cores)), **(spin_env() if cfg.experts else {})}
        argv = py + [role, "--nats", nats_url, "--model", model, "--worker-id", f"{role}-{i}",
                     "--cpus", _cpus(cores), "--threads", str(len(cores)), "--kv-transport", cfg.kv_transport,
                     "--dtype", cfg.dtype, *engine_flags, *expert_flags, *metrics(1 + i), *cfg.worker_args]
        out.append((f"{role}-{i}", argv, env))
    for i, cores in enumerate(shares[len(roles):]):
        argv = py + ["experts", "--nats", nats_url, "--model", model, "--shard", f"{i}/{cfg.experts}",
                     "--cpus", _cpus(cores), "--threads", str(len(cores)), "--dtype", cfg.dtype]
        out.append((f"experts-{i}", argv, {"OMP_NUM_THREADS": str(len(cores)), **spin_env()}))
    gateway = py + ["gateway", "--nats", nats_url, "--model", model, "--host", cfg.host, "--port", str(cfg.port),
                    "--served-model-name", ",".join(cfg.served_model_name or default_served_names(cfg.model))]
    if cfg.max_model_len:
        gateway += ["--max-model-len", str(cfg.max_model_len)]
    if cfg.chat_template:
        gateway += ["--chat-template", cfg.chat_template]
    if cfg.tool_call_parser != "auto":
        gateway += ["--tool-call-parser", cfg.tool_call_parser]
    # The key travels in the environment, not on a command line every local user can read.
    out.append(("gateway", gateway, {"BRIGADE_API_KEY": cfg.api_key} if cfg.api_key else {}))
    if cfg.otlp:
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": cfg.otlp, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
        out = [(name, argv, {**env, **otel}) for name, argv, env in out]
    return out


def bus_role(name: str) -> str:
    """The bus role (brigade.nats_server.ROLES) of child `name` of `commands`."""
    role = name.split("-")[0]
    return role if role in ("router", "gateway", "experts") else "worker"


async def _wait_workers(nats_url: str, expected: int, timeout: float, shards: int = 0,
                        failed: Callable[[], str | None] = lambda: None) -> None:
    """Return once `expected` distinct workers and `shards` expert shards have published a status; StartError
    as soon as `failed()` names a child that died meanwhile."""
    bus = await Bus.connect(nats_url, "up")
    seen: set[str] = set()
    seen_shards: set[str] = set()

    async def on_status(msg: object) -> None:
        seen.add(P.WorkerStatus.decode(msg.data).worker_id)  # type: ignore[attr-defined]

    async def on_shard(msg: object) -> None:
        seen_shards.add(P.ExpertsStatus.decode(msg.data).shard_id)  # type: ignore[attr-defined]

    await bus.subscribe(P.HEARTBEAT, on_status)
    if shards:
        await bus.subscribe(P.EXPERTS_HEARTBEAT, on_shard)
    deadline = time.monotonic() + timeout
    try:
        while len(seen) < expected or len(seen_shards) < shards:
            if (why := failed()) is not None:
                raise StartError(why)
            if time.monotonic() > deadline:
                raise StartError(f"{len(seen)} of {expected} workers and {len(seen_shards)} of {shards} expert "
                                 f"shards reported within {timeout:.0f} s")
            await asyncio.sleep(0.1)
    finally:
        await bus.close()


def _wait_http(url: str, timeout: float, failed: Callable[[], str | None] = lambda: None,
               ready: bool = True) -> None:
    """Return once `url` answers 200 (`ready`), or answers at all (no worker of ours can serve: `--decode 0`
    waits for workers started elsewhere, and /health says 503 until one beats)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (why := failed()) is not None:
            raise StartError(why)
        try:
            if httpx.get(url, timeout=1.0).status_code == 200 or not ready:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise StartError(f"{url} did not become healthy within {timeout:.0f} s")


class StartError(RuntimeError):
    """`brigade up` could not start: what failed, in the failing child's own words where there is one."""


class _Child:
    """One child process; its stderr is passed through to ours, the last lines kept for error reports."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.proc = subprocess.Popen(argv, env={**os.environ, **env}, stderr=subprocess.PIPE,
                                     start_new_session=True, preexec_fn=die_with_parent())
        self.relay = threading.Thread(target=self._relay, name=f"stderr-{name}", daemon=True)
        self.relay.start()

    def _relay(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            self.tail.append(line.rstrip())
            try:
                sys.stderr.write(line)
                sys.stderr.flush()
            except (OSError, ValueError):  # our stderr is gone (closed terminal): keep draining the pipe
                pass

    def why(self) -> str:
        """Its exit, with the last thing it said (a service's error line, or a traceback's last line)."""
        self.relay.join(timeout=1.0)  # it may still be reading the last lines (a grandchild can hold the pipe)
        said = next((line for line in reversed(self.tail) if line.strip()), "")
        return f"{self.name} exited with code {self.proc.returncode} during start-up" + (f": {said}" if said else "")


class Up:
    """Owns the embedded NATS server and the children; `stop` ends them all."""

    def __init__(self, cfg: UpConfig, wrap: Callable[[str, list[str]], list[str]] | None = None) -> None:
        """`wrap(name, argv)`: the command line that runs child `name` (e.g. under `ip netns exec`, `numactl`)."""
        self.cfg = cfg
        self.wrap = wrap
        self.nats: NatsServer | NatsCluster | None = None
        self.children: list[_Child] = []
        self.argv: dict[str, tuple[list[str], dict[str, str]]] = {}

    @property
    def procs(self) -> list[tuple[str, subprocess.Popen[bytes]]]:
        return [(c.name, c.proc) for c in self.children]

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
        """Start everything; return the gateway URL once workers report and the gateway is healthy.

        What cannot work is refused before anything starts (a bad model, a taken port); a child that exits
        during start-up stops everything at once with that child's last words (StartError)."""
        if self.cfg.kv_transport == "nixl" and self.cfg.mode == "disagg":
            from brigade.kv.nixl import nixl_api

            nixl_api()  # not installed: say so now, not as every worker's dying log line
        model = str(resolve_model(self.cfg.model))  # made once here, not raced by the children
        load_config(model)  # an unsupported or broken checkpoint: ModelError now, not in every child
        if not self.wrap and not _bindable(self.cfg.host, self.cfg.port):
            raise StartError(f"port {self.cfg.port} on {self.cfg.host} is in use (choose another with --port)")
        url = self.cfg.nats  # an external server: the children use whatever credentials the environment has
        if not url:
            self.nats = NatsCluster(self.cfg.nats_cluster) if self.cfg.nats_cluster > 1 else NatsServer(auth=True)
            url = self.nats.start()
        cmds = [(name, argv, {**env, **self._bus_env(name)}) for name, argv, env in commands(self.cfg, url, model)]
        try:
            for name, argv, env in cmds:
                self.argv[name] = (self.wrap(name, argv) if self.wrap else argv, env)
                self.children.append(self._spawn(name))
            workers = sum(1 for name, _, _ in cmds
                          if name not in ("router", "gateway") and not name.startswith("experts"))
            asyncio.run(_wait_workers(self.nats.client_url if self.nats else url, workers, timeout,
                                      self.cfg.experts, self._first_death))
            _wait_http(self.url + "/health", timeout, self._first_death, ready=self.cfg.decode > 0)
        except BaseException:
            self.stop()
            raise
        return self.url

    def _bus_env(self, name: str) -> dict[str, str]:
        """Child `name`'s credentials on the embedded server (its role's user), in its environment: not on
        its command line, where `ps` shows them to every local user."""
        return self.nats.env(bus_role(name)) if self.nats else {}

    def _first_death(self) -> str | None:
        dead = next((c for c in self.children if c.proc.poll() is not None), None)
        return None if dead is None else dead.why()

    def _spawn(self, name: str) -> _Child:
        argv, env = self.argv[name]
        return _Child(name, argv, env)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Stop one child (tests use it to fail a worker or the router)."""
        for c in self.children:
            if c.name == name and c.proc.poll() is None:
                c.proc.send_signal(sig)
                c.proc.wait(timeout=30)

    def restart(self, name: str) -> None:
        """Kill one child and start it again with the same command ("nats", "nats-<i>": the embedded server or
        a node of the embedded cluster, on its port)."""
        if name == NATS or name.startswith(NATS + "-"):
            if self.nats is not None:
                self.nats.restart_node(name)
            return
        self.kill(name)
        self.children = [c for c in self.children if c.name != name] + [self._spawn(name)]

    def failed(self) -> list[str]:
        """Children that exited, and "nats" when the embedded server did."""
        dead = [c.name for c in self.children if c.proc.poll() is not None]
        return dead + (self.nats.dead_nodes() if self.nats is not None else [])

    def stop(self, grace: float = 10.0) -> None:
        terminate((c.proc for c in self.children), grace)
        self.children.clear()
        if self.nats is not None:
            self.nats.stop()
            self.nats = None


def run(cfg: UpConfig) -> int:
    """Foreground `brigade up`: start, print the URL, serve until Ctrl-C or SIGTERM, restarting a child that
    dies (the gateway replays the requests a dead worker held).

    The children run in sessions of their own, so a terminal's Ctrl-C (SIGINT to the foreground process
    group) reaches only this process, which stops the services and then the bus."""
    up = Up(cfg)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        if not started:
            raise KeyboardInterrupt  # out of start(), which stops whatever it started
        stop = True

    started = False
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        url = up.start()
    except KeyboardInterrupt:
        return 130
    except (StartError, ModelError, OSError, ValueError) as e:
        print(f"brigade up: {e}", file=sys.stderr, flush=True)
        return 1
    started = True
    print(f"Brigade is up: {url}  (OpenAI API at {url}/v1; Ctrl-C stops everything)", flush=True)
    keeper = Restarts()
    code = 0
    while not stop:
        now = time.monotonic()
        for name in up.failed():
            delay = keeper.due(name, now)
            if delay is None:
                print(f"brigade up: {name} exited {MAX_RESTARTS} times within {RESTART_WINDOW_S:.0f} s; stopping",
                      file=sys.stderr, flush=True)
                stop, code = True, 1
                break
            if delay <= 0:
                print(f"brigade up: {name} exited; restarting it", file=sys.stderr, flush=True)
                up.restart(name)  # its requests are replayed by the gateway meanwhile
                keeper.restarted(name, now)
        time.sleep(0.2)
    up.stop()
    return code


class Restarts:
    """When to restart a child that died: at once the first time, then with a doubling delay; never more than
    MAX_RESTARTS times within RESTART_WINDOW_S (a child that keeps dying stops the stack with its error)."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}
        self.seen_dead: dict[str, float] = {}

    def due(self, name: str, now: float) -> float | None:
        """Seconds until `name` should be restarted (<= 0: now); None: it died too often, give up."""
        recent = [t for t in self.times.get(name, []) if now - t < RESTART_WINDOW_S]
        self.times[name] = recent
        if len(recent) >= MAX_RESTARTS:
            return None
        died = self.seen_dead.setdefault(name, now)
        backoff = 0.0 if not recent else min(RESTART_BACKOFF_S * 2 ** (len(recent) - 1), RESTART_MAX_DELAY_S)
        return died + backoff - now

    def restarted(self, name: str, now: float) -> None:
        self.times.setdefault(name, []).append(now)
        self.seen_dead.pop(name, None)
