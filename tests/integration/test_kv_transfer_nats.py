"""KV transports against a real nats-server: chunked `nats` transfers, refusals, timeouts; throughput printout."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import torch
from kv_data import SENTINEL, pattern, raw_bytes

from brigade.bus import Bus
from brigade.kv.transfer import (
    KvLayout,
    NatsReceiver,
    NatsSender,
    PeerInfo,
    ShmSender,
    TransferError,
    shared_cache,
)
from brigade.protocol import Ack, KvChunk, worker_kv


@asynccontextmanager
async def _buses(url: str) -> AsyncIterator[tuple[Bus, Bus]]:
    prefill = await Bus.connect(url, "prefill")
    decode = await Bus.connect(url, "decode")
    try:
        yield prefill, decode
    finally:
        await prefill.close()
        await decode.close()




@pytest.mark.parametrize("dtype,max_chunk", [("float32", None), ("float16", 20_000)], ids=["f32-1MiB", "f16-20KB"])
async def test_nats_transfer_many_chunks(nats_url: str, dtype: str, max_chunk: int | None) -> None:
    lay = KvLayout(layers=2, block_size=16, kv_heads=2, head_dim=16, dtype=dtype, num_blocks=512)
    n = 300  # 2.4 MiB in fp32, 1.2 MiB in fp16: several chunks either way
    rng = random.Random(1)
    src_blocks = rng.sample(range(320), n)
    dst_blocks = rng.sample(range(lay.num_blocks), n)
    src = pattern(lay, 320, seed=2)
    cache = torch.full(lay.shape, SENTINEL, dtype=lay.torch_dtype)
    async with _buses(nats_url) as (pbus, dbus):
        receiver = NatsReceiver()
        await receiver.start(dbus, "decode-1", cache, lay)
        receiver.expect("req-1", dst_blocks)
        sender = NatsSender(pbus, timeout=10.0, max_chunk_bytes=max_chunk)
        assert n * lay.bytes_per_block > 1 << 20
        assert sender.blocks_per_chunk(lay, "req-1") < n / 2
        assert not receiver.complete("req-1")
        await sender.send("req-1", src, src_blocks, PeerInfo("decode-1", "", lay), dst_blocks)
        # send() returned after the last ack: everything is already written.
        assert receiver.complete("req-1") and receiver.received("req-1") == set(dst_blocks)
        await receiver.stop()
    view, sview = lay.blocks_view(cache), lay.blocks_view(src, any_num_blocks=True)
    got = view[:, :, dst_blocks]
    assert torch.equal(raw_bytes(got), raw_bytes(sview[:, :, src_blocks]))
    untouched = sorted(set(range(lay.num_blocks)) - set(dst_blocks))
    assert view[:, :, untouched].eq(SENTINEL).all()


async def test_nats_refuses_unregistered_blocks(nats_url: str) -> None:
    lay = KvLayout(layers=2, block_size=8, kv_heads=2, head_dim=16, dtype="float16", num_blocks=16)
    src = pattern(lay, 8, seed=4)
    cache = torch.full(lay.shape, SENTINEL, dtype=lay.torch_dtype)
    peer = PeerInfo("decode-2", "", lay)
    async with _buses(nats_url) as (pbus, dbus):
        receiver = NatsReceiver()
        await receiver.start(dbus, "decode-2", cache, lay)
        sender = NatsSender(pbus, timeout=5.0)
        with pytest.raises(TransferError, match="no blocks expected"):
            await sender.send("unknown", src, [0], peer, [1])
        receiver.expect("r", [1, 2])
        with pytest.raises(TransferError, match=r"refused: blocks \[3\] are not allocated"):
            await sender.send("r", src, [0, 1], peer, [1, 3])
        assert cache.eq(SENTINEL).all()  # a refused chunk writes nothing, not even its allowed blocks
        await sender.send("r", src, [0, 1], peer, [2, 1])
        assert receiver.complete("r")
        receiver.forget("r")
        with pytest.raises(TransferError, match="no blocks expected"):
            await sender.send("r", src, [0], peer, [1])
        # Malformed chunks sent by hand: wrong dtype, wrong size, garbage.
        receiver.expect("x", [5])
        subject = worker_kv("decode-2")
        good = bytes(lay.bytes_per_block)
        for payload, why in [(KvChunk("x", [5], "float32", good).encode(), "dtype"),
                             (KvChunk("x", [5], "float16", good[:-2]).encode(), "bytes for 1 blocks"),
                             (b"\x93garbage", "undecodable")]:
            ack = Ack.decode(await pbus.request(subject, payload))
            assert not ack.ok and why in (ack.error or ""), ack
        assert lay.blocks_view(cache)[:, :, 5].eq(SENTINEL).all()
        await receiver.stop()


async def test_nats_timeout_when_nobody_answers(nats_url: str) -> None:
    lay = KvLayout(layers=2, block_size=8, kv_heads=2, head_dim=16, dtype="float32", num_blocks=16)
    src = pattern(lay, 4, seed=6)
    async with _buses(nats_url) as (pbus, dbus):
        sender = NatsSender(pbus, timeout=0.3)
        with pytest.raises(TransferError, match="no responders"):  # nobody subscribed at all
            await sender.send("r", src, [0, 1], PeerInfo("nobody", "", lay), [0, 1])

        async def mute(msg: object) -> None:  # subscribed but never answers (a hung decode worker)
            return None

        await dbus.subscribe(worker_kv("mute"), mute)
        await dbus.flush()
        t0 = time.monotonic()
        with pytest.raises(TransferError, match="timeout"):
            await sender.send("r", src, [0, 1], PeerInfo("mute", "", lay), [0, 1])
        assert time.monotonic() - t0 < 3


def _has_cuda_ipc() -> bool:
    try:
        import cupy  # type: ignore[import-not-found]

        return bool(cupy.cuda.is_available()) and torch.cuda.is_available()
    except Exception:
        return False


def _cuda_ipc_decoder(layout: dict, conn: object) -> None:
    """Child process: owns a CUDA IPC cache, sends its handle, then returns the blocks it received."""
    from brigade.kv.transfer import cuda_ipc_cache

    lay = KvLayout.from_dict(layout)
    cache, handle = cuda_ipc_cache(lay.shape, lay.torch_dtype, 0)
    conn.send(handle)  # type: ignore[attr-defined]
    conn.recv()  # type: ignore[attr-defined]  # the parent finished writing
    conn.send(cache.cpu())  # type: ignore[attr-defined]


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda_ipc(), reason="cuda-ipc needs CuPy and a CUDA device")
async def test_cuda_ipc_transfer() -> None:
    from brigade.kv.transfer import CudaIpcSender

    lay = KvLayout(layers=2, block_size=16, kv_heads=2, head_dim=16, dtype="float16", num_blocks=32)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_cuda_ipc_decoder, args=(lay.to_dict(), child))
    p.start()
    try:
        handle = await asyncio.to_thread(parent.recv)
        src = pattern(lay, 8, seed=8).cuda()
        sender = CudaIpcSender()
        await sender.send("r", src, [1, 2, 7], PeerInfo("d", "", lay, cuda_ipc_handle=handle), [30, 4, 5])
        await sender.close()
        parent.send("done")
        cache = await asyncio.to_thread(parent.recv)
        view, sview = lay.blocks_view(cache), lay.blocks_view(src.cpu(), any_num_blocks=True)
        assert torch.equal(raw_bytes(view[:, :, [30, 4, 5]]), raw_bytes(sview[:, :, [1, 2, 7]]))
        assert not view[:, :, [0, 1, 2, 3, 6, 31]].any()
    finally:
        p.join(60)


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


async def test_throughput_report(nats_url: str) -> None:
    """Printed, not asserted (run with -s): shm vs memcpy vs nats on a 32 MiB scattered transfer."""
    lay = KvLayout(layers=8, block_size=16, kv_heads=2, head_dim=64, dtype="float16", num_blocks=1024)
    n = 512
    rng = random.Random(3)
    src_blocks = rng.sample(range(600), n)
    dst_blocks = rng.sample(range(lay.num_blocks), n)
    src = pattern(lay, 600, seed=1)
    nbytes = n * lay.bytes_per_block
    a, b = torch.randn(nbytes // 4), torch.empty(nbytes // 4)
    b.copy_(a)
    t0 = time.perf_counter()
    for _ in range(3):
        b.copy_(a)
    memcpy = _gbps(3 * nbytes, time.perf_counter() - t0)

    cache, shm = shared_cache(None, lay.shape, lay.torch_dtype, create=True)
    sender = ShmSender()
    peer = PeerInfo("decode-t", shm.name, lay)
    try:
        t0 = time.perf_counter()
        await sender.send("cold", src, src_blocks, peer, dst_blocks)  # first touch of the attached pages
        shm_cold = _gbps(nbytes, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(3):
            await sender.send(f"warm{i}", src, src_blocks, peer, dst_blocks)
        shm_warm = _gbps(3 * nbytes, time.perf_counter() - t0)
        view = lay.blocks_view(cache)
        assert torch.equal(raw_bytes(view[:, :, dst_blocks]),
                           raw_bytes(lay.blocks_view(src, any_num_blocks=True)[:, :, src_blocks]))
    finally:
        await sender.close()
        shm.close()

    dcache = torch.zeros(lay.shape, dtype=lay.torch_dtype)
    async with _buses(nats_url) as (pbus, dbus):
        receiver = NatsReceiver()
        await receiver.start(dbus, "decode-t", dcache, lay)
        nsender = NatsSender(pbus, timeout=10.0)
        rates = {}
        for window in (1, 4):
            nsender.window = window
            receiver.expect("n", dst_blocks)
            t0 = time.perf_counter()
            await nsender.send("n", src, src_blocks, PeerInfo("decode-t", "", lay), dst_blocks)
            rates[window] = _gbps(nbytes, time.perf_counter() - t0)
            assert receiver.complete("n")
            receiver.forget("n")
        await receiver.stop()
    print(f"\nKV transfer, {nbytes / 2**20:.0f} MiB in {n} scattered {lay.bytes_per_block // 1024} KiB blocks: "
          f"memcpy {memcpy:.1f} GB/s | shm cold {shm_cold:.1f}, warm {shm_warm:.1f} GB/s | "
          f"nats window=1 {rates[1]:.2f}, window=4 {rates[4]:.2f} GB/s "
          f"({nsender.blocks_per_chunk(lay, 'n')} blocks per chunk)")
