"""Router logic without a network: liveness, booking, policies, disaggregation decisions, core split."""

from __future__ import annotations

import pytest

from brigade.cli import parser
from brigade.launcher import UpConfig, commands, split_cores
from brigade.protocol import WorkerStatus
from brigade.routing.fleet import Fleet
from brigade.routing.policy import Policy, decide


def _status(wid: str, role: str = "decode", running: int = 0, waiting: int = 0, **kw: object) -> WorkerStatus:
    return WorkerStatus(wid, role, "m", 16, 0, running=running, waiting=waiting, kv_total=100, **kw)  # type: ignore[arg-type]


def test_heartbeat_lapse_and_stopping_remove_workers() -> None:
    fleet = Fleet(heartbeat_timeout=3.0)
    fleet.update(_status("a"), now=0.0)
    fleet.update(_status("b"), now=2.0)
    assert [w.id for w in fleet.live(("decode",), now=2.5)] == ["a", "b"]
    assert fleet.purge(now=4.0) == ["a"]
    assert [w.id for w in fleet.live(("decode",), now=4.0)] == ["b"]
    fleet.update(_status("b", stopping=True), now=4.1)
    assert fleet.live(("decode",), now=4.1) == []


def test_least_loaded_books_at_decision_time() -> None:
    fleet = Fleet(3.0)
    for w in "abc":
        fleet.update(_status(w), now=0.0)
    policy = Policy("least_loaded")
    picks = []
    for _ in range(6):
        d = decide(fleet, policy, prompt_tokens=10, disagg_threshold=64, now=0.1)
        assert d is not None
        fleet.book(d.worker, 10)
        picks.append(d.worker)
    # Without booking, every decision would pick the same idle worker before the next report.
    assert sorted(picks) == ["a", "a", "b", "b", "c", "c"]
    fleet.update(_status("a", running=5), now=0.2)  # a fresh report replaces a's bookings
    assert fleet.workers["a"].booked_requests == 0


def test_round_robin_cycles_and_skips_excluded() -> None:
    fleet = Fleet(3.0)
    for w in "abc":
        fleet.update(_status(w, running=100 if w == "a" else 0), now=0.0)
    policy = Policy("round_robin")
    assert [decide(fleet, policy, 1, 64, 0.0).worker for _ in range(4)] == ["a", "b", "c", "a"]  # type: ignore[union-attr]
    assert decide(fleet, policy, 1, 64, 0.0, exclude={"a", "b", "c"}) is None


def test_disaggregation_threshold() -> None:
    fleet = Fleet(3.0)
    fleet.update(_status("p0", "prefill"), 0.0)
    fleet.update(_status("d0", "decode", running=3), 0.0)
    fleet.update(_status("d1", "decode", running=1), 0.0)
    policy = Policy("least_loaded")
    long = decide(fleet, policy, prompt_tokens=500, disagg_threshold=64, now=0.0)
    assert long is not None and long.worker == "p0" and long.decode == "d1"
    short = decide(fleet, policy, prompt_tokens=10, disagg_threshold=64, now=0.0)
    assert short is not None and short.worker == "d1" and short.decode is None
    # Prefill pool gone: everything runs on decode workers.
    fleet.remove("p0")
    d = decide(fleet, policy, prompt_tokens=500, disagg_threshold=64, now=0.0)
    assert d is not None and d.decode is None and d.worker == "d1"


def test_no_worker_means_no_decision() -> None:
    fleet = Fleet(3.0)
    fleet.update(_status("p0", "prefill"), 0.0)
    assert decide(fleet, Policy("least_loaded"), 500, 64, 0.0) is None


def test_unknown_policy_rejected() -> None:
    with pytest.raises(ValueError, match="unknown routing policy"):
        Policy("random")


@pytest.mark.parametrize(("cores", "n", "want"), [
    ([0, 1], 1, [[0, 1]]),
    ([0, 1], 2, [[0], [1]]),
    ([0, 1], 3, [[0], [1], [0]]),
    ([0, 1, 2, 3, 4], 2, [[0, 1], [2, 3]]),
    ([0, 1], 0, []),
])
def test_split_cores(cores: list[int], n: int, want: list[list[int]]) -> None:
    assert split_cores(cores, n) == want


def test_up_commands_carry_tracing_and_metrics_ports() -> None:
    """`brigade up --otlp URL --metrics-port P`: every child exports traces there; the router serves /metrics on
    P and worker i (in start order) on P + 1 + i, each flag parsed by the child's own parser."""
    cfg = UpConfig(mode="disagg", prefill=1, decode=2, otlp="http://collector:4318", metrics_port=9100)
    cmds = commands(cfg, "nats://x", "/m")
    assert [name for name, _, _ in cmds] == ["router", "prefill-0", "decode-1", "decode-2", "gateway"]
    for name, argv, env in cmds:
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4318", name
        assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
        if name != "gateway":  # the gateway serves /metrics on its HTTP port
            args = parser().parse_args(argv[3:])
            assert args.metrics_port == 9100 + ["router", "prefill-0", "decode-1", "decode-2"].index(name)
    plain = commands(UpConfig(), "nats://x", "/m")
    assert not any("OTEL_EXPORTER_OTLP_ENDPOINT" in env or "--metrics-port" in argv for _, argv, env in plain)
