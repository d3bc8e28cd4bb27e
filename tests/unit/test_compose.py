"""docker-compose.yml and the Dockerfile against the CLI they drive: every command must parse with `brigade`'s own
parser, so a renamed flag breaks this test rather than a deployment. (CI also runs `docker-compose config -q`.)
Also the stack's defaults are safe: NATS refuses anonymous clients (deploy/nats/nats.conf, the same per-role
permissions `brigade up` uses), every service gets its role's credentials from variables, and nothing but the API
is published beyond 127.0.0.1."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from compose_file import VARIABLE, Ref, load_compose, load_compose_raw, load_nats_conf

from brigade.cli import parser
from brigade.nats_server import CLEARED_ENV, PREFIXED, ROLES, _role_permissions

ROOT = Path(__file__).resolve().parents[2]
BRIGADE_SERVICES = ("gateway", "router", "prefill", "decode")
ROLE = {"gateway": "gateway", "router": "router", "prefill": "worker", "decode": "worker"}  # NATS user per service
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


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


# ---- NATS authentication -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_services() -> dict[str, Any]:
    """The services as written, `${VAR:-default}` not resolved."""
    return dict(load_compose_raw()["services"])


@pytest.fixture(scope="module")
def nats_users() -> dict[str, dict[str, Any]]:
    """deploy/nats/nats.conf's users by name."""
    conf = load_nats_conf()
    auth = conf["authorization"]
    # Users only: a global token, user or password would let anyone holding it do anything.
    assert set(auth) <= {"users", "timeout"}, f"authorization holds {set(auth) - {'users', 'timeout'}}"
    users = {u["user"]: u for u in auth["users"]}
    assert len(users) == len(auth["users"]), "a user is listed twice"
    return users


def test_nats_reads_the_config_file(services: dict[str, Any]) -> None:
    nats = services["nats"]
    command = nats["command"]
    [flag] = [a for a in command if a in ("-c", "--config", "-config")]
    path = command[command.index(flag) + 1]
    mounts = {v.split(":")[1]: v for v in nats["volumes"]}
    assert mounts.get(path) == f"./deploy/nats/nats.conf:{path}:ro", f"nats reads {path}: mount the conf there, ro"
    assert "ports" not in nats, "NATS is not published by default (uncomment its ports to add hosts)"


def test_nats_users_are_the_roles_with_their_permissions(nats_users: dict[str, dict[str, Any]]) -> None:
    """The same users and subjects as `brigade up`'s embedded server (nats_server._role_permissions)."""
    assert set(nats_users) == set(ROLES)
    expected = _role_permissions()
    for name, user in nats_users.items():
        assert set(user) == {"user", "password", "permissions"}, f"{name}: {set(user)}"
        assert user["permissions"] == {**expected[name], "allow_responses": True}, name


def test_nats_conf_holds_no_secret(nats_users: dict[str, dict[str, Any]], services: dict[str, Any]) -> None:
    """Every password is a `$VAR` reference, resolved from the nats container's environment, which sets them all
    (an unset reference stops nats-server)."""
    env = services["nats"]["environment"]
    for name, user in nats_users.items():
        password = user["password"]
        assert isinstance(password, Ref), f"{name}: the password must be a $VARIABLE, not a literal"
        assert env.get(password.name), f"nats.conf reads ${password.name}, which the nats service does not set"
    assert len({u["password"] for u in nats_users.values()}) == len(nats_users), "one password per role"


def _variable(raw: str, what: str) -> tuple[str, str]:
    """(name, default) of a secret written as `${NAME:-default}`: CI checks the file with nothing set, so no
    `${NAME:?...}`; and a default nats-server reads back as the same string (letters, digits, dashes; not a number)."""
    m = VARIABLE.fullmatch(str(raw))
    assert m and m.group(2) == ":", f"{what}: {raw!r} should be ${{VARIABLE:-default}}"
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", m.group(3)), f"{what}: default {m.group(3)!r}"
    return m.group(1), m.group(3)


@pytest.mark.parametrize("name", BRIGADE_SERVICES)
def test_every_service_gets_its_roles_credentials(services: dict[str, Any], raw_services: dict[str, Any],
                                                  nats_users: dict[str, dict[str, Any]], name: str) -> None:
    args = parser().parse_args(services[name]["command"])
    assert "@" not in args.nats, "credentials go in the environment, not on the command line"
    env, raw = services[name]["environment"], raw_services[name]["environment"]
    role = ROLE[name]
    assert env.get("BRIGADE_NATS_USER") == role, f"{name} should connect as the {role} user"
    user = nats_users[role]
    # The service and nats-server read the password from the same variable, with the same default.
    variable, _ = _variable(raw["BRIGADE_NATS_PASSWORD"], f"{name}: BRIGADE_NATS_PASSWORD")
    assert variable == user["password"].name
    assert raw_services["nats"]["environment"][variable] == raw["BRIGADE_NATS_PASSWORD"]
    assert env["BRIGADE_NATS_PASSWORD"] == services["nats"]["environment"][variable]
    # Replies under the role's own inbox prefix, which its subscribe permissions allow (the gateway: the default).
    prefix = env.get("BRIGADE_NATS_INBOX_PREFIX", "")
    assert prefix == (f"_INBOX.{role}" if role in PREFIXED else "")
    if prefix:
        assert f"{prefix}.>" in user["permissions"]["subscribe"]
    # No second, conflicting kind of credential.
    assert not any(env.get(k) for k in ("BRIGADE_NATS_TOKEN", "BRIGADE_NATS_CREDS", "BRIGADE_NATS_NKEY"))


