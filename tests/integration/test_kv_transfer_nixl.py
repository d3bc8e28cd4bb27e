"""The nixl KV transport with real processes: two "hosts" joined by a veth pair, and workers killed mid-transfer."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import SubjectWatch, free_port, free_ports, latest, metric_samples
from netns import Netns, NetnsUnavailable

from brigade import protocol as P
from brigade.engine.engine import Engine, EngineConfig
from brigade.engine.sampling import SamplingParams
from brigade.launcher import Up, UpConfig
from brigade.nats_server import NatsServer

pytest.importorskip("nixl._api", reason="the nixl transport needs nixl-cu12 and nixl (brigade[nixl])")

PROMPT = "The quick brown fox jumps over the lazy dog and then"
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def reference(tiny_models: dict[str, Path]) -> Engine:
    return Engine(EngineConfig(model=str(tiny_models["llama"]), num_blocks=128))


def _want(reference: Engine, prompt: str, max_tokens: int = MAX_TOKENS) -> str:
    [out] = reference.generate([reference.tokenizer.encode(prompt)],
                               SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    return out.text


def _complete(url: str, prompt: str, stream: bool = False, max_tokens: int = MAX_TOKENS) -> str:
    body = {"model": "llama", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream}
    if not stream:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["text"])
    text = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                text += [c["text"] for c in event["choices"]]
    return "".join(text)


def _transfers(port: int) -> tuple[float, float]:
    """(bytes moved, failures) of the nixl transport on the prefill worker serving /metrics at `port`."""
    got = metric_samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
    return (got.get(("brigade:kv_transfer_bytes_total", "transport=nixl"), 0.0),
            got.get(("brigade:kv_transfer_failures_total", "transport=nixl"), 0.0))


def _tx_bytes(dev: str) -> int:
    return int(Path(f"/sys/class/net/{dev}/statistics/tx_bytes").read_text())


# ---- two hosts --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def netns() -> Iterator[Netns]:
    try:
        ns = Netns().create()
    except NetnsUnavailable as e:
        pytest.skip(f"no second network namespace: {e}")
    try:
        yield ns
    finally:
        ns.remove()


def test_parity_across_a_veth_pair(tiny_models: dict[str, Path], reference: Engine, netns: Netns) -> None:
    """Decode runs in its own network namespace; UCX may use tcp only, over the veth pair."""
    nats = NatsServer(host="0.0.0.0")
    url = nats.start()
    port = url.rsplit(":", 1)[1]

    def wrap(name: str, argv: list[str]) -> list[str]:
        if name.startswith("decode"):  # the other "host": NATS and the prefill worker are across the veth pair
            argv = [f"nats://{netns.host_ip}:{port}" if a == url else a for a in argv]
            return netns.wrap(["env", "UCX_TLS=tcp,self", f"UCX_NET_DEVICES={netns.peer_dev}", *argv])
        if name.startswith("prefill"):
            return ["env", "UCX_TLS=tcp,self", f"UCX_NET_DEVICES={netns.host_dev}", *argv]
        return argv

    metrics = free_ports(8)
    up = Up(UpConfig(model=str(tiny_models["llama"]), port=free_port(), mode="disagg", nats=url, kv_transport="nixl",
                     disagg_threshold=4, metrics_port=metrics, worker_args=("--num-blocks", "128")), wrap=wrap)
    try:
        base = up.start(timeout=120)
        status = latest(url)
        assert status["decode-1"].nixl and status["decode-1"].host  # advertised over the bus, across the pair
        tx = _tx_bytes(netns.host_dev)
        prompt = PROMPT * 12  # ~140 tokens: 9 blocks to move per request
        for stream in (False, True):
            assert _complete(base, prompt, stream) == _want(reference, prompt)
        moved, failed = _transfers(metrics + 1)  # prefill-0 moved the pages with nixl, and never fell back
        assert moved >= 2 * 8 * 8192 and failed == 0, (moved, failed)
        assert _tx_bytes(netns.host_dev) - tx >= moved  # ... through the veth pair
    finally:
        up.stop()
        nats.stop()


# ---- faults -----------------------------------------------------------------------------------------------------


@pytest.fixture()
def faulty(tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[Up]:
    """1 prefill, 2 decode workers over nixl, with a short lease so a dead sender's blocks come back quickly."""
    monkeypatch.setenv("UCX_NET_DEVICES", "lo")
    with Up(UpConfig(model=str(tiny_models["llama"]), port=free_port(), mode="disagg", prefill=1, decode=2,
                     kv_transport="nixl", disagg_threshold=4, metrics_port=free_ports(8),
                     worker_args=("--num-blocks", "256", "--lease-s", "3"))) as up:
        yield up


