"""The nixl KV transport: NIXL/UCX WRITEs between agents in one process and across processes (host memory)."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest
import torch
from kv_data import SENTINEL, pattern

from brigade.kv import nixl as nixl_kv
from brigade.kv.nixl import NixlPeer, NixlReceiver, NixlSender
from brigade.kv.transfer import KvLayout, TransferError, copy_blocks

needs_nixl = pytest.mark.skipif(importlib.util.find_spec("nixl") is None,
                                reason="nixl not installed: " + nixl_kv.INSTALL_HINT)

LAYOUT = KvLayout(layers=2, block_size=16, kv_heads=2, head_dim=16, dtype="float32", num_blocks=16)


@pytest.fixture(autouse=True)
def _loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UCX_NET_DEVICES", "lo")  # read at agent creation; receiver processes inherit it


def _src(num_blocks: int, seed: int) -> torch.Tensor:
    return pattern(LAYOUT, num_blocks, seed)


def _expected(src: torch.Tensor, moves: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """A sentinel-filled receiver cache after copying each (src_blocks, dst_blocks)."""
    out = torch.full(LAYOUT.shape, SENTINEL)
    for s, d in moves:
        copy_blocks(LAYOUT.blocks_view(src, any_num_blocks=True), s, LAYOUT.blocks_view(out), d)
    return out


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _peer(worker_id: str, nixl: Any, layout: KvLayout = LAYOUT) -> SimpleNamespace:
    # PeerInfo has no nixl field yet: the sender only reads worker_id, layout and nixl.
    return SimpleNamespace(worker_id=worker_id, layout=layout, nixl=nixl)


def test_missing_nixl_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nixl._api", None)  # makes `import nixl._api` raise ImportError
    with pytest.raises(TransferError, match="pip install nixl-cu12==1.5.1 && pip install --no-deps nixl==1.5.1"):
        nixl_kv.nixl_api()


def test_peer_roundtrip_through_msgpack() -> None:
    p = NixlPeer(agent="a-1", metadata=b"\x00\xffmd", addr=2**47 + 4096, nbytes=1 << 20, num_blocks=16,
                 bytes_per_block=65536, mem_type="DRAM", device=0)
    assert NixlPeer.from_dict(msgpack.unpackb(msgpack.packb(p.to_dict()))) == p


@needs_nixl
async def test_in_process_scattered_blocks_and_allowlist() -> None:
    recv, send = NixlReceiver(), NixlSender()
    dst = torch.full(LAYOUT.shape, SENTINEL)
    src = _src(24, seed=1)  # the sender's pool is larger than the receiver's
    try:
        await recv.start("w1", dst, LAYOUT)
        peer = _peer("w1", recv.peer().to_dict())
        moves = [([0, 1, 2, 20, 7], [3, 4, 5, 9, 15]), ([23, 22], [0, 1])]
        recv.expect("a", moves[0][1])
        recv.expect("b", moves[1][1] + [2])
        await send.send("a", src, moves[0][0], peer, moves[0][1])
        assert await recv.wait("a", 2.0) and recv.complete("a")
        await send.send("b", src, moves[1][0], peer, moves[1][1])  # only part of b's blocks so far
        await asyncio.sleep(0.05)
        assert recv.received("b") == {0, 1} and not recv.complete("b")
        await send.send("b", src, [11], peer, [2])
        moves.append(([11], [2]))
        assert await recv.wait("b", 2.0)
        assert _sha(dst) == _sha(_expected(src, moves))  # byte-exact, every other block untouched
        # A NixlPeer object works as well as its dict.
        recv.expect("c", [6])
        await send.send("c", src, [5], _peer("w1", recv.peer()), [6])
        assert await recv.wait("c", 2.0) and recv.stray == 0
        # Forgetting resolves waiters with False; waiting for an unknown request is False at once.
        recv.expect("d", [8])
        waiter = asyncio.create_task(recv.wait("d", 5.0))
        await asyncio.sleep(0.01)
        recv.forget("d")
        assert await waiter is False and await recv.wait("zzz", 5.0) is False
        assert await recv.wait("c", 0.01) is True and not await recv.wait("never", 0.01)
    finally:
        await send.close()
        await recv.stop()


@needs_nixl
async def test_refused_before_any_write() -> None:
    recv, send = NixlReceiver(), NixlSender()
    dst = torch.full(LAYOUT.shape, SENTINEL)
    src = _src(16, seed=2)
    try:
        await recv.start("w1", dst, LAYOUT)
        info = recv.peer()
        peer = _peer("w1", info.to_dict())
        recv.expect("r", [0, 1])
        bad: list[tuple[Any, list[int], Any, list[int]]] = [
            (src, [0, 1], peer, [0, 16]),  # destination out of range
            (src, [0, 1], peer, [1, 1]),  # duplicate destination
            (src, [0, 99], peer, [0, 1]),  # source out of range
            (src, [0], peer, [0, 1]),  # length mismatch
            (src.half(), [0, 1], peer, [0, 1]),  # wrong dtype for the layout
            (src[:1].contiguous(), [0, 1], peer, [0, 1]),  # wrong layer count
            (src, [0, 1], _peer("w1", None), [0, 1]),  # no NIXL agent advertised
            (src, [0, 1], _peer("w1", {**info.to_dict(), "num_blocks": 32}), [0, 1]),  # NIXL info vs layout
            (src, [0, 1], _peer("w1", {"agent": "x"}), [0, 1]),  # malformed NIXL info
        ]
        for s, sb, p, db in bad:
            with pytest.raises(TransferError):
                await send.send("r", s, sb, p, db)
        await asyncio.sleep(0.05)
        assert dst.eq(SENTINEL).all() and recv.received("r") == frozenset() and recv.stray == 0
        await send.send("r", src, [], peer, [])  # nothing to move: no transfer at all
        assert not recv.complete("r")
        closed = NixlSender()
        await closed.close()
        with pytest.raises(TransferError, match="closed"):
            await closed.send("r", src, [0], peer, [0])
    finally:
        await send.close()
        await recv.stop()


@needs_nixl
async def test_unexpected_writes_land_but_do_not_count() -> None:
    # One-sided: the receiver cannot refuse a write, only refuse to count it (and log it).
    recv, send = NixlReceiver(), NixlSender()
    dst = torch.full(LAYOUT.shape, SENTINEL)
    src = _src(16, seed=3)
    try:
        await recv.start("w1", dst, LAYOUT)
        peer = _peer("w1", recv.peer().to_dict())
        recv.expect("r", [4, 5])
        await send.send("r", src, [0, 1], peer, [4, 6])  # block 6 is not r's
        await send.send("q", src, [2], peer, [9])  # q is not expected at all
        deadline = time.monotonic() + 2.0
        while recv.stray < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert recv.stray == 2 and recv.received("r") == frozenset() and not recv.complete("r")
        assert _sha(dst) == _sha(_expected(src, [([0, 1], [4, 6]), ([2], [9])]))
    finally:
        await send.close()
        await recv.stop()


@needs_nixl
async def test_in_process_cache_switch_and_receiver_restart() -> None:
    recv, send = NixlReceiver(), NixlSender()
    dst = torch.full(LAYOUT.shape, SENTINEL)
    a, b = _src(16, seed=7), _src(8, seed=8)
    recv2: NixlReceiver | None = None
    try:
        await recv.start("w1", dst, LAYOUT)
        peer = _peer("w1", recv.peer().to_dict())
        # Concurrent sends from two cache tensors: each switch re-registers (regression: registering the same
        # memory twice while a transfer used the older registration corrupted UCX's heap).
        for k in range(3):
            for i in range(4):
                recv.expect(f"g{k}{i}", [i])
            await asyncio.gather(*(send.send(f"g{k}{i}", b if i % 2 else a, [i], peer, [i]) for i in range(4)))
            assert all([await recv.wait(f"g{k}{i}", 2.0) for i in range(4)])
        want = _expected(a, [([0, 2], [0, 2])])
        copy_blocks(LAYOUT.blocks_view(b, any_num_blocks=True), [1, 3], LAYOUT.blocks_view(want), [1, 3])
        assert _sha(dst) == _sha(want)
        await recv.stop()
        with pytest.raises(TransferError, match="stopped"):  # not posted: in-process that could crash UCX
            await send.send("x", a, [0], peer, [0])
        recv2 = NixlReceiver()
        await recv2.start("w1", dst, LAYOUT)
        recv2.expect("y", [5])
        await send.send("y", a, [9], _peer("w1", recv2.peer().to_dict()), [5])
        assert await recv2.wait("y", 2.0) and torch.equal(dst[:, :, 80:96], a[:, :, 144:160])
    finally:
        await send.close()
        await recv.stop()
        if recv2 is not None:
            await recv2.stop()


# ---- across processes ---------------------------------------------------------------------------------

_RECEIVER = textwrap.dedent("""
    import asyncio, hashlib, json, sys
    import msgpack, torch
    from brigade.kv.nixl import NixlReceiver
    from brigade.kv.transfer import KvLayout

    async def main():
        layout = KvLayout.from_dict(json.loads(sys.argv[1]))
        cache = torch.full(layout.shape, float(sys.argv[3]))
        recv = NixlReceiver()
        await recv.start(sys.argv[2], cache, layout)
        print("PEER", msgpack.packb(recv.peer().to_dict()).hex(), flush=True)
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):  # EOF: the test is gone
            cmd, rid, *rest = line.split()
            if cmd == "expect":
                recv.expect(rid, [int(b) for b in rest[0].split(",")])
                print("ok", flush=True)
            elif cmd == "wait":
                done = await recv.wait(rid, 5.0)
                sha = hashlib.sha256(cache.view(torch.uint8).numpy().tobytes()).hexdigest()
                print("done", int(done), sha, recv.stray, flush=True)
        await recv.stop()

    asyncio.run(main())
