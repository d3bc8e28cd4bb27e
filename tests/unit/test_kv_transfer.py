"""KV transports without a bus: shared-memory caches across processes and the shm sender's block copies."""

from __future__ import annotations

import multiprocessing as mp
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from kv_data import SENTINEL, pattern, raw_bytes

from brigade.kv.transfer import (
    KvLayout,
    NatsSender,
    PeerInfo,
    ShmSender,
    TransferError,
    block_runs,
    copy_blocks,
    make_sender,
    shared_cache,
)

LAYOUTS = [
    KvLayout(layers=2, block_size=16, kv_heads=2, head_dim=16, dtype="float32", num_blocks=24),
    KvLayout(layers=2, block_size=8, kv_heads=2, head_dim=16, dtype="float16", num_blocks=24),
]




def test_layout() -> None:
    lay = LAYOUTS[0]
    assert lay.shape == (2, 2, 24 * 16, 2, 16)
    assert lay.bytes_per_block == 2 * 2 * 16 * 2 * 16 * 4
    assert KvLayout.from_dict(lay.to_dict()) == lay
    cache = torch.zeros(lay.shape)
    assert KvLayout.of(cache, 16) == lay
    view = lay.blocks_view(cache)
    assert view.shape == (2, 2, 24, 16, 2, 16)
    view[1, 0, 3] = 1.0  # block 3 of layer 1's K is slots [48, 64)
    assert cache[1, 0, 48:64].eq(1).all() and cache.sum() == 16 * 2 * 16
    with pytest.raises(TransferError):
        lay.blocks_view(torch.zeros(lay.shape, dtype=torch.float16))
    with pytest.raises(TransferError):
        lay.blocks_view(torch.zeros(2, 2, 16 * 10, 2, 16))  # other pool size: only with any_num_blocks
    assert lay.blocks_view(torch.zeros(2, 2, 16 * 10, 2, 16), any_num_blocks=True).shape[2] == 10


def test_block_runs() -> None:
    assert block_runs([3, 4, 5, 9, 10], [7, 8, 2, 3, 4]) == [(3, 7, 2), (5, 2, 1), (9, 3, 2)]
    assert block_runs([], []) == []


@pytest.mark.parametrize("dtype,shape", [(torch.bfloat16, (2, 2, 6, 3, 1)), (torch.float16, (1, 2, 6, 1, 3)),
                                         (torch.float32, (3, 2, 8, 2, 4))])
