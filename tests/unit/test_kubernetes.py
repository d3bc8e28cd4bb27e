"""deploy/kubernetes/ against the Kubernetes API schemas and the CLI it drives: every object validates (strict: no
unknown field) with kubernetes-validate, every Brigade container's args parse with `brigade`'s own parser and its
BRIGADE_* variables are ones the code reads, NATS is a 3-server cluster with the same users and permissions as
deploy/nats/nats.conf and `brigade up`, every password comes from the Secret, and the pods are sized and locked
down as the manifests' comments say. (test_compose.py checks docker-compose.yml the same way.)

The base is rendered with `kubectl kustomize` where kubectl is installed, else by reading the files its
kustomization.yaml lists (the manifests use no kustomize feature but `namespace`)."""

from __future__ import annotations

import argparse
import functools
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_file import VARIABLE, Ref, load_compose_raw, load_nats_conf, parse_nats_conf

from brigade.cli import parser
from brigade.nats_server import CLEARED_ENV, PREFIXED, ROLES, _role_permissions

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
MONITORING = K8S / "monitoring"
SECRET_EXAMPLE = K8S / "secret.example.yaml"
SECRET = "brigade-secrets"
IMAGE = "brigade"
# Oldest and newest Kubernetes the objects must be valid for (1.28: the experts' pod-index label).
VERSIONS = ("1.28", kubernetes_validate.latest_version())
COMPONENTS = ("gateway", "router", "prefill", "decode", "experts")
ROLE = {"gateway": "gateway", "router": "router", "prefill": "worker", "decode": "worker", "experts": "experts"}
MODEL_PROCESSES = ("prefill", "decode", "experts")  # run torch: --threads = OMP_NUM_THREADS = the CPUs they get
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PriorityClass"}
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|API_KEY|CREDS|NKEY")


# ---- loading -----------------------------------------------------------------------------------------------------


def _kustomization(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load((path / "kustomization.yaml").read_text()))


def _read_listed(path: Path) -> list[dict[str, Any]]:
    """What `kubectl kustomize path` gives for a kustomization that lists plain files and sets a namespace."""
    kust = _kustomization(path)
    assert set(kust) <= {"apiVersion", "kind", "namespace", "resources"}, \
        "the manifests use a kustomize feature this fallback does not render: teach _read_listed, or drop it"
    out = []
    for name in kust["resources"]:
        for obj in yaml.safe_load_all((path / name).read_text()):
            if obj:
                if "namespace" in kust and obj["kind"] not in CLUSTER_SCOPED:
                    obj["metadata"]["namespace"] = kust["namespace"]
                out.append(obj)
    return out


@functools.cache
def _kubectl_render(path: Path) -> tuple[dict[str, Any], ...] | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    proc = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {path}: {proc.stderr}"
    return tuple(obj for obj in yaml.safe_load_all(proc.stdout) if obj)


def render(path: Path) -> list[dict[str, Any]]:
    rendered = _kubectl_render(path)
    return list(rendered) if rendered is not None else _read_listed(path)


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return render(K8S)


@pytest.fixture(scope="module")
def monitors() -> list[dict[str, Any]]:
    return render(MONITORING)


@pytest.fixture(scope="module")
def secret_example() -> dict[str, Any]:
    [secret] = [obj for obj in yaml.safe_load_all(SECRET_EXAMPLE.read_text()) if obj]
    return dict(secret)


def _by(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _workloads(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] in WORKLOADS}


