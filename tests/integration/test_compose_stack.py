"""The deployed shape: docker-compose.yml's serving services (NATS, gateway, router, prefill, decode) in containers,
started by podman-compose from the image the Dockerfile builds, with NATS passwords set as an operator's .env would
set them (nats-server and every service must take them over the defaults) and NATS refusing anonymous clients.

Opt-in, as it builds an image (minutes the first time): BRIGADE_TEST_COMPOSE=1, with podman and podman-compose
installed and the base images present (docs/operations.md, "Podman, without a registry"). The observability
services are not started: their images cannot be pulled here.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import free_port, metric_samples

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ["nats", "gateway", "router", "prefill", "decode"]
PROJECT = f"brigade-test-{os.getpid()}"

pytestmark = pytest.mark.skipif(
    os.environ.get("BRIGADE_TEST_COMPOSE") != "1" or not (shutil.which("podman") and shutil.which("podman-compose")),
    reason="opt-in: BRIGADE_TEST_COMPOSE=1 with podman and podman-compose installed")


def _run(*args: str, timeout: float, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, f"{' '.join(args)}: {done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


def _torch_wheel() -> Path:
    wheels = [*sorted(Path("/opt/wheels").glob("torch-2.13.0+cpu-*.whl")),
              *sorted((ROOT / "wheelhouse").glob("torch-*.whl"))]
    if not wheels:
        pytest.skip("no torch CPU wheel to build the image with (/opt/wheels or ./wheelhouse)")
    return wheels[0]


@pytest.fixture(scope="module")
def stack() -> Iterator[str]:
    wheel = _torch_wheel()
    (ROOT / "wheelhouse").mkdir(exist_ok=True)
    if not (ROOT / "wheelhouse" / wheel.name).exists():
        shutil.copy(wheel, ROOT / "wheelhouse")
    _run("podman", "build", "--build-arg", "TORCH_INDEX_URL=", "-t", "brigade:latest", ".", timeout=1200)
    port = free_port()
    env = {"BRIGADE_PORT": str(port), "OTEL_SDK_DISABLED": "true",
           # as an operator's .env sets them: NATS and each service must both take these over the defaults
           **{f"BRIGADE_NATS_{role}_PASSWORD": secrets.token_hex(24) for role in ("GATEWAY", "ROUTER", "WORKER",
                                                                                  "EXPERTS")}}
    compose = ("podman-compose", "-p", PROJECT)
    try:
        _run(*compose, "up", "-d", *SERVICES, timeout=300, env=env)
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run([*compose, "down"], cwd=ROOT, capture_output=True, timeout=300, env={**os.environ, **env})


def _container(service: str) -> str:
    return f"{PROJECT}_{service}_1"


def _metrics(service: str) -> dict[tuple[str, str], float]:
    """A worker's /metrics (port 9100 inside its container, not published), as metric_samples."""
    return metric_samples(_run("podman", "exec", _container(service), "python3", "-c",
                               "import urllib.request; print(urllib.request.urlopen("
                               "'http://127.0.0.1:9100/metrics', timeout=5).read().decode())", timeout=30))


ANONYMOUS_NATS = """
import asyncio, nats
async def main():
    try:
        nc = await nats.connect("nats://nats:4222", allow_reconnect=False, connect_timeout=5, max_reconnect_attempts=0)
    except Exception as e:
        print("refused:", e)
    else:
        print("connected")
        await nc.close()
asyncio.run(main())
"""


def _complete(url: str, prompt: str, deadline: float) -> httpx.Response:
    """POST a completion, retrying 503 while the workers are still starting (no worker registered yet)."""
    body = {"model": "demo", "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    while True:
        try:
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            if r.status_code != 503 or time.monotonic() > deadline:
                return r
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
        time.sleep(1)


def test_compose_stack_serves_short_and_disaggregated_requests(stack: str) -> None:
    r = _complete(stack, "def hello():", time.monotonic() + 180)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 6
    # Long enough to pass the router's disaggregation threshold: prefilled on `prefill`, KV sent to `decode`
    # over NATS (containers share no /dev/shm), decoded there.
    long = "The history of the dragon is long and storied. " * 12
    r = _complete(stack, long, time.monotonic() + 60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > 200
    sent = {labels: v for (name, labels), v in _metrics("prefill").items()
            if name == "brigade:kv_transfer_blocks_total"}
    assert list(sent) == ["transport=nats"] and sent["transport=nats"] > 0, sent
    r = httpx.post(f"{stack}/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": -1}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text


def test_compose_nats_refuses_anonymous_clients(stack: str) -> None:
    out = _run("podman", "exec", _container("gateway"), "python3", "-c", ANONYMOUS_NATS, timeout=60)
    assert "refused:" in out and "Authorization Violation" in out, out
