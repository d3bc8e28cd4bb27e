"""Three "hosts" on one machine: the gateway, the router and a three-node NATS cluster here, the prefill worker in a
network namespace of its own, the decode worker in another (each joined to this one by a veth pair, as by a NIC).
KV pages travel over the bus (`--kv-transport nats`). One NATS node is killed under 40 streams: every stream ends
with the text it has without the fault, and the cluster keeps serving."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import free_port, streams_under
from netns import Netns, NetnsUnavailable

from brigade.launcher import Up, UpConfig
from brigade.nats_server import NatsCluster

STREAMS = 40


@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[Netns, Netns]]:
    made: list[Netns] = []
    try:
        for subnet in ("10.78.0", "10.79.0"):
            made.append(Netns(subnet).create())
    except NetnsUnavailable as e:
        for ns in made:
            ns.remove()
        pytest.skip(f"no network namespaces: {e}")
    try:
        yield made[0], made[1]
    finally:
        for ns in made:
            ns.remove()


@pytest.fixture(scope="module")
def cluster() -> Iterator[NatsCluster]:
    c = NatsCluster(3, auth=False, host="0.0.0.0")  # reachable from the namespaces through their veth pairs
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def up(tiny_models: dict[str, Path], hosts: tuple[Netns, Netns], cluster: NatsCluster) -> Iterator[Up]:
    prefill_host, decode_host = hosts
    local = ",".join(f"nats://127.0.0.1:{n.port}" for n in cluster.nodes)

    def across(ns: Netns, first: int) -> str:
        """Every node as the namespace reaches it, `first` listed first (its "local" node)."""
        order = [cluster.nodes[first]] + [n for i, n in enumerate(cluster.nodes) if i != first]
        return ",".join(f"nats://{ns.host_ip}:{n.port}" for n in order)

    def wrap(name: str, argv: list[str]) -> list[str]:
        if name.startswith("prefill"):
            return prefill_host.wrap([across(prefill_host, 1) if a == local else a for a in argv])
        if name.startswith("decode"):
            return decode_host.wrap([across(decode_host, 2) if a == local else a for a in argv])
        return argv

    u = Up(UpConfig(model=str(tiny_models["llama"]), port=free_port(), mode="disagg", nats=local, kv_transport="nats",
                    disagg_threshold=4, worker_args=("--num-blocks", "512")), wrap=wrap)
    u.start(timeout=120)
    try:
        yield u
    finally:
        u.stop()


def _body(i: int, stream: bool) -> dict[str, object]:
    return {"model": "llama", "prompt": f"request {i} crosses three hosts and keeps going", "max_tokens": 32,
            "temperature": 0, "ignore_eos": True, "stream": stream}


def test_workers_run_in_their_namespaces(up: Up, hosts: tuple[Netns, Netns]) -> None:
    for name, ns in (("prefill-0", hosts[0]), ("decode-1", hosts[1])):
        argv, _ = up.argv[name]
        assert argv[:4] == ["ip", "netns", "exec", ns.name]
        assert f"nats://{ns.host_ip}:" in argv[argv.index("--nats") + 1]


def test_a_nats_node_killed_under_40_streams(up: Up, cluster: NatsCluster, node: int = 1) -> None:
    with httpx.Client(base_url=up.url, timeout=60) as client:
        reference = [client.post("/v1/completions", json=_body(i, False)).json()["choices"][0]["text"]
                     for i in range(STREAMS)]
    victim = cluster.nodes[node]

    def kill() -> None:
        assert victim.proc is not None
        victim.proc.kill()
        victim.proc.wait(timeout=10)

    try:
        texts, recovery = asyncio.run(streams_under(up.url, STREAMS, _body, kill))
        assert texts == reference  # 0 failed, text exact, with prefill and decode on other hosts
        assert recovery < 5.0, recovery
        assert not up.failed()
    finally:
        victim.restart()
