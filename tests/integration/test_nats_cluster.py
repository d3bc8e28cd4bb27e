"""`brigade up --nats-cluster 3`: three NATS servers routed into one cluster, every service given all three. A
node killed under 40 streams costs nothing: clients fail over, every stream ends with the text of a run without
faults, new requests are served, and the node comes back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import free_port, streams_under

from brigade.launcher import Up, UpConfig
from brigade.nats_server import NatsCluster

STREAMS = 40


@pytest.fixture(scope="module")
def up(tiny_models: dict[str, Path]) -> Iterator[Up]:
    with Up(UpConfig(model=str(tiny_models["llama"]), port=free_port(), nats_cluster=3,
                     worker_args=("--num-blocks", "512"))) as u:
        yield u


def _body(i: int, stream: bool) -> dict[str, object]:
    return {"model": "llama", "prompt": f"cluster request {i} goes on and on", "max_tokens": 48,
            "temperature": 0, "ignore_eos": True, "stream": stream}


def test_every_service_gets_every_node(up: Up) -> None:
    assert isinstance(up.nats, NatsCluster) and len(up.nats.nodes) == 3
    for name in ("gateway", "router", "decode-0"):
        argv, _ = up.argv[name]
        urls = argv[argv.index("--nats") + 1].split(",")
        assert urls == [n.url for n in up.nats.nodes]


def test_a_node_killed_under_40_streams(up: Up, node: int = 0) -> None:
    with httpx.Client(base_url=up.url, timeout=60) as client:
        reference = [client.post("/v1/completions", json=_body(i, False)).json()["choices"][0]["text"]
                     for i in range(STREAMS)]
    assert isinstance(up.nats, NatsCluster)
    victim = up.nats.nodes[node]

    def kill() -> None:
        assert victim.proc is not None
        victim.proc.kill()
        victim.proc.wait(timeout=10)

    texts, recovery = asyncio.run(streams_under(up.url, STREAMS, _body, kill))
    assert texts == reference
    assert recovery < 5.0, recovery
    assert up.failed() == [f"nats-{node}"]  # what `brigade up` restarts
    up.restart(f"nats-{node}")
    assert not up.failed()
    time.sleep(0.5)
    r = httpx.post(f"{up.url}/v1/completions", json={**_body(0, False), "max_tokens": 2}, timeout=30)
    assert r.status_code == 200