def _kv_used(nats: str) -> dict[str, int]:
    return {w: st.kv_used for w, st in latest(nats).items()}


def _proc(up: Up, name: str) -> subprocess.Popen[bytes]:
    return next(p for n, p in up.procs if n == name)


def _stream(up: Up, prompt: str, max_tokens: int = 40) -> tuple[str, str | None]:
    """One streamed completion: the text received and the in-band error, if any."""
    body = {"model": "llama", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    text, error = [], None
    with httpx.stream("POST", f"http://{up.cfg.host}:{up.cfg.port}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    error = str(event["error"]["message"])
                    break
                text += [c["text"] for c in event["choices"]]
    return "".join(text), error


def _settles(nats: str, want: dict[str, int], timeout: float = 10.0) -> None:
    """Wait until every worker in `want` reports that KV usage again."""
    deadline = time.monotonic() + timeout
    while (used := {w: u for w, u in _kv_used(nats).items() if w in want}) != want:
        assert time.monotonic() < deadline, f"KV usage {used}, expected {want}"
        time.sleep(0.3)


def test_decode_killed_mid_transfer_falls_back(faulty: Up, reference: Engine) -> None:
    """The decode worker chosen for the request hangs the moment the prefill worker asks it for blocks, and is
    killed: the allocation or the WRITE fails within its timeout, the request is prefilled again on the other
    (live) decode worker and completes with the right text; no block stays allocated on the survivors."""
    assert faulty.nats is not None
    nats = faulty.nats.client_url
    prompt = PROMPT * 4
    want = _want(reference, prompt, 40)
    before = _kv_used(nats)
    victims: list[str] = []

    def freeze_then_kill(worker: str) -> None:
        victims.append(worker)
        p = _proc(faulty, worker)
        p.send_signal(signal.SIGSTOP)  # a hung host: the transfer has no one to answer it
        threading.Timer(1.0, p.kill).start()

    watch = SubjectWatch(nats, P.worker_allocate("*"), freeze_then_kill)
    try:
        text, error = _stream(faulty, prompt)
    finally:
        watch.close()
    assert victims and victims[0].startswith("decode"), victims
    assert error is None, error
    assert text == want
    assert _transfers(faulty.cfg.metrics_port + 1)[1] == 1  # prefill-0 saw the handoff fail and fell back
    survivors = {w: u for w, u in before.items() if w != victims[0]}
    _settles(nats, survivors)


def test_prefill_killed_mid_transfer_is_replayed_and_frees_blocks(faulty: Up, reference: Engine) -> None:
    """The sender dies as it starts moving the pages: the decode side raises nothing and its lease frees the
    reserved blocks; the gateway sees the prefill worker gone (heartbeats, or the decode worker's lease notice)
    and replays the request with the token it already has; the client's stream completes, correct."""
    assert faulty.nats is not None
    nats = faulty.nats.client_url
    prompt = PROMPT * 4
    want = _want(reference, prompt, 40)
    before = _kv_used(nats)
    watch = SubjectWatch(nats, P.worker_allocate("*"), lambda worker: _proc(faulty, "prefill-0").kill())
    t0 = time.monotonic()
    try:
        text, error = _stream(faulty, prompt)
    finally:
        watch.close()
    assert watch.seen, "no KV handoff was attempted"
    assert error is None, error
    assert text == want
    assert time.monotonic() - t0 < 15  # the worker timeout (3 s) or the lease (3 s), then the replay itself
    assert faulty.failed() == ["prefill-0"]  # the decode workers lived through it
    _settles(nats, {w: u for w, u in before.items() if w.startswith("decode")})
    metrics = httpx.get(f"http://{faulty.cfg.host}:{faulty.cfg.port}/metrics", timeout=5).text
    assert "brigade:requests_replayed_total" in metrics