""")


class _Child:
    """A decode-side receiver in its own process, driven over stdin/stdout."""

    def __init__(self, worker_id: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _RECEIVER, json.dumps(LAYOUT.to_dict()), worker_id, str(SENTINEL)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.worker_id = worker_id

    async def line(self, timeout: float = 20.0) -> str:
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
            if not line:
                raise RuntimeError(f"receiver exited with {self.proc.wait()}")
            words = line.split()
            if words and words[0] in ("PEER", "ok", "done"):  # skip anything a library printed
                return line.strip()

    async def peer(self) -> SimpleNamespace:
        tag, hexed = (await self.line()).split()
        assert tag == "PEER"
        return _peer(self.worker_id, msgpack.unpackb(bytes.fromhex(hexed)))

    async def cmd(self, text: str) -> list[str]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return (await self.line()).split()

    async def expect(self, rid: str, blocks: list[int]) -> None:
        assert await self.cmd(f"expect {rid} {','.join(map(str, blocks))}") == ["ok"]

    async def wait(self, rid: str) -> tuple[bool, str, int]:
        tag, done, sha, stray = await self.cmd(f"wait {rid}")
        return done == "1", sha, int(stray)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


@needs_nixl
async def test_across_processes_byte_exact() -> None:
    child, send = _Child("w-x"), NixlSender()
    src = _src(20, seed=4)
    try:
        peer = await child.peer()
        moves = [([19, 0, 1, 2, 10, 11], [15, 3, 4, 5, 0, 1]), ([5, 7], [8, 12])]
        await child.expect("a", moves[0][1])
        await child.expect("b", moves[1][1])
        await send.send("a", src, moves[0][0], peer, moves[0][1])
        await send.send("b", src, moves[1][0], peer, moves[1][1])
        assert (await child.wait("a"))[0]
        done, sha, stray = await child.wait("b")
        assert done and stray == 0 and sha == _sha(_expected(src, moves))
    finally:
        child.close()
        await send.close()


@needs_nixl
async def test_dead_receiver_fails_fast_then_restarted_receiver_works() -> None:
    child, send = _Child("w-r"), NixlSender(timeout=10.0)
    src = _src(16, seed=5)
    new: _Child | None = None
    try:
        peer = await child.peer()
        await child.expect("a", [1, 2])
        await send.send("a", src, [3, 4], peer, [1, 2])
        assert (await child.wait("a"))[0]
        child.kill()
        for _ in range(2):  # the first send notices the disconnect, later ones fail at once
            t0 = time.monotonic()
            with pytest.raises(TransferError):
                await send.send("b", src, [5], peer, [6])
            assert time.monotonic() - t0 < 2.0
        # The worker comes back: a new agent, new metadata; the sender replaces the old agent.
        new = _Child("w-r")
        peer2 = await new.peer()
        assert peer2.nixl["agent"] != peer.nixl["agent"]
        await new.expect("c", [7, 8, 9])
        await send.send("c", src, [0, 1, 15], peer2, [7, 8, 9])
        done, sha, _ = await new.wait("c")
        assert done and sha == _sha(_expected(src, [([0, 1, 15], [7, 8, 9])]))
    finally:
        child.close()
        if new is not None:
            new.close()
        await send.close()


@needs_nixl
async def test_receiver_dead_before_first_send_fails_fast() -> None:
    child, send = _Child("w-d"), NixlSender(timeout=10.0)
    try:
        peer = await child.peer()
        child.kill()
        t0 = time.monotonic()
        with pytest.raises(TransferError):
            await send.send("a", _src(16, seed=6), [0], peer, [0])
        assert time.monotonic() - t0 < 2.0
    finally:
        child.close()
        await send.close()