def test_every_nats_client_is_a_brigade_service(services: dict[str, Any]) -> None:
    """A service that connects to NATS is one the test above checks."""
    clients = {n for n, s in services.items() if "nats://" in " ".join(map(str, s.get("command") or []))}
    assert clients == set(BRIGADE_SERVICES)


@pytest.mark.parametrize("name", BRIGADE_SERVICES)
def test_brigade_variables_are_ones_the_code_reads(services: dict[str, Any], name: str) -> None:
    """Each BRIGADE_* variable given to a service is a flag default (BRIGADE_<FLAG>), a bus setting or the log
    level: a misspelt one would be ignored in silence."""
    args = vars(parser().parse_args(services[name]["command"]))
    for var in services[name]["environment"]:
        if var.startswith("BRIGADE_") and var not in CLEARED_ENV and var != "BRIGADE_LOG":
            assert var.removeprefix("BRIGADE_").lower() in args, f"{name}: nothing reads {var}"


def test_secrets_come_from_variables(raw_services: dict[str, Any]) -> None:
    """Every password, token and key in the file is a variable with a default, never a literal."""
    for name, svc in raw_services.items():
        for var, raw in (svc.get("environment") or {}).items():
            if re.search(r"PASSWORD|TOKEN|SECRET|API_KEY", var):
                if var == "BRIGADE_API_KEY":  # optional: empty means no key
                    assert raw == "${BRIGADE_API_KEY:-}", f"{name}: {var}"
                else:
                    _variable(raw, f"{name}: {var}")


def test_env_file_is_not_committed() -> None:
    """Operators put their secrets in .env next to docker-compose.yml; git and the image build both skip it."""
    for ignore in (".gitignore", ".dockerignore"):
        lines = {line.strip() for line in (ROOT / ignore).read_text().splitlines()}
        assert lines & {".env", "/.env"}, f"{ignore} should list .env"


# ---- what is published -------------------------------------------------------------------------------------------


def _ports(svc: dict[str, Any]) -> list[tuple[str, str]]:
    """(host IP, container port) of each published port; IP "" for every interface. Short syntax
    ("[IP:][HOST:]CONTAINER[/proto]") or long ({target, published, host_ip})."""
    out = []
    for entry in svc.get("ports", []):
        if isinstance(entry, dict):
            out.append((str(entry.get("host_ip", "")), str(entry["target"])))
            continue
        parts = str(entry).split("/")[0].rsplit(":", 2)
        ip = parts[0] if len(parts) == 3 else ""
        out.append((ip, parts[-1]))
    return out


def test_port_parsing() -> None:
    svc = {"ports": ["8000:8000", "127.0.0.1:9090:9090", "9100", "127.0.0.1:4318:4318/tcp",
                     {"target": 3000, "published": 3000, "host_ip": "127.0.0.1"}, {"target": 1, "published": 1}]}
    assert _ports(svc) == [("", "8000"), ("127.0.0.1", "9090"), ("", "9100"), ("127.0.0.1", "4318"),
                           ("127.0.0.1", "3000"), ("", "1")]


def test_only_the_api_is_published_on_every_interface(services: dict[str, Any]) -> None:
    everywhere = {(name, port) for name, svc in services.items() for ip, port in _ports(svc)
                  if ip not in LOOPBACK}
    assert everywhere == {("gateway", "8000")}, "publish anything but the API on 127.0.0.1 only"
    for svc in services.values():
        assert all(ip in ("", "0.0.0.0", *LOOPBACK) for ip, _ in _ports(svc))


def test_grafana_is_not_anonymous_admin(services: dict[str, Any], raw_services: dict[str, Any]) -> None:
    env = services["grafana"]["environment"]
    if str(env.get("GF_AUTH_ANONYMOUS_ENABLED", "false")).lower() == "true":
        assert env.get("GF_AUTH_ANONYMOUS_ORG_ROLE", "Viewer") == "Viewer", "anonymous users may only view"
        assert all(ip in LOOPBACK for ip, _ in _ports(services["grafana"])), "anonymous access: localhost only"
    assert "GF_AUTH_DISABLE_LOGIN_FORM" not in env and "GF_AUTH_PROXY_ENABLED" not in env
    variable, default = _variable(raw_services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"], "grafana")
    assert default != "admin", "not Grafana's own default"
