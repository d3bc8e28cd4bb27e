"""`brigade up` as a user runs it: a real process started from a shell-like session, stopped the terminal's way.

Each test starts `python -m brigade.cli up ...` in a process group of its own, as a shell starts a foreground
job, and checks what a user sees: the start-up line or a prompt error, the API it serves, and that nothing it
started outlives it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import stream_text

from brigade.launcher import free_port


def _children(pid: int) -> set[int]:
    """Every live descendant of `pid` (the children run in sessions of their own, but keep their parent)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - out
        out |= frontier
    return out


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _up(*args: str) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "brigade.cli", "up", *args, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    return proc, port


def _wait_up(proc: subprocess.Popen[str], timeout: float = 120) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = proc.stdout.readline()
    while "Brigade is up" not in line:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        line = proc.stdout.readline()
    return line


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _alive(pids)


def test_ctrl_c_stops_everything_and_the_flags_reach_the_services(tiny_models: dict[str, Path]) -> None:
    """vLLM's command line (positional model, served names, max-model-len, api-key); then Ctrl-C, as a terminal
    sends it (SIGINT to the whole foreground process group), stops every child and the bus within seconds."""
    model = str(tiny_models["llama"])
    proc, port = _up(model, "--served-model-name", "tiny", "tiny-alias", "--max-model-len", "96",
                     "--api-key", "sesame", "--max-num-seqs", "8")
    try:
        _wait_up(proc)
        children = _children(proc.pid)
        assert len(children) >= 4  # nats-server, router, a worker, the gateway
        url = f"http://127.0.0.1:{port}"
        auth = {"Authorization": "Bearer sesame"}
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
        models = httpx.get(f"{url}/v1/models", headers=auth, timeout=10).json()["data"]
        assert [(m["id"], m["max_model_len"]) for m in models] == [("tiny", 96), ("tiny-alias", 96)]
        # No max_tokens: the room left in the 96-token context, which the automatic KV cache holds.
        r = httpx.post(f"{url}/v1/chat/completions", headers=auth, timeout=60, json={
            "model": "tiny-alias", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "ignore_eos": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] == 96
        assert body["model"] == "tiny-alias"
        r = httpx.post(f"{url}/v1/completions", headers=auth, timeout=30, json={"model": "gpt-4", "prompt": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"

        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 20
        assert not _wait_gone(children, 5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _named(pids: set[int], word: str) -> set[int]:
    """The pids among `pids` whose command line has `word` as one argument."""
    out = set()
    for pid in pids:
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if word.encode() in args:
            out.add(pid)
    return out


def test_a_dead_worker_is_restarted_and_its_requests_replayed(tiny_models: dict[str, Path]) -> None:
    """SIGKILL the only worker mid-stream: `brigade up` keeps serving, starts the worker again, and the streams
    that worker held finish on the new one (the gateway replays them) with every request a 200, a constrained
    one's grammar rebuilt from the tokens it had."""
    import asyncio

    proc, port = _up(str(tiny_models["llama"]))
    try:
        _wait_up(proc)
        [worker] = _named(_children(proc.pid), "decode")
        url = f"http://127.0.0.1:{port}"
        body = {"model": "llama", "prompt": "tell me a long story", "max_tokens": 240, "temperature": 0,
                "ignore_eos": True}

        constrained = {**body, "guided_regex": "[a-z ]{400}"}
        bodies = [body] * 39 + [constrained]  # 40 streams on the one worker when it dies

        async def streams() -> list[str]:
            started = [asyncio.Event() for _ in bodies]
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                tasks = [asyncio.create_task(stream_text(client, b, e)) for b, e in zip(bodies, started, strict=True)]
                for e in started:  # every stream is under way on the worker: then it dies
                    await e.wait()
                os.kill(worker, signal.SIGKILL)
                return list(await asyncio.gather(*tasks))

        want = [httpx.post(f"{url}/v1/completions", json=b, timeout=120).json()["choices"][0]["text"]
                for b in (body, constrained)]
        got = asyncio.run(streams())
        assert got == [want[0]] * 39 + [want[1]]  # replayed on the restarted worker, text exact
        assert re.fullmatch("[a-z ]{1,400}", got[-1]), got[-1]  # the constraint held across the replay
        deadline = time.monotonic() + 20
        while not (again := _named(_children(proc.pid), "decode")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert again and again != {worker} and proc.poll() is None
        r = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 4}, timeout=60)
        assert r.status_code == 200, r.text
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert "decode-0 exited; restarting it" in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_no_child_outlives_a_killed_up(tiny_models: dict[str, Path]) -> None:
    proc, _ = _up(str(tiny_models["llama"]))
    try:
        _wait_up(proc)
        children = _children(proc.pid)
        assert len(children) >= 4
        proc.kill()  # SIGKILL: no handler runs; the children's parent-death signal stops them
        proc.wait(timeout=10)
        assert not _wait_gone(children, 20), "children outlived a SIGKILLed brigade up"
    finally:
        for pid in _alive(_children(proc.pid)):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("case", ["bad-path", "port-in-use", "worker-dies"])
def test_start_up_failures_are_reported_at_once(case: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """A bad model path or a taken port is refused before anything starts; a child that dies while starting
    (here a worker given an unknown attention backend) stops `brigade up` within seconds, in its own words."""
    import socket

    model = str(tiny_models["llama"])
    holder = socket.socket()
    try:
        if case == "bad-path":
            args, want, limit = [str(tmp_path / "nowhere")], "nowhere", 15.0
        elif case == "port-in-use":
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            args, want, limit = [model], "in use", 15.0
        else:
            args, want, limit = [model, "--worker-arg=--attention=bogus"], "bogus", 60.0
        t0 = time.monotonic()
        if case == "port-in-use":
            port = holder.getsockname()[1]
            proc = subprocess.run([sys.executable, "-m", "brigade.cli", "up", *args, "--port", str(port)],
                                  capture_output=True, text=True, timeout=limit)
        else:
            proc = subprocess.run([sys.executable, "-m", "brigade.cli", "up", *args, "--port", str(free_port())],
                                  capture_output=True, text=True, timeout=limit)
        elapsed = time.monotonic() - t0
        assert proc.returncode != 0
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("brigade up:") and want in last, proc.stderr[-2000:]
        if case == "worker-dies":
            assert "decode-0 exited" in last
        assert elapsed < limit
    finally:
        holder.close()
