"""The observability files in deploy/ against the code and docker-compose.yml: every series the Grafana dashboard
queries is one the code exports (under prometheus_client's naming rules), the collector forwards OTLP traces to
Jaeger, Prometheus scrapes what the compose file serves, and every Brigade service is told where to send its spans.
(test_compose.py checks the commands themselves; CI also runs `docker-compose config -q`.)"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from compose_file import load_compose

from brigade.cli import parser

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "libs" / "brigade"
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "brigade.json"
BRIGADE_SERVICES = ("gateway", "router", "prefill", "decode")

METRIC_NAME = re.compile(r"^(?:vllm|brigade):[A-Za-z_][A-Za-z0-9_:]*$")
METRIC_IN_PROMQL = re.compile(r"(?<![\w:])((?:vllm|brigade):[A-Za-z_][A-Za-z0-9_:]*)")
CONSTRUCTORS = {
    "Counter": "counter", "Gauge": "gauge", "Histogram": "histogram", "Summary": "summary", "Info": "info",
    "Enum": "stateset", "CounterMetricFamily": "counter", "GaugeMetricFamily": "gauge",
    "HistogramMetricFamily": "histogram", "SummaryMetricFamily": "summary", "InfoMetricFamily": "info",
    "StateSetMetricFamily": "stateset",
}
KINDS = {"counter", "gauge", "histogram", "summary", "info", "stateset"}


# ---- the metric families the code defines ------------------------------------------------------------------------


def _module_strings(tree: ast.Module) -> dict[str, str]:
    """Module-level `NAME = "..."` constants, for `Counter(TOKENS_METRIC, ...)`."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            out.update({t.id: node.value.value for t in node.targets if isinstance(t, ast.Name)})
    return out


def _imported_strings(tree: ast.Module, constants: dict[str, dict[str, str]]) -> dict[str, str]:
    """`from brigade.x import NAME` of a string constant defined in brigade.x."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("brigade"):
            module = constants.get(node.module, {})
            out.update({(a.asname or a.name): module[a.name] for a in node.names if a.name in module})
    return out


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def defined_metrics() -> tuple[dict[str, str], set[str]]:
    """({family name: kind}, {metric-like names whose kind the scan could not tell}) from the source of brigade.

    A family is found where a prometheus_client constructor (Counter, HistogramMetricFamily, ...) gets its name as a
    string literal or a module constant, or in a tuple literal such as telemetry.ENGINE_METRICS that holds the name
    and its kind ("gauge", "counter", ...). Any other `vllm:...`/`brigade:...` literal is returned as unclassified.
    """
    trees = {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(SRC.rglob("*.py"))}
    constants = {mod: _module_strings(tree) for mod, tree in trees.items()}
    kinds: dict[str, str] = {}
    seen: set[str] = set()

    def add(name: str, kind: str) -> None:
        base = name[: -len("_total")] if kind == "counter" and name.endswith("_total") else name
        assert kinds.setdefault(base, kind) == kind, f"{base} defined as both {kinds[base]} and {kind}"

    for mod, tree in trees.items():
        names = {**_imported_strings(tree, constants), **constants[mod]}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and METRIC_NAME.match(node.value):
                seen.add(node.value)
            elif isinstance(node, ast.Call):
                func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
                if func not in CONSTRUCTORS:
                    continue
                arg = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "name"), None)
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    name = arg.value
                elif isinstance(arg, ast.Name):
                    name = names.get(arg.id, "")
                else:
                    continue
                if METRIC_NAME.match(name):
                    add(name, CONSTRUCTORS[func])
            elif isinstance(node, ast.Tuple) and all(isinstance(e, ast.Constant) for e in node.elts) and node.elts:
                values = [e.value for e in node.elts]
                tags = [v for v in values[1:] if v in KINDS]
                if isinstance(values[0], str) and METRIC_NAME.match(values[0]) and len(tags) == 1:
                    add(values[0], tags[0])
    unclassified = {n for n in seen if n not in kinds and n.removesuffix("_total") not in kinds}
    return kinds, unclassified


def exported_series(name: str, kind: str | None) -> set[str]:
    """The sample names prometheus_client writes for a family (kind None: any of them)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
        "stateset": ("",),
    }
    if kind is None:
        return {name + s for ss in suffixes.values() for s in ss}
    return {name + s for s in suffixes[kind]}


@pytest.fixture(scope="module")
def code_metrics() -> tuple[dict[str, str], set[str]]:
    return defined_metrics()


@pytest.fixture(scope="module")
def known_series(code_metrics: tuple[dict[str, str], set[str]]) -> set[str]:
    kinds, unclassified = code_metrics
    series = {s for name, kind in kinds.items() for s in exported_series(name, kind)}
    return series | {s for name in unclassified for s in exported_series(name, None)}