def test_copy_blocks_any_dtype(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    # Odd row sizes take narrower numpy words than int64; bf16 has no numpy dtype at all.
    src = torch.randn(shape).to(dtype).view(shape[0], 2, shape[2], 1, shape[3], shape[4])
    dst = torch.full_like(src, SENTINEL)
    copy_blocks(src, [0, 1, 3], dst, [5, 2, 3])
    for s, d in [(0, 5), (1, 2), (3, 3)]:
        assert torch.equal(raw_bytes(dst[:, :, d]), raw_bytes(src[:, :, s]))
    assert dst[:, :, [0, 1, 4]].eq(SENTINEL).all()
    with pytest.raises(IndexError):
        copy_blocks(src, [0], dst, [shape[2]])


def test_shared_cache_zeroed_and_owner_close_unlinks() -> None:
    shape = (2, 2, 64, 2, 16)
    cache, shm = shared_cache(None, shape, torch.float16, create=True)
    try:
        assert cache.shape == shape and cache.dtype == torch.float16 and not cache.any()
        other, att = shared_cache(shm.name, shape, torch.float16, create=False)
        other[0, 1, 5] = 3.0  # an attacher's write is the owner's data
        assert cache[0, 1, 5].eq(3).all()
        assert isinstance(att.prefault(), bool) and cache[0, 1, 5].eq(3).all() and cache.sum() == 3 * 2 * 16
        with pytest.raises(ValueError, match="needs"):
            shared_cache(shm.name, (4, *shape[1:]), torch.float16, create=False)
        att.close()  # attacher: unmaps only, tensor `other` keeps its mapping meanwhile
        assert shared_cache(shm.name, shape, torch.float16, create=False)[1].close() is None
    finally:
        shm.close()
    with pytest.raises(FileNotFoundError):
        shared_cache(shm.name, shape, torch.float16, create=False)
    cache.fill_(1.0)  # the owner's mapping outlives the name (closing with a live view does not fail)
    shm.close()  # idempotent


def _spawned_writer(name: str, layout: dict, blocks: list[int], seed: int) -> None:
    """Child process: attach to the owner's cache and write `blocks` from a seeded pattern."""
    lay = KvLayout.from_dict(layout)
    cache, shm = shared_cache(name, lay.shape, lay.torch_dtype, create=False)
    src = lay.blocks_view(pattern(lay, lay.num_blocks, seed))
    copy_blocks(src, blocks, lay.blocks_view(cache), blocks)
    del cache
    shm.close()


def test_shared_cache_across_spawned_process() -> None:
    lay = LAYOUTS[1]
    cache, shm = shared_cache(None, lay.shape, lay.torch_dtype, create=True)
    try:
        cache.fill_(SENTINEL)
        blocks = [0, 5, 6, 17, 23]
        p = mp.get_context("spawn").Process(target=_spawned_writer, args=(shm.name, lay.to_dict(), blocks, 11))
        p.start()
        p.join(60)
        assert p.exitcode == 0
        want = lay.blocks_view(pattern(lay, lay.num_blocks, 11))
        view = lay.blocks_view(cache)
        for b in range(lay.num_blocks):
            if b in blocks:
                assert torch.equal(raw_bytes(view[:, :, b]), raw_bytes(want[:, :, b])), b
            else:
                assert view[:, :, b].eq(SENTINEL).all(), b
        # The child's exit left the segment in place.
        shared_cache(shm.name, lay.shape, lay.torch_dtype, create=False)[1].close()
    finally:
        shm.close()


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_attacher_exit_keeps_owner_segment() -> None:
    """An independent process (own resource tracker) attaching and exiting must not destroy the segment."""
    shape = (1, 2, 16, 1, 8)
    # The problem this guards against: a plain SharedMemory attach registers the segment with the attacher's
    # resource tracker, which unlinks it when that process exits.
    _, plain = shared_cache(None, shape, torch.float32, create=True)
    r = _run_python(f"""
        from multiprocessing.shared_memory import SharedMemory
        SharedMemory(name={plain.name!r}).close()
    """)
    assert r.returncode == 0, r.stderr
    with pytest.raises(FileNotFoundError):
        shared_cache(plain.name, shape, torch.float32, create=False)
    plain.close()  # already gone: no error, no tracker warning at exit

    cache, shm = shared_cache(None, shape, torch.float32, create=True)
    try:
        r = _run_python(f"""
            import torch
            from brigade.kv.transfer import shared_cache
            t, shm = shared_cache({shm.name!r}, {shape!r}, torch.float32, create=False)
            t.fill_(2.5)
            del t
            shm.close()
        """)
        assert r.returncode == 0, r.stderr
        assert "leaked" not in r.stderr and "resource_tracker" not in r.stderr, r.stderr
        assert cache.eq(2.5).all()
        again, att = shared_cache(shm.name, shape, torch.float32, create=False)
        assert again.eq(2.5).all()
        att.close()
    finally:
        shm.close()


@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda x: f"bs{x.block_size}-{x.dtype}")
async def test_shm_sender_scattered_blocks(lay: KvLayout) -> None:
    cache, shm = shared_cache(None, lay.shape, lay.torch_dtype, create=True)
    sender = ShmSender()
    try:
        cache.fill_(SENTINEL)
        src = pattern(lay, 12, seed=3)  # the prefill worker's pool is smaller than the decode worker's
        src_blocks = [7, 2, 3, 4, 11, 0]
        dst_blocks = [20, 5, 6, 7, 1, 13]  # scattered, with one consecutive run on both sides (3,4 -> 6,7)
        peer = PeerInfo("decode-1", shm.name, lay)
        await sender.send("r1", src, src_blocks, peer, dst_blocks)
        view, sview = lay.blocks_view(cache), lay.blocks_view(src, any_num_blocks=True)
        for b in range(lay.num_blocks):
            if b in dst_blocks:
                s = src_blocks[dst_blocks.index(b)]
                assert torch.equal(raw_bytes(view[:, :, b]), raw_bytes(sview[:, :, s])), b
            else:
                assert view[:, :, b].eq(SENTINEL).all(), b
        # A second send reuses the attachment.
        attached = sender._peers["decode-1"].shm
        await sender.send("r2", src, [1], peer, [2])
        assert sender._peers["decode-1"].shm is attached
        assert torch.equal(raw_bytes(view[:, :, 2]), raw_bytes(sview[:, :, 1]))
    finally:
        await sender.close()
        shm.close()


