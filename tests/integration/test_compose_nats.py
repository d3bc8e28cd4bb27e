"""deploy/nats/nats.conf under a real nats-server, with the environment docker-compose.yml gives it: the defaults,
and passwords an operator sets (as in .env), which reach nats-server and each service alike. Anonymous clients and
wrong passwords are refused; each Brigade service's credentials connect; a role's permissions hold.
(tests/unit/test_compose.py checks the files themselves; no container engine is needed here.)"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from typing import Any

import nats
import pytest
from compose_file import NATS_CONF, load_compose

from brigade import protocol as P
from brigade.bus import Bus, BusError
from brigade.nats_server import CLEARED_ENV, NatsServer

QUICK = 3.0
SERVICES = ("gateway", "router", "prefill", "decode")
# What an operator's .env would hold: hex, as docs/operations.md suggests.
OPERATOR = {f"BRIGADE_NATS_{role}_PASSWORD": secrets.token_hex(24)
            for role in ("GATEWAY", "ROUTER", "WORKER", "EXPERTS")}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CLEARED_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module", params=["defaults", "operator"])
def stack(request: pytest.FixtureRequest) -> Iterator[tuple[NatsServer, dict[str, Any]]]:
    """(nats-server run as the compose file runs it, the compose services) for unset or operator-set variables."""
    services = load_compose(OPERATOR if request.param == "operator" else {})["services"]
    server = NatsServer(jetstream=False)  # no generated credentials: the users are the config file's
    server.args += ["-c", str(NATS_CONF)]  # listen address and port: the command line's, which win
    with pytest.MonkeyPatch.context() as m:  # nats-server resolves $BRIGADE_NATS_*_PASSWORD from its environment
        for k, v in services["nats"]["environment"].items():
            m.setenv(k, str(v))
        server.start()
    try:
        yield server, services
    finally:
        server.stop()


def _nats_env(services: dict[str, Any], name: str) -> dict[str, str]:
    return {k: str(v) for k, v in services[name]["environment"].items() if k.startswith("BRIGADE_NATS_")}


async def _as(server: NatsServer, services: dict[str, Any], name: str) -> Bus:
    with pytest.MonkeyPatch.context() as m:
        for k, v in _nats_env(services, name).items():
            m.setenv(k, v)
        return await Bus.connect(server.url, name, timeout=QUICK)


async def test_anonymous_and_wrong_passwords_are_refused(stack: tuple[NatsServer, dict[str, Any]],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    server, services = stack
    with pytest.raises(BusError, match="Authorization Violation"):
        await Bus.connect(server.url, "anonymous", timeout=QUICK)
    monkeypatch.setenv("BRIGADE_NATS_USER", "gateway")  # the gateway user with the worker's password
    monkeypatch.setenv("BRIGADE_NATS_PASSWORD", _nats_env(services, "decode")["BRIGADE_NATS_PASSWORD"])
    with pytest.raises(BusError, match="Authorization Violation"):
        await Bus.connect(server.url, "wrong", timeout=QUICK)
    if services["nats"]["environment"]["BRIGADE_NATS_WORKER_PASSWORD"] == OPERATOR["BRIGADE_NATS_WORKER_PASSWORD"]:
        monkeypatch.setenv("BRIGADE_NATS_USER", "worker")  # a password set replaces the default
        monkeypatch.setenv("BRIGADE_NATS_PASSWORD", "change-me-worker")
        with pytest.raises(BusError, match="Authorization Violation"):
            await Bus.connect(server.url, "default", timeout=QUICK)


@pytest.mark.parametrize("name", SERVICES)
async def test_each_service_connects_with_its_credentials(stack: tuple[NatsServer, dict[str, Any]], name: str) -> None:
    server, services = stack
    bus = await _as(server, services, name)
    try:
        prefix = services[name]["environment"].get("BRIGADE_NATS_INBOX_PREFIX", "_INBOX")
        assert bus.inbox().startswith(prefix + ".")
    finally:
        await bus.close()


async def test_roles_talk_through_their_permissions(stack: tuple[NatsServer, dict[str, Any]]) -> None:
    """gateway -> router -> worker request/reply works; a worker cannot send the router requests."""
    server, services = stack
    gateway, router, worker = [await _as(server, services, n) for n in ("gateway", "router", "decode")]
    try:
        got: list[bytes] = []

        async def on_worker(msg: nats.aio.msg.Msg) -> None:
            await worker.respond(msg, b"accepted")

        async def on_router(msg: nats.aio.msg.Msg) -> None:
            got.append(msg.data)
            await router.respond(msg, await router.request(P.worker_generate("w1"), msg.data, timeout=QUICK))

        await worker.subscribe(P.worker_generate("w1"), on_worker)
        await router.subscribe(P.ROUTER_GENERATE, on_router, queue="routers")
        await worker.flush()
        await router.flush()
        assert await gateway.request(P.ROUTER_GENERATE, b"hi", timeout=QUICK) == b"accepted"
        await worker.publish(P.ROUTER_GENERATE, b"forged")  # not the worker's to publish: the server drops it
        await worker.flush()
        await asyncio.sleep(0.3)
        assert got == [b"hi"]
    finally:
        for bus in (gateway, router, worker):
            await bus.close()