def test_source_scan_matches_the_registries(code_metrics: tuple[dict[str, str], set[str]]) -> None:
    """The scan above agrees with what the gateway, router and engine collectors really register."""
    from brigade.services.gateway import Metrics
    from brigade.services.router import RouterMetrics
    from brigade.telemetry import ENGINE_METRICS

    kinds, _ = code_metrics
    real = {}
    for registry in (Metrics("demo").registry, RouterMetrics().registry):
        real.update({family.name: family.type for family in registry.collect()})
    real.update({name: kind for name, _, _, kind in ENGINE_METRICS})
    assert real and all(kinds.get(name) == kind for name, kind in real.items()), {
        name: (kind, kinds.get(name)) for name, kind in real.items() if kinds.get(name) != kind}
    assert kinds.get("brigade:expert_tokens") == "counter", "found through the TOKENS_METRIC constant"


# ---- the dashboard -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # panels inside a collapsed row
    return out


def promql(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets and variable queries."""
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def test_dashboard_queries_only_series_the_code_exports(dashboard: dict[str, Any], known_series: set[str]) -> None:
    used = {m for expr in promql(dashboard) for m in METRIC_IN_PROMQL.findall(expr)}
    assert used, "no vllm:/brigade: series found in the dashboard"
    unknown = sorted(used - known_series)
    # A bare counter name (vllm:prompt_tokens) is the usual mistake: prometheus_client exports it as ..._total.
    assert not unknown, f"series no code exports (check _total/_bucket suffixes): {unknown}"


def test_dashboard_covers_the_design(dashboard: dict[str, Any]) -> None:
    text = "\n".join(promql(dashboard))
    for name in ("vllm:e2e_request_latency_seconds_bucket", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:inter_token_latency_seconds_bucket", "vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
                 "vllm:num_preemptions_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "brigade:router_", "brigade:expert_", "brigade:kv_transfer_"):
        assert name in text, f"no panel queries {name}"
    for expr in promql(dashboard):
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        assert "histogram_quantile" not in expr or "_bucket" in expr, expr


def test_dashboard_uses_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36
    [ds_var] = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert ds_var["query"] == "prometheus"
    ref = {"type": "prometheus", "uid": "${" + ds_var["name"] + "}"}
    panels = _panels(dashboard)
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["targets"] and p["datasource"] == ref, p["title"]
        assert all(t.get("datasource", ref) == ref and t["refId"] for t in p["targets"]), p["title"]
    sources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/brigade.yml").read_text())["datasources"]
    [prom] = [s for s in sources if s["type"] == "prometheus"]
    assert prom["uid"] == ds_var["current"]["value"], "the variable defaults to the provisioned Prometheus"
    assert urlsplit(prom["url"]).hostname == "prometheus"


# ---- docker-compose.yml and the files it mounts ------------------------------------------------------------------


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return dict(load_compose()["services"])


def _mounts(svc: dict[str, Any]) -> dict[str, Path]:
    """Bind mounts of files from the repository: {container path: host path}."""
    out = {}
    for v in svc.get("volumes", []):
        source, target = v.split(":")[:2]
        if source.startswith("./"):
            out[target] = ROOT / source
    return out


def _published(svc: dict[str, Any]) -> set[int]:
    """Host ports of "HOST:CONTAINER", "IP:HOST:CONTAINER" or "PORT" entries."""
    out = set()
    for entry in svc.get("ports", []):
        parts = str(entry).split("/")[0].split(":")
        out.add(int(parts[-2] if len(parts) > 1 else parts[0]))
    return out


def _brigade_services(services: dict[str, Any]) -> list[str]:
    names = [n for n, s in services.items() if str(s.get("image", "")).startswith("brigade") or "build" in s]
    assert set(BRIGADE_SERVICES) <= set(names)
    return names


def test_observability_services(services: dict[str, Any]) -> None:
    for name, port in (("otel-collector", None), ("jaeger", 16686), ("prometheus", 9090), ("grafana", 3000)):
        svc = services[name]
        repo, _, tag = svc["image"].rpartition(":")
        assert repo and tag and tag != "latest", f"{name}: pin the image tag"
        if port:
            assert port in _published(svc), f"{name} should publish {port}"
        for target, source in _mounts(svc).items():
            assert source.exists(), f"{name} mounts {source}, which does not exist"
            assert target.startswith("/"), target


def test_every_brigade_service_sends_traces(services: dict[str, Any]) -> None:
    names = set()
    for name in _brigade_services(services):
        env = services[name]["environment"]
        endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert endpoint.scheme in ("http", "https") and endpoint.hostname in services, f"{name}: {endpoint}"
        assert endpoint.port == {"http/protobuf": 4318, "grpc": 4317}[env["OTEL_EXPORTER_OTLP_PROTOCOL"]], name
        assert env.get("OTEL_SDK_DISABLED", "false").lower() != "true", name
        assert env["OTEL_SERVICE_NAME"] == f"brigade-{name}"
        names.add(env["OTEL_SERVICE_NAME"])
    assert len(names) == len(_brigade_services(services)), "one service name per service"


@pytest.fixture(scope="module")
def collector(services: dict[str, Any]) -> dict[str, Any]:
    svc = services["otel-collector"]
    [config_arg] = [a for a in svc["command"] if a.startswith("--config")]
    path = config_arg.split("=", 1)[1]
    assert _mounts(svc)[path] == DEPLOY / "otel-collector.yaml", "the collector reads deploy/otel-collector.yaml"
    return yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())


def test_collector_forwards_otlp_traces_to_jaeger(collector: dict[str, Any], services: dict[str, Any]) -> None:
    traces = collector["service"]["pipelines"]["traces"]
    assert "otlp" in traces["receivers"] and "batch" in traces["processors"]
    for kind in ("receivers", "processors", "exporters"):
        assert set(traces[kind]) <= set(collector[kind]), f"{kind} used in the pipeline but not configured"
    assert set(collector["service"].get("extensions", [])) <= set(collector.get("extensions") or {})
    protocols = collector["receivers"]["otlp"]["protocols"]
    # Since collector 0.104 a receiver without an endpoint listens on localhost only: other containers get nothing.
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317" and protocols["http"]["endpoint"] == "0.0.0.0:4318"
    jaeger = [e for e in traces["exporters"] if e.split("/")[0] == "otlp"
              and collector["exporters"][e]["endpoint"].split(":")[0] == "jaeger"]
    assert jaeger == ["otlp/jaeger"]
    exporter = collector["exporters"]["otlp/jaeger"]
    assert exporter["endpoint"] == "jaeger:4317" and exporter["tls"]["insecure"] is True
    assert "jaeger" in services and "debug" in collector["exporters"]


def test_brigade_endpoint_reaches_the_collector(collector: dict[str, Any], services: dict[str, Any]) -> None:
    protocols = collector["receivers"]["otlp"]["protocols"]
    for name in BRIGADE_SERVICES:
        endpoint = urlsplit(services[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert endpoint.hostname == "otel-collector" and f"0.0.0.0:{endpoint.port}" in (
            protocols["grpc"]["endpoint"], protocols["http"]["endpoint"])


@pytest.fixture(scope="module")
def prometheus(services: dict[str, Any]) -> dict[str, Any]:
    assert _mounts(services["prometheus"])["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus.yml"
    return yaml.safe_load((DEPLOY / "prometheus.yml").read_text())


def _targets(job: dict[str, Any]) -> set[tuple[str, int]]:
    """(host, port) of a job's static targets and DNS names."""
    out = set()
    for static in job.get("static_configs", []):
        for target in static["targets"]:
            host, port = target.rsplit(":", 1)
            out.add((host, int(port)))
    for dns in job.get("dns_sd_configs", []):
        assert dns.get("type", "SRV") == "A", "compose's DNS answers A records (SRV needs no port)"
        out.update((name, int(dns["port"])) for name in dns["names"])
    return out


def test_prometheus_scrapes_what_compose_serves(prometheus: dict[str, Any], services: dict[str, Any]) -> None:
    jobs = prometheus["scrape_configs"]
    assert len({j["job_name"] for j in jobs}) == len(jobs)
    scraped = {t: j.get("metrics_path", "/metrics") for j in jobs for t in _targets(j)}
    gw = parser().parse_args(services["gateway"]["command"])
    assert scraped.get(("gateway", gw.port)) == "/metrics", "the gateway serves /metrics on its API port"
    for name in ("router", "prefill", "decode"):
        port = parser().parse_args(services[name]["command"]).metrics_port
        assert port, f"{name}: give it --metrics-port so it serves /metrics"
        assert scraped.get((name, port)) == "/metrics", f"Prometheus does not scrape {name}:{port}"
    for host, _ in scraped:
        assert host in services or host == "localhost", f"Prometheus scrapes {host}, which is no compose service"


def test_grafana_provisioning(services: dict[str, Any]) -> None:
    mounts = _mounts(services["grafana"])
    assert mounts["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"
    [provider] = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/brigade.yml").read_text())["providers"]
    dashboards = {t: s for t, s in mounts.items() if t.startswith(provider["options"]["path"].rstrip("/") + "/")}
    assert DASHBOARD in dashboards.values(), "the dashboard is mounted where the provider reads dashboards"
    home = services["grafana"]["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home is None or mounts.get(home) == DASHBOARD
