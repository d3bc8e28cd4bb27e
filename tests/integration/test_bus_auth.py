"""NATS authentication: credentials from the URL or the environment, TLS, role permissions, `brigade up`."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import pytest
from helpers import free_port

from brigade import protocol as P
from brigade.bus import Bus, BusError, connect_options, redact
from brigade.launcher import Up, UpConfig
from brigade.nats_server import CLEARED_ENV, NatsServer

QUICK = 3.0  # connect timeout for attempts that must fail: a refusal should be immediate anyway


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No BRIGADE_NATS_* credentials from the environment the tests run in."""
    for name in CLEARED_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def token_server() -> Iterator[NatsServer]:
    with NatsServer(jetstream=False, auth="token") as s:
        yield s


@pytest.fixture(scope="module")
def users_server() -> Iterator[NatsServer]:
    with NatsServer(jetstream=False, auth="users") as s:
        yield s


def _use(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)


# ---- options, no server -----------------------------------------------------------------------------------------


def test_redact_hides_passwords_and_tokens() -> None:
    assert redact("nats://alice:s3cret@h:4222") == "nats://alice:***@h:4222"
    assert redact("nats://tok3n@h:4222") == "nats://***@h:4222"
    assert redact("tls://a:b@h1:1, nats://h2:2") == "tls://a:***@h1:1,nats://h2:2"
    assert redact("nats://h:4222") == "nats://h:4222"
    assert redact("t@h:4222") == "***@h:4222"


def test_connect_options_from_env_and_url() -> None:
    env = {"BRIGADE_NATS_TOKEN": "tok", "BRIGADE_NATS_INBOX_PREFIX": "_INBOX.gateway"}
    assert connect_options("nats://a:1,nats://b:2", env) == {
        "servers": ["nats://a:1", "nats://b:2"], "token": "tok", "inbox_prefix": "_INBOX.gateway"}
    assert connect_options("nats://h:1", {"BRIGADE_NATS_USER": "u", "BRIGADE_NATS_PASSWORD": "p"}) == {
        "servers": ["nats://h:1"], "user": "u", "password": "p"}
    # Explicit credentials in the URL win: nats-py would otherwise send the environment's instead.
    assert connect_options("nats://u:p@h:1", {"BRIGADE_NATS_TOKEN": "tok"}) == {"servers": ["nats://u:p@h:1"]}
    assert connect_options("nats://h:1", {"BRIGADE_NATS_TOKEN": ""}) == {"servers": ["nats://h:1"]}


def test_connect_options_refuse_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(BusError, match="go together"):
        connect_options("nats://h:1", {"BRIGADE_NATS_USER": "u"})
    with pytest.raises(BusError, match="no such file"):
        connect_options("nats://h:1", {"BRIGADE_NATS_CREDS": str(tmp_path / "missing.creds")})
    with pytest.raises(BusError, match="no such file"):
        connect_options("nats://h:1", {"BRIGADE_NATS_TLS_CA": str(tmp_path / "missing.pem")})


def test_embedded_server_config_is_private() -> None:
    s = NatsServer(jetstream=False, auth=True)
    try:
        conf = s.dir / "nats-server.conf"
        assert conf.stat().st_mode & 0o777 == 0o600
        assert all(c.password in conf.read_text() for c in s.credentials.values())
        assert not any(c.password in repr(s.credentials) for c in s.credentials.values())
        assert not any(c.password in " ".join(s.args) for c in s.credentials.values())  # not on `ps`
    finally:
        s.stop()


# ---- a token ----------------------------------------------------------------------------------------------------


async def test_anonymous_and_wrong_token_are_refused(token_server: NatsServer) -> None:
    with pytest.raises(BusError, match="Authorization Violation"):
        await Bus.connect(token_server.url, "anon", timeout=QUICK)
    wrong = token_server.url.replace("://", "://not-the-token@")
    with pytest.raises(BusError, match="Authorization Violation"):
        await Bus.connect(wrong, "wrong", timeout=QUICK)


