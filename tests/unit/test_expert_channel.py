"""The experts' one-host data plane (experts/channel.py): framed request/reply over real Unix sockets."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from brigade.experts.channel import ChannelClient, ChannelError, ChannelServer


def _server(path: Path, delay: dict[bytes, float] | None = None) -> ChannelServer:
    def handle(data: bytes) -> bytes:
        time.sleep((delay or {}).get(data[:1], 0.0))
        return data[::-1]

    srv = ChannelServer(str(path), handle)
    srv.start()
    return srv


def test_exchange_with_several_servers_in_order(tmp_path: Path) -> None:
    servers = [_server(tmp_path / f"s{i}.sock") for i in range(3)]
    client = ChannelClient()
    try:
        big = bytes(range(256)) * 4096  # 1 MiB: several socket buffers' worth
        reqs = [(servers[0].path, b"a" + big), (servers[1].path, b"bc"), (servers[2].path, b"")]
        assert client.exchange(reqs, 5.0) == [(b"a" + big)[::-1], b"cb", b""]
        assert client.exchange(reqs, 5.0) == [(b"a" + big)[::-1], b"cb", b""]  # connections are reused
    finally:
        client.close()
        for s in servers:
            s.close()


def test_servers_answer_side_by_side(tmp_path: Path) -> None:
    servers = [_server(tmp_path / f"s{i}.sock", {b"z": 0.3}) for i in range(2)]
    client = ChannelClient()
    try:
        t0 = time.monotonic()
        assert client.exchange([(s.path, b"z1") for s in servers], 5.0) == [b"1z", b"1z"]
        assert time.monotonic() - t0 < 0.55  # 0.3 s each, at once: not 0.6 s one after the other
    finally:
        client.close()
        for s in servers:
            s.close()


def test_timeout_names_the_socket_and_never_misreads_a_late_reply(tmp_path: Path) -> None:
    slow, fast = _server(tmp_path / "slow.sock", {b"s": 0.5}), _server(tmp_path / "fast.sock")
    client = ChannelClient()
    try:
        t0 = time.monotonic()
        with pytest.raises(ChannelError) as err:
            client.exchange([(fast.path, b"f1"), (slow.path, b"s1")], 0.2)
        assert err.value.path == slow.path and "timeout" in err.value.reason
        assert time.monotonic() - t0 < 0.45
        time.sleep(0.5)  # the late reply to "s1" arrives on the old connection, which was dropped
        assert client.exchange([(slow.path, b"x2"), (fast.path, b"f2")], 2.0) == [b"2x", b"2f"]
    finally:
        client.close()
        slow.close()
        fast.close()


def test_a_dead_or_missing_server_fails_at_once(tmp_path: Path) -> None:
    srv = _server(tmp_path / "s.sock")
    client = ChannelClient()
    try:
        assert client.exchange([(srv.path, b"ab")], 2.0) == [b"ba"]
        srv.close()
        t0 = time.monotonic()
        with pytest.raises(ChannelError):
            client.exchange([(srv.path, b"ab")], 2.0)
        with pytest.raises(ChannelError):  # the socket file is gone: no connection to make
            client.exchange([(srv.path, b"ab")], 2.0)
        assert time.monotonic() - t0 < 1.0
        again = _server(tmp_path / "s.sock")  # a replacement on the same path is used at once
        assert client.exchange([(again.path, b"ab")], 2.0) == [b"ba"]
        again.close()
    finally:
        client.close()


def test_server_serves_several_clients(tmp_path: Path) -> None:
    srv = _server(tmp_path / "s.sock")
    errors: list[BaseException] = []

    def use(i: int) -> None:
        c = ChannelClient()
        try:
            for j in range(50):
                msg = f"{i}-{j}".encode()
                assert c.exchange([(srv.path, msg)], 5.0) == [msg[::-1]]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            c.close()

    threads = [threading.Thread(target=use, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    srv.close()
    assert not errors, errors


def test_socket_path_clears_sockets_of_dead_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import subprocess
    import sys

    from brigade.experts.channel import socket_path

    monkeypatch.setenv("BRIGADE_SOCKET_DIR", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"brigade-experts-s0-{int(dead.stdout)}.sock"
    live = tmp_path / f"brigade-experts-s0-{os.getppid()}.sock"  # a running process's socket stays
    other = tmp_path / f"brigade-experts-s1-{int(dead.stdout)}.sock"  # another shard's is not ours to touch
    for p in (stale, live, other):
        p.touch()
    assert socket_path("s0") == str(tmp_path / f"brigade-experts-s0-{os.getpid()}.sock")
    assert not stale.exists() and live.exists() and other.exists()
