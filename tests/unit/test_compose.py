"""docker-compose.yml and the Dockerfile against the CLI they drive: every command must parse with `brigade`'s own
parser, so a renamed flag breaks this test rather than a deployment. (CI also runs `docker-compose config -q`.)"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from compose_file import load_compose

from brigade.cli import parser

ROOT = Path(__file__).resolve().parents[2]
BRIGADE_SERVICES = ("gateway", "router", "prefill", "decode")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def _subcommands() -> set[str]:
    p = parser()
    [sub] = [a for a in p._actions if a.dest == "command"]  # the subparsers action
    return set(sub.choices)


def test_the_five_services_exist(services: dict[str, Any]) -> None:
    assert {"nats", *BRIGADE_SERVICES} <= set(services)


@pytest.mark.parametrize("name", BRIGADE_SERVICES)
def test_command_parses_with_the_cli(services: dict[str, Any], name: str) -> None:
    command = services[name]["command"]
    assert isinstance(command, list) and all(isinstance(a, str) for a in command), "command must be an exec list"
    assert command[0] in _subcommands(), f"{name}: `brigade {command[0]}` is not a subcommand"
    assert command[0] == name
    try:
        args = parser().parse_args(command)
    except SystemExit as e:  # argparse prints the reason to stderr
        pytest.fail(f"{name}: `brigade {' '.join(command)}` does not parse (exit {e.code})")
    assert args.command == name
    assert args.nats == "nats://nats:4222", "services reach NATS by its compose service name"


@pytest.mark.parametrize("name", ["prefill", "decode"])
def test_workers_scale(services: dict[str, Any], name: str) -> None:
    svc = services[name]
    args = parser().parse_args(svc["command"])
    assert "container_name" not in svc and "--worker-id" not in svc["command"], "--scale needs distinct names and ids"
    assert args.kv_transport == "nats", "containers share no /dev/shm by default"
    env = svc["environment"]
    assert env["OMP_NUM_THREADS"] == env["BRIGADE_THREADS"], "torch threads = OpenMP threads = the cores owned"
    assert float(svc["cpus"]) == float(env["BRIGADE_THREADS"])
    assert "ports" not in svc


def test_model_is_the_one_the_image_bakes(services: dict[str, Any]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for name in ("gateway", "prefill", "decode"):
        model = parser().parse_args(services[name]["command"]).model
        assert model == "/models/demo" and model in dockerfile
    assert re.search(r'^ENTRYPOINT \["brigade"\]$', dockerfile, re.M)
    assert re.search(r"^USER (?!root)\S+$", dockerfile, re.M), "the image runs as a non-root user"


def test_nats_has_jetstream(services: dict[str, Any]) -> None:
    command = services["nats"]["command"]
    command = command.split() if isinstance(command, str) else command
    assert "-js" in command or "--jetstream" in command


def test_gateway_published_on_8000(services: dict[str, Any]) -> None:
    gw = services["gateway"]
    published = {str(p).rsplit(":", 1)[-1].split("/")[0] for p in gw["ports"]}
    assert "8000" in published
    args = parser().parse_args(gw["command"])
    assert args.port == 8000 and args.host == "0.0.0.0", "listen on every interface, on the published port"


def test_nothing_waits_on_a_healthcheck(services: dict[str, Any]) -> None:
    # podman does not run healthchecks by itself: `condition: service_healthy` would hang the stack there.
    for name, svc in services.items():
        deps = svc.get("depends_on") or []
        if isinstance(deps, dict):
            assert all(d.get("condition") != "service_healthy" for d in deps.values()), name
        if name in BRIGADE_SERVICES:
            assert svc.get("restart") in ("unless-stopped", "always", "on-failure"), f"{name} must restart"