async def test_token_in_url_or_env_connects(token_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    bus = await Bus.connect(token_server.client_url, "url-token", timeout=QUICK)
    await bus.close()
    _use(monkeypatch, token_server.env("gateway"))
    bus = await Bus.connect(token_server.url, "env-token", timeout=QUICK)
    await bus.close()
    # Several servers, the first one dead: nats-py tries the next.
    bus = await Bus.connect(f"nats://127.0.0.1:{free_port()},{token_server.url}", "two-servers", timeout=QUICK)
    await bus.close()


async def test_secrets_stay_out_of_repr_and_logs(token_server: NatsServer, caplog: pytest.LogCaptureFixture) -> None:
    secret = token_server.credentials["admin"].token
    caplog.set_level(logging.DEBUG)
    bus = await Bus.connect(token_server.client_url, "repr", timeout=QUICK)
    try:
        assert secret not in repr(bus) and "***@" in repr(bus)
    finally:
        await bus.close()
    wrong = "nats://wrong-" + secret + "@" + token_server.url.split("://")[1]
    with pytest.raises(BusError) as err:
        await Bus.connect(wrong, "wrong", timeout=QUICK)
    assert secret not in str(err.value)
    assert caplog.text and secret not in caplog.text


# ---- users and their permissions --------------------------------------------------------------------------------


async def test_user_password_in_url_or_env(users_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    bus = await Bus.connect(users_server.client_url, "url-user", timeout=QUICK)
    await bus.close()
    _use(monkeypatch, users_server.env("router"))
    bus = await Bus.connect(users_server.url, "env-user", timeout=QUICK)
    await bus.close()
    monkeypatch.setenv("BRIGADE_NATS_PASSWORD", "wrong")
    with pytest.raises(BusError, match="Authorization Violation"):
        await Bus.connect(users_server.url, "wrong-password", timeout=QUICK)


async def _as(server: NatsServer, role: str, monkeypatch: pytest.MonkeyPatch) -> Bus:
    with monkeypatch.context() as m:
        _use(m, server.env(role))
        return await Bus.connect(server.url, role, timeout=QUICK)


async def _received(bus: Bus, subject: str, send: Bus, wait: float = 0.5, to: str = "") -> list[bytes]:
    """What `bus` gets on `subject` when `send` publishes one message there (or on `to`)."""
    got: list[bytes] = []

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        got.append(msg.data)

    sub = await bus.subscribe(subject, on_msg)
    await bus.flush()
    await send.publish(to or subject, b"forged")
    await send.flush()
    await asyncio.sleep(wait)
    await sub.unsubscribe()
    return got


async def test_worker_cannot_act_as_gateway(users_server: NatsServer, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    admin = await Bus.connect(users_server.client_url, "admin", timeout=QUICK)
    worker = await _as(users_server, "worker", monkeypatch)
    try:
        assert await _received(admin, P.HEARTBEAT, worker) == [b"forged"]  # what a worker may do
        assert await _received(admin, P.ROUTER_GENERATE, worker) == []
        assert await _received(admin, P.CANCEL, worker) == []
        assert "permissions violation for publish" in caplog.text.lower()
        async def ignore(msg: nats.aio.msg.Msg) -> None:
            pass

        await worker.subscribe("_INBOX.*.*", ignore)  # the gateways' token streams
        await asyncio.sleep(0.3)
        assert "permissions violation for subscription" in caplog.text.lower()
        gateway = await _as(users_server, "gateway", monkeypatch)
        try:  # the gateway may watch inboxes, but never receives the other roles' replies
            assert await _received(gateway, "_INBOX.>", admin, wait=0.3, to="_INBOX.abc.1") == [b"forged"]
            assert await _received(gateway, "_INBOX.>", admin, wait=0.3, to="_INBOX.worker.abc.1") == []
        finally:
            await gateway.close()
    finally:
        await worker.close()
        await admin.close()


async def test_roles_request_and_reply(users_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """gateway -> router -> worker, each as its own user: replies reach each requester's own inbox prefix."""
    gateway, router, worker = [await _as(users_server, r, monkeypatch) for r in ("gateway", "router", "worker")]
    try:
        async def on_worker(msg: nats.aio.msg.Msg) -> None:
            await worker.respond(msg, b"accepted")

        async def on_router(msg: nats.aio.msg.Msg) -> None:
            await router.respond(msg, await router.request(P.worker_generate("w1"), msg.data, timeout=QUICK))

        await worker.subscribe(P.worker_generate("w1"), on_worker)
        await router.subscribe(P.ROUTER_GENERATE, on_router, queue="routers")
        await worker.flush()
        await router.flush()
        assert router.inbox().startswith("_INBOX.router.")
        assert await gateway.request(P.ROUTER_GENERATE, b"hi", timeout=QUICK) == b"accepted"
    finally:
        for b in (gateway, router, worker):
            await b.close()


# ---- TLS --------------------------------------------------------------------------------------------------------


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"), "-days", "1",
             "-subj", "/CN=brigade-test-ca", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("req", *ec, "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"),
                 "-subj", f"/CN={name}")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"), "-CAkey",
                 str(d / "ca.key"), "-CAcreateserial", "-out", str(d / f"{name}.pem"), "-days", "1",
                 "-extfile", str(d / f"{name}.ext"))
    return d


async def test_mutual_tls_from_env(pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = NatsServer(jetstream=False, auth="token")
    server.args += ["--tlsverify", "--tlscert", str(pki / "server.pem"), "--tlskey", str(pki / "server.key"),
                    "--tlscacert", str(pki / "ca.pem")]
    with server:
        _use(monkeypatch, server.env("worker"))
        with pytest.raises(BusError):  # no TLS at all
            await Bus.connect(server.url, "plain", timeout=QUICK)
        monkeypatch.setenv("BRIGADE_NATS_TLS_CA", str(pki / "ca.pem"))
        with pytest.raises(BusError):  # the server wants a client certificate too
            await Bus.connect(server.url, "no-cert", timeout=QUICK)
        monkeypatch.setenv("BRIGADE_NATS_TLS_CERT", str(pki / "client.pem"))
        monkeypatch.setenv("BRIGADE_NATS_TLS_KEY", str(pki / "client.key"))
        bus = await Bus.connect(server.url, "mtls", timeout=QUICK)
        await bus.close()


# ---- brigade up -------------------------------------------------------------------------------------------------


def test_up_serves_with_auth_and_refuses_anonymous(tiny_models: dict[str, Path]) -> None:
    with Up(UpConfig(model=str(tiny_models["llama"]), port=free_port(), decode=1,
                     worker_args=("--num-blocks", "64"))) as up:
        assert up.nats is not None and up.nats.credentials
        body = {"model": "llama", "prompt": "hello", "max_tokens": 3, "temperature": 0}
        r = httpx.post(f"{up.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"]

        async def anonymous() -> None:
            nc = await nats.connect(up.nats.url, allow_reconnect=False, connect_timeout=2, max_reconnect_attempts=0)
            await nc.close()

        with pytest.raises(Exception, match="Authorization Violation"):
            asyncio.run(anonymous())
        secrets = [c.password for c in up.nats.credentials.values()]
        for name, proc in up.procs:  # each child: its role's user, in its environment, not on its command line
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_text()
            assert not any(s in cmdline for s in secrets), name
            environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
            role = "worker" if name.startswith("decode") else name.split("-")[0]
            assert f"BRIGADE_NATS_USER={role}".encode() in environ, name
