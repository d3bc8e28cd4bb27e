"""The experts data plane on one host: a Unix socket per shard, framed request/reply, no bus hop.

Over NATS a layer's dispatch costs a trip through nats-server and two event loops each way, for every
shard, every layer, every step: ~2 ms a shard per layer here, as much as the experts' compute. On one host
the worker's engine thread instead writes each shard's dispatch straight into that shard's socket and
blocks on the replies; the shard answers on the thread that read the request. That is two wake-ups a
layer per shard, the fewest there can be. NATS stays the control plane (heartbeats announce the socket)
and the fallback across hosts.

Frames: 4-byte little-endian length, then the msgpack message (`ExpertsDispatch` out, `ExpertsResult`
back). One request is outstanding per connection; a worker keeps one connection per shard.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger("brigade.experts")

_LEN = struct.Struct("<I")
MAX_FRAME = 1 << 31  # far above any dispatch; a larger length means a corrupt stream


class ChannelError(RuntimeError):
    """A direct exchange failed: the shard at `path` closed, reset, or did not answer in time."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def socket_path(shard_id: str) -> str:
    """A fresh socket path for a shard process (its pid in the name: a restarted shard gets a new one).

    Sockets that earlier processes of this shard left behind (killed before they could unlink them) go.
    """
    root = Path(os.environ.get("BRIGADE_SOCKET_DIR") or tempfile.gettempdir())
    prefix = f"brigade-experts-{shard_id}-"
    for old in root.glob(f"{prefix}*.sock"):
        pid = old.name[len(prefix):-len(".sock")]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                old.unlink()
    return str(root / f"{prefix}{os.getpid()}.sock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _send(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_LEN.pack(len(data)) + data)  # one write: the copy costs less than a second syscall


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionResetError("the peer closed the connection")
        got += k
    return bytes(buf)


def _recv(sock: socket.socket) -> bytes:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if n > MAX_FRAME:
        raise ConnectionError(f"frame of {n} bytes: corrupt stream")
    return _recv_exact(sock, n)


class ChannelServer:
    """A shard's listening socket: a thread per connected worker runs `handle(request) -> reply`.

    `handle` runs on the connection's thread; the caller serializes compute if it must (one shard, one
    core). `init` runs once on each connection thread first (e.g. its own torch thread count).
    """

    def __init__(self, path: str, handle: Callable[[bytes], bytes], init: Callable[[], None] | None = None) -> None:
        self.path = path
        self.handle = handle
        self.init = init
        self._sock: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        os.chmod(self.path, 0o600)  # only this user's workers may dispatch
        sock.listen(64)
        self._sock = sock
        threading.Thread(target=self._accept, name="experts-accept", daemon=True).start()

    def close(self) -> None:
        self._closed = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        with self._lock:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="experts-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        if self.init is not None:
            self.init()
        try:
            while True:
                _send(conn, self.handle(_recv(conn)))
        except (OSError, ConnectionError):
            pass  # the worker went away (or we are closing): nothing to answer
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()


class ChannelClient:
    """A worker's connections to shards' sockets, used from one thread (the engine's)."""

    def __init__(self) -> None:
        self._conns: dict[str, socket.socket] = {}

    def exchange(self, requests: Sequence[tuple[str, bytes]], timeout: float) -> list[bytes]:
        """Send every (socket path, request) at once, then collect the replies in order.

        All requests are written before any reply is read, so the shards compute side by side. Raises
        ChannelError naming the first path that failed. Every connection of a failed exchange is dropped (a
        reply still in flight must not be read as the answer to the next request); the next call reconnects.
        """
        deadline = time.monotonic() + timeout
        path = ""
        try:
            socks = []
            for path, data in requests:
                sock = self._connect(path, timeout)
                sock.settimeout(max(1e-3, deadline - time.monotonic()))
                _send(sock, data)
                socks.append(sock)
            replies = []
            for (p, _), sock in zip(requests, socks, strict=True):
                path = p  # named by the error if this one fails
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([sock], [], [], left)[0]:
                    raise TimeoutError
                sock.settimeout(max(1e-3, deadline - time.monotonic()))
                replies.append(_recv(sock))
            return replies
        except (OSError, ConnectionError) as e:
            for dropped, _ in requests:
                self._drop(dropped)
            raise ChannelError(path, _reason(e, timeout)) from e

    def close(self) -> None:
        for path in list(self._conns):
            self._drop(path)

    def _connect(self, path: str, timeout: float) -> socket.socket:
        sock = self._conns.get(path)
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(path)
            except OSError:
                sock.close()
                raise
            self._conns[path] = sock
        return sock

    def _drop(self, path: str) -> None:
        sock = self._conns.pop(path, None)
        if sock is not None:
            sock.close()


def _reason(e: BaseException, timeout: float) -> str:
    if isinstance(e, TimeoutError):
        return f"no reply within the {timeout:g}s timeout"
    return f"{type(e).__name__}: {e}"