async def test_shm_sender_reattaches_after_restart() -> None:
    lay = LAYOUTS[0]
    src = pattern(lay, 4, seed=5)
    sview = lay.blocks_view(src, any_num_blocks=True)
    sender = ShmSender()
    first, shm1 = shared_cache(None, lay.shape, lay.torch_dtype, create=True)
    name = shm1.name
    await sender.send("r1", src, [0], PeerInfo("d", name, lay), [0])
    assert torch.equal(raw_bytes(lay.blocks_view(first)[:, :, 0]), raw_bytes(sview[:, :, 0]))
    shm1.close()
    # The decode worker restarts and recreates a segment under the same name: writes must reach the new one.
    second, shm2 = shared_cache(name, lay.shape, lay.torch_dtype, create=True)
    try:
        await sender.send("r2", src, [1], PeerInfo("d", name, lay), [3])
        assert torch.equal(raw_bytes(lay.blocks_view(second)[:, :, 3]), raw_bytes(sview[:, :, 1]))
    finally:
        shm2.close()
    with pytest.raises(TransferError, match="gone"):
        await sender.send("r3", src, [1], PeerInfo("d", name, lay), [3])
    await sender.close()


async def test_shm_sender_rejects_bad_requests() -> None:
    lay = LAYOUTS[0]
    cache, shm = shared_cache(None, lay.shape, lay.torch_dtype, create=True)
    sender = ShmSender()
    src = pattern(lay, 4, seed=1)
    peer = PeerInfo("d", shm.name, lay)
    try:
        with pytest.raises(TransferError, match="source blocks"):
            await sender.send("r", src, [0, 1], peer, [0])
        with pytest.raises(TransferError, match="source block out of range"):
            await sender.send("r", src, [4], peer, [0])
        with pytest.raises(TransferError, match="destination block out of range"):
            await sender.send("r", src, [0], peer, [lay.num_blocks])
        with pytest.raises(TransferError, match="duplicate"):
            await sender.send("r", src, [0, 1], peer, [2, 2])
        with pytest.raises(TransferError, match="does not match"):
            await sender.send("r", src.half(), [0], peer, [0])
        with pytest.raises(TransferError, match="no shared-memory"):
            await sender.send("r", src, [0], PeerInfo("d2", "", lay), [0])
        assert not cache.any()
    finally:
        await sender.close()
        shm.close()


def test_make_sender() -> None:
    assert isinstance(make_sender("shm"), ShmSender)
    with pytest.raises(ValueError, match="needs a bus"):
        make_sender("nats")
    assert isinstance(make_sender("nats", bus=object(), timeout=1.0), NatsSender)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown KV transport 'rdma'.*shm, nats, nixl, cuda-ipc"):
        make_sender("rdma")
    try:
        import cupy  # type: ignore[import-not-found]

        has_cuda = bool(cupy.cuda.is_available())
    except Exception:
        has_cuda = False
    if not has_cuda:
        with pytest.raises(TransferError, match="cupy|CuPy|CUDA"):
            make_sender("cuda-ipc")


def test_random_scatter_matches_reference() -> None:
    # Many random block maps against an advanced-indexing reference.
    rng = random.Random(0)
    lay = LAYOUTS[1]
    src = lay.blocks_view(pattern(lay, lay.num_blocks, seed=9))
    for _ in range(20):
        n = rng.randint(1, lay.num_blocks)
        sb = rng.sample(range(lay.num_blocks), n)
        db = rng.sample(range(lay.num_blocks), n)
        dst = torch.full_like(src, SENTINEL)
        ref = dst.clone()
        ref[:, :, db] = src[:, :, sb]
        copy_blocks(src, sb, dst, db)
        assert torch.equal(raw_bytes(dst), raw_bytes(ref))