def _containers(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(workload name, pod spec, container) of every container, init containers included."""
    for name, w in _workloads(objects).items():
        pod = w["spec"]["template"]["spec"]
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            yield name, pod, c


def _brigade(objects: list[dict[str, Any]]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Workload name -> (pod spec, container) of each container running the Brigade image."""
    out = {}
    for name, pod, c in _containers(objects):
        if c["image"].split("@")[0].rsplit(":", 1)[0] == IMAGE:
            assert name not in out, f"{name}: one Brigade container per pod"
            out[name] = (pod, c)
    return out


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    env = {e["name"]: e for e in container.get("env", [])}
    assert len(env) == len(container.get("env", [])), f"{container['name']}: a variable is set twice"
    return env


def _value(container: dict[str, Any], name: str) -> str | None:
    entry = _env(container).get(name)
    return None if entry is None else entry.get("value")


def _secret_key(entry: dict[str, Any]) -> tuple[str, str, bool]:
    ref = entry["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"], bool(ref.get("optional", False))


def _port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"{container['name']}: no port named {port}"
    return named[port]


def _cpu(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


_BYTES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def _bytes(quantity: str | int) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?)?", str(quantity))
    assert m, f"not a memory quantity: {quantity!r}"
    return int(float(m.group(1)) * _BYTES.get(m.group(2) or "", 1))


# ---- the CLI -----------------------------------------------------------------------------------------------------


@functools.cache
def _cli() -> argparse.ArgumentParser:
    return parser()


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    [sub] = [a for a in _cli()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _parse(args: list[str]) -> argparse.Namespace:
    try:
        return _cli().parse_args(args)
    except SystemExit as e:  # argparse prints the reason to stderr
        pytest.fail(f"`brigade {' '.join(args)}` does not parse (exit {e.code})")


# ---- the render itself -------------------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    """Every manifest is applied by `kubectl apply -k`, but the Secret's placeholders (which would reset real
    passwords on each apply) and the CRD-kind monitors (their own kustomization: plain clusters lack the CRD)."""
    listed = set(_kustomization(K8S)["resources"])
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == files - {SECRET_EXAMPLE.name}
    assert _kustomization(K8S)["namespace"] == "brigade"
    assert set(_kustomization(MONITORING)["resources"]) == {p.name for p in MONITORING.glob("*.yaml")} - {
        "kustomization.yaml"}


def test_fallback_renders_as_kubectl() -> None:
    rendered = _kubectl_render(K8S)
    if rendered is None:
        pytest.skip("kubectl is not installed")
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(rendered, key=key) == sorted(_read_listed(K8S), key=key)
    assert list(_kubectl_render(MONITORING) or ()) == _read_listed(MONITORING)


def test_every_object_validates(objects: list[dict[str, Any]], secret_example: dict[str, Any]) -> None:
    """Against the Kubernetes OpenAPI schemas, strict: a misspelt or misplaced field fails here, not at apply."""
    errors = []
    for obj in [*objects, secret_example]:
        for version in VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                where = ".".join(map(str, e.path))
                errors.append(f"{obj['kind']}/{obj['metadata']['name']} ({version}) {where}: {e.message}")
    assert not errors, "\n".join(errors)


def test_base_is_core_kinds_only(objects: list[dict[str, Any]]) -> None:
    """`kubectl apply -k deploy/kubernetes` works on a cluster without CRDs (a CRD kind would also have no schema
    in the test above)."""
    for obj in objects:
        assert not obj["apiVersion"].startswith("monitoring.coreos.com"), obj["kind"]
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), "an object is defined twice"
    for obj in objects:
        expected = None if obj["kind"] in CLUSTER_SCOPED else "brigade"
        assert obj["metadata"].get("namespace") == expected, obj["metadata"]["name"]
    assert _by(objects, "Namespace").keys() == {"brigade"}


def test_selectors_match(objects: list[dict[str, Any]]) -> None:
    """Each workload selects its own pods, each Service some pods and their named ports, the disruption budget the
    NATS pods (the schemas check none of this)."""
    templates = {}
    for name, w in _workloads(objects).items():
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert w["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        templates[name] = (labels, w["spec"]["template"]["spec"]["containers"])
    for name, svc in _by(objects, "Service").items():
        chosen = [cs for labels, cs in templates.values() if svc["spec"]["selector"].items() <= labels.items()]
        assert chosen, f"Service {name} selects no pods"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for containers in chosen:
                assert any(p["containerPort"] == target if isinstance(target, int) else p.get("name") == target
                           for c in containers for p in c.get("ports", [])), f"Service {name}: no port {target}"
    for name, pdb in _by(objects, "PodDisruptionBudget").items():
        sel = pdb["spec"]["selector"]["matchLabels"]
        assert any(sel.items() <= labels.items() for labels, _ in templates.values()), name


# ---- Brigade containers against the CLI --------------------------------------------------------------------------


def test_every_component_runs(objects: list[dict[str, Any]]) -> None:
    brigade = _brigade(objects)
    assert set(brigade) == set(COMPONENTS)
    for name, (_, c) in brigade.items():
        assert "command" not in c, f"{name}: the image's ENTRYPOINT is `brigade`; give the subcommand in args"
        assert c["args"][0] == name, f"{name} runs `brigade {c['args'][0]}`"


@pytest.mark.parametrize("name", COMPONENTS)
def test_args_parse_with_the_cli(objects: list[dict[str, Any]], name: str) -> None:
    _, c = _brigade(objects)[name]
    args = c["args"]
    assert all(isinstance(a, str) for a in args), f"{name}: every arg a string (quote numbers)"
    assert args[0] in _subparsers(), f"{name}: `brigade {args[0]}` is not a subcommand"
    # Exact flag names: argparse would also take an abbreviation, which a new flag can make ambiguous later.
    known = set(_subparsers()[args[0]]._option_string_actions)
    for arg in args[1:]:
        if arg.startswith("--"):
            assert arg.split("=", 1)[0] in known, f"{name}: `brigade {args[0]}` has no flag {arg}"
    # $(VAR) in args is expanded by Kubernetes from the container's variables, and silently left as is otherwise.
    for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", " ".join(args)):
        assert ref in _env(c), f"{name}: args use $({ref}), which the container does not set"
    parsed = _parse(args)
    assert parsed.command == name
    assert parsed.nats == "nats://nats:4222", "services reach NATS through its client Service"
    assert "@" not in parsed.nats, "credentials go in the environment, not on the command line"


@pytest.mark.parametrize("name", COMPONENTS)
def test_brigade_variables_are_ones_the_code_reads(objects: list[dict[str, Any]], name: str) -> None:
    """Each BRIGADE_* variable is a flag default (BRIGADE_<FLAG>), a bus setting or the log level: a misspelt one
    would be ignored in silence."""
    _, c = _brigade(objects)[name]
    flags = vars(_parse(c["args"]))
    for var in _env(c):
        if var.startswith("BRIGADE_") and var not in CLEARED_ENV and var != "BRIGADE_LOG":
            assert var.removeprefix("BRIGADE_").lower() in flags, f"{name}: nothing reads {var}"


@pytest.mark.parametrize("name", COMPONENTS)
def test_every_service_gets_its_roles_credentials(objects: list[dict[str, Any]], name: str) -> None:
    """The role's user, its password from the Secret under the variable docker-compose.yml reads it from, and the
    inbox prefix its permissions allow, as compose sets them."""
    _, c = _brigade(objects)[name]
    env, role = _env(c), ROLE[name]
    assert _value(c, "BRIGADE_NATS_USER") == role
    secret, key, optional = _secret_key(env["BRIGADE_NATS_PASSWORD"])
    assert (secret, key, optional) == (SECRET, f"BRIGADE_NATS_{role.upper()}_PASSWORD", False)
    prefix = _value(c, "BRIGADE_NATS_INBOX_PREFIX") or ""
    assert prefix == (f"_INBOX.{role}" if role in PREFIXED else "")
    assert not any(v in env for v in ("BRIGADE_NATS_TOKEN", "BRIGADE_NATS_CREDS", "BRIGADE_NATS_NKEY"))
    compose = load_compose_raw()["services"].get(name)
    if compose is not None:  # compose runs all but the expert shards
        cenv = compose["environment"]
        assert cenv["BRIGADE_NATS_USER"] == role
        assert cenv.get("BRIGADE_NATS_INBOX_PREFIX", "") == prefix
        m = VARIABLE.fullmatch(cenv["BRIGADE_NATS_PASSWORD"])
        assert m and m.group(1) == key, "the Secret's key is the variable compose reads the password from"


def test_gateway(objects: list[dict[str, Any]]) -> None:
    _, c = _brigade(objects)["gateway"]
    args = _parse(c["args"])
    assert args.host == "0.0.0.0" and args.port == 8000
    assert _port(c, "http") == 8000
    ready, live = c["readinessProbe"], c["livenessProbe"]
    assert ready["httpGet"]["path"] == "/health" and _port(c, ready["httpGet"]["port"]) == args.port
    # /health is 503 while no worker serves: it must not restart the gateway.
    assert live.get("httpGet", {}).get("path") != "/health"
    assert _port(c, (live.get("tcpSocket") or live["httpGet"])["port"]) == args.port
    svc = _by(objects, "Service")["gateway"]
    [port] = svc["spec"]["ports"]
    assert port["port"] == 8000 and _port(c, port["targetPort"]) == args.port
    secret, key, optional = _secret_key(_env(c)["BRIGADE_API_KEY"])
    assert (secret, key, optional) == (SECRET, "BRIGADE_API_KEY", True), "the API key is optional"


@pytest.mark.parametrize("name", ["prefill", "decode"])
def test_workers(objects: list[dict[str, Any]], name: str) -> None:
    _, c = _brigade(objects)[name]
    args = _parse(c["args"])
    assert "--worker-id" not in c["args"], "replicas need distinct ids"
    assert args.kv_transport == "nats", "pods share no /dev/shm"
    assert args.model == "/models/demo" == _parse(_brigade(objects)["gateway"][1]["args"]).model
    assert args.kv_cache_bytes > 0, "the automatic KV size follows the node's memory, not the pod's limit"
    assert args.kv_cache_bytes < _bytes(c["resources"]["limits"]["memory"]) / 2
    assert args.metrics_port and _port(c, "metrics") == args.metrics_port
    assert c["readinessProbe"]["tcpSocket"]["port"] == "metrics"


@pytest.mark.parametrize("name", MODEL_PROCESSES)
def test_threads_match_the_cpus(objects: list[dict[str, Any]], name: str) -> None:
    """torch threads = OpenMP threads = the cores the pod gets (request = limit: the Guaranteed QoS class)."""
    _, c = _brigade(objects)[name]
    threads = _parse(c["args"]).threads
    assert threads >= 1, f"{name}: without --threads a worker takes every core of the node"
    assert _value(c, "OMP_NUM_THREADS") == str(threads)
    assert "BRIGADE_THREADS" not in _env(c), "one source for the thread count: --threads"
    res = c["resources"]
    assert _cpu(res["requests"]["cpu"]) == _cpu(res["limits"]["cpu"]) == threads
    assert res["requests"]["memory"] == res["limits"]["memory"]


def test_decode_autoscaler(objects: list[dict[str, Any]]) -> None:
    [hpa] = _by(objects, "HorizontalPodAutoscaler").values()
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "decode")
    assert "decode" in _by(objects, "Deployment")
    assert "replicas" not in _by(objects, "Deployment")["decode"]["spec"], "the autoscaler owns decode's count"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    # The workers export vllm:num_requests_waiting (brigade.telemetry, read as text: importing it loads the
    # engine); the adapter's rule in the file's comment renames it.
    assert metric["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    assert '("vllm:num_requests_waiting", ' in (ROOT / "libs" / "brigade" / "telemetry.py").read_text()
    assert 'name: {matches: "^vllm:(.*)$", as: "vllm_${1}"}' in (K8S / "decode-hpa.yaml").read_text()


def test_experts_are_optional(objects: list[dict[str, Any]]) -> None:
    experts = _workloads(objects)["experts"]
    assert experts["kind"] == "StatefulSet", "each shard needs its own index"
    assert experts["spec"]["replicas"] == 0
    _, c = _brigade(objects)["experts"]
    shard = _parse(c["args"]).shard
    index, _, count = shard.partition("/")
    assert index == "$(SHARD_INDEX)" and count.isdigit()
    assert _env(c)["SHARD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['apps.kubernetes.io/pod-index']"


# ---- NATS ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nats(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return _by(objects, "StatefulSet")["nats"]


@pytest.fixture(scope="module")
def nats_container(nats: dict[str, Any]) -> dict[str, Any]:
    [c] = nats["spec"]["template"]["spec"]["containers"]
    return dict(c)


@pytest.fixture(scope="module")
def nats_conf(objects: list[dict[str, Any]], nats: dict[str, Any], nats_container: dict[str, Any]) -> dict[str, Any]:
    """The config file the server reads: the ConfigMap key mounted at its --config path."""
    command = nats_container["command"] + nats_container.get("args", [])
    [flag] = [a for a in command if a in ("-c", "--config", "-config")]
    path = Path(command[command.index(flag) + 1])
    pod = nats["spec"]["template"]["spec"]
    [mount] = [m for m in nats_container["volumeMounts"] if m["mountPath"] == str(path.parent)]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    config_map = _by(objects, "ConfigMap")[volume["configMap"]["name"]]
    return parse_nats_conf(config_map["data"][path.name])


def test_nats_is_a_cluster_of_three(objects: list[dict[str, Any]], nats: dict[str, Any],
                                    nats_conf: dict[str, Any]) -> None:
    spec = nats["spec"]
    assert spec["replicas"] == 3
    assert spec["podManagementPolicy"] == "Parallel", "the servers form the cluster together"
    headless = _by(objects, "Service")[spec["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    cluster = nats_conf["cluster"]
    assert cluster["name"]
    routes = cluster["routes"]
    expected = {f"nats://{nats['metadata']['name']}-{i}.{spec['serviceName']}:{cluster['port']}"
                for i in range(spec["replicas"])}
    assert set(routes) == expected, "every server routes to every pod of the StatefulSet"
    assert isinstance(nats_conf["server_name"], Ref), "each server names itself after its pod"


def test_nats_ports_and_probes(objects: list[dict[str, Any]], nats_container: dict[str, Any],
                               nats_conf: dict[str, Any]) -> None:
    c = nats_container
    assert _port(c, "client") == nats_conf.get("port", 4222) == 4222
    assert _port(c, "cluster") == nats_conf["cluster"]["port"]
    assert _port(c, "monitor") == nats_conf["http_port"] == 8222
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"].split("?")[0] == "/healthz" and _port(c, get["port"]) == 8222, probe
        # Not the JetStream quorum: core NATS, all Brigade needs, works on a server left alone.
        assert get["path"].split("?")[1] in ("js-enabled-only=true", "js-server-only=true"), probe
    client = _by(objects, "Service")["nats"]
    assert [p["port"] for p in client["spec"]["ports"]] == [4222]
    policy = _by(objects, "NetworkPolicy")["nats"]
    open_ports = {p["port"] for rule in policy["spec"]["ingress"] if "from" not in rule for p in rule["ports"]}
    assert "cluster" not in open_ports and 6222 not in open_ports, "only NATS pods may open a route"


def test_nats_has_jetstream_on_a_volume(nats: dict[str, Any], nats_container: dict[str, Any],
                                        nats_conf: dict[str, Any]) -> None:
    store = nats_conf["jetstream"]["store_dir"]
    [mount] = [m for m in nats_container["volumeMounts"] if m["mountPath"] == store]
    claims = {t["metadata"]["name"] for t in nats["spec"]["volumeClaimTemplates"]}
    assert mount["name"] in claims


def test_nats_users_are_the_roles_with_their_permissions(nats_conf: dict[str, Any]) -> None:
    """The same users and subjects as `brigade up`'s embedded server and deploy/nats/nats.conf."""
    auth = nats_conf["authorization"]
    assert set(auth) <= {"users", "timeout"}, "users only: a global token or password would open every subject"
    users = {u["user"]: u for u in auth["users"]}
    assert len(users) == len(auth["users"]) and set(users) == set(ROLES)
    expected = _role_permissions()
    for name, user in users.items():
        assert set(user) == {"user", "password", "permissions"}, name
        assert user["permissions"] == {**expected[name], "allow_responses": True}, name
    assert auth == load_nats_conf()["authorization"], "deploy/nats/nats.conf and the ConfigMap agree"


def test_nats_server_accepts_the_config(objects: list[dict[str, Any]], nats: dict[str, Any],
                                       nats_container: dict[str, Any], tmp_path: Path) -> None:
    """`nats-server -t` (parse and check, then exit) on the ConfigMap's file, with the variables the pod gets."""
    from brigade.nats_server import binary

    try:
        server = binary()
    except FileNotFoundError:
        pytest.skip("no nats-server binary")
    [volume] = [v for v in nats["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    [(name, text)] = _by(objects, "ConfigMap")[volume["configMap"]["name"]]["data"].items()
    (tmp_path / name).write_text(text)
    env = {var: f"{nats['metadata']['name']}-0" if "fieldRef" in e.get("valueFrom", {}) else f"pw{i}x"
           for i, (var, e) in enumerate(_env(nats_container).items())}
    proc = subprocess.run([str(server), "-t", "-c", str(tmp_path / name)], env={"PATH": "/usr/bin:/bin", **env},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_nats_passwords_come_from_the_secret(nats_container: dict[str, Any], nats_conf: dict[str, Any]) -> None:
    env = _env(nats_container)
    for user in nats_conf["authorization"]["users"]:
        password = user["password"]
        assert isinstance(password, Ref), f"{user['user']}: the password must be a $VARIABLE, not a literal"
        assert _secret_key(env[password.name]) == (SECRET, password.name, False)
    assert env[nats_conf["server_name"].name]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


# ---- secrets, resources, security --------------------------------------------------------------------------------


def test_no_secret_in_the_manifests(objects: list[dict[str, Any]], secret_example: dict[str, Any]) -> None:
    """Every secret-looking variable comes from the Secret, which only secret.example.yaml holds (placeholders),
    with exactly the keys the manifests read."""
    assert not _by(objects, "Secret"), "the Secret is the operator's to create"
    referenced = set()
    for name, _, c in _containers(objects):
        for var, entry in _env(c).items():
            if SECRET_NAME.search(var):
                assert "value" not in entry, f"{name}: {var} is a literal"
                secret, key, _ = _secret_key(entry)
                assert secret == SECRET
                referenced.add(key)
    assert secret_example["metadata"]["name"] == SECRET
    data = secret_example["stringData"]
    assert set(data) == referenced
    for key, value in data.items():
        assert value == "" or value.startswith("change-me"), f"{key}: placeholders only"
    assert len(set(data.values())) == len(data), "one password per role"
    for path in [*K8S.rglob("*.yaml")]:
        if path != SECRET_EXAMPLE:
            assert "change-me" not in path.read_text(), f"{path.name}: a placeholder password outside the Secret"


def test_every_container_has_requests(objects: list[dict[str, Any]]) -> None:
    for name, _, c in _containers(objects):
        res = c.get("resources", {})
        assert {"cpu", "memory"} <= set(res.get("requests", {})), f"{name}/{c['name']}: CPU and memory requests"
        assert "memory" in res.get("limits", {}), f"{name}/{c['name']}: a memory limit"
        assert _bytes(res["requests"]["memory"]) <= _bytes(res["limits"]["memory"])


def _dockerfile_user() -> tuple[int, str]:
    """The image's (uid, home) from the Dockerfile's useradd."""
    text = (ROOT / "Dockerfile").read_text()
    m = re.search(r"useradd\b[^\n]*--uid (\d+)[^\n]*--home-dir (\S+)", text)
    assert m, "the Dockerfile creates its user with useradd --uid ... --home-dir ..."
    return int(m.group(1)), m.group(2)


def test_pods_run_restricted(objects: list[dict[str, Any]]) -> None:
    """The Pod Security Standard the namespace enforces: non-root, no privilege escalation, no capabilities, the
    runtime's seccomp profile; and a read-only root filesystem."""
    assert _by(objects, "Namespace")["brigade"]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == \
        "restricted"
    for name, pod, c in _containers(objects):
        psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
        merged = {**psc, **csc}
        assert merged.get("runAsNonRoot") is True and merged.get("runAsUser", 0) > 0, name
        assert merged.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost"), name
        assert csc.get("allowPrivilegeEscalation") is False, name
        assert csc.get("capabilities", {}).get("drop") == ["ALL"] and not csc["capabilities"].get("add"), name
        assert csc.get("readOnlyRootFilesystem") is True, name
        assert pod.get("automountServiceAccountToken") is False, f"{name}: no Kubernetes API access is needed"
        for volume in pod.get("volumes", []):
            assert set(volume) - {"name"} <= {"configMap", "secret", "emptyDir", "persistentVolumeClaim",
                                              "downwardAPI", "projected"}, f"{name}: {volume}"


def test_brigade_pods_write_only_to_empty_dirs(objects: list[dict[str, Any]]) -> None:
    """The image's user (a numeric uid: the kubelet cannot check a user name against runAsNonRoot), and writable
    /tmp (native kernels) and ~/.cache on a read-only root filesystem."""
    uid, home = _dockerfile_user()
    for name, (pod, c) in _brigade(objects).items():
        assert {**pod.get("securityContext", {}), **c.get("securityContext", {})}["runAsUser"] == uid, name
        assert c["imagePullPolicy"] == "IfNotPresent", f"{name}: `:latest` would otherwise always be pulled"
        empty = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        for path in ("/tmp", f"{home}/.cache"):
            assert path in mounts and mounts[path]["name"] in empty and not mounts[path].get("readOnly"), \
                f"{name}: {path}"
        assert "BRIGADE_CACHE_DIR" not in _env(c), "the image's cache holds the demo model"


# ---- monitoring ----------------------------------------------------------------------------------------------------


def test_pod_monitor_scrapes_every_brigade_pod(objects: list[dict[str, Any]], monitors: list[dict[str, Any]]) -> None:
    """A CRD kind, not in kubernetes-validate's schemas: checked by structure (monitoring.coreos.com/v1)."""
    [monitor] = monitors
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
    assert monitor["metadata"]["namespace"] == "brigade"
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels",
                         "sampleLimit", "targetLimit"}
    selector = spec["selector"]["matchLabels"]
    endpoints = spec["podMetricsEndpoints"]
    for ep in endpoints:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings",
                           "metricRelabelings", "honorLabels", "authorization"}, ep
        assert isinstance(ep["port"], str) and ep.get("path", "/metrics") == "/metrics"
        assert re.fullmatch(r"\d+[smh]", ep.get("interval", "30s"))
        for rule in ep.get("relabelings", []):
            assert set(rule) <= {"sourceLabels", "targetLabel", "regex", "replacement", "action", "separator"}
    ports = {ep["port"] for ep in endpoints}
    for name, (_, c) in _brigade(objects).items():
        labels = _workloads(objects)[name]["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{name} is not scraped"
        scraped = [p for p in c["ports"] if p["name"] in ports]
        assert scraped, f"{name}: no port the PodMonitor scrapes"
        args = _parse(c["args"])
        served = {args.port} if name == "gateway" else {args.metrics_port}  # where /metrics is
        assert {p["containerPort"] for p in scraped} == served, name
