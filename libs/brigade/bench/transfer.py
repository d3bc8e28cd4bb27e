"""KV transfer throughput: a prompt's blocks moved by each transport, next to a plain memcpy of the same bytes."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
import torch

from brigade.bus import Bus
from brigade.kv import transfer
from brigade.model.config import load_config
from brigade.nats_server import NatsServer


@dataclass
class TransferResult:
    name: str
    bytes: int
    seconds: float  # best of the repeats

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9


def _layout(model_dir: str, num_blocks: int, block_size: int) -> transfer.KvLayout:
    cfg = load_config(model_dir)
    return transfer.KvLayout(cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim, "float32", num_blocks)


def _best(fn: object, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - t0)
    return best


async def _measure(model_dir: str, prompt_tokens: int, repeats: int) -> list[TransferResult]:
    bs = 16
    n = -(-prompt_tokens // bs)
    num_blocks = 4 * n
    lay = _layout(model_dir, num_blocks, bs)
    src = torch.randn(lay.shape, dtype=lay.torch_dtype)
    # Scattered blocks on both sides, as a real pool hands them out.
    g = torch.Generator().manual_seed(0)
    src_blocks = torch.randperm(num_blocks, generator=g)[:n].tolist()
    dst_blocks = torch.randperm(num_blocks, generator=g)[:n].tolist()
    nbytes = n * lay.bytes_per_block
    results = []

    flat_src = src.view(-1)[: nbytes // 4].clone()
    flat_dst = torch.empty_like(flat_src)
    np_src, np_dst = flat_src.numpy(), flat_dst.numpy()
    # A plain memcpy is one thread; torch's copy_ splits the same bytes over every core: both are shown.
    results.append(TransferResult("memcpy (1 thread, contiguous)", nbytes,
                                  _best(lambda: np.copyto(np_dst, np_src), repeats)))
    results.append(TransferResult("torch copy_ (all cores, contiguous)", nbytes,
                                  _best(lambda: flat_dst.copy_(flat_src), repeats)))

    dst, shm = transfer.shared_cache(None, lay.shape, lay.torch_dtype, create=True)
    try:
        peer = transfer.PeerInfo("bench-decode", shm.name, lay)
        sender = transfer.ShmSender()
        await sender.send("warm", src, src_blocks, peer, dst_blocks)
        best = float("inf")
        for i in range(repeats):
            t0 = time.perf_counter()
            await sender.send(f"r{i}", src, src_blocks, peer, dst_blocks)
            best = min(best, time.perf_counter() - t0)
        results.append(TransferResult("shm (scattered blocks)", nbytes, best))
        await sender.close()
        view = lay.blocks_view(dst)
        assert torch.equal(view[:, :, dst_blocks], lay.blocks_view(src)[:, :, src_blocks])
    finally:
        shm.close()

    with NatsServer(jetstream=False) as server:
        pbus = await Bus.connect(server.url, "bench-prefill")
        dbus = await Bus.connect(server.url, "bench-decode")
        cache = torch.zeros(lay.shape, dtype=lay.torch_dtype)
        receiver = transfer.NatsReceiver()
        await receiver.start(dbus, "bench-decode", cache, lay)
        sender2 = transfer.NatsSender(pbus, timeout=30.0)
        peer2 = transfer.PeerInfo("bench-decode", "", lay)
        best = float("inf")
        for i in range(repeats):
            rid = f"n{i}"
            receiver.expect(rid, dst_blocks)
            t0 = time.perf_counter()
            await sender2.send(rid, src, src_blocks, peer2, dst_blocks)
            best = min(best, time.perf_counter() - t0)
            receiver.forget(rid)
        results.append(TransferResult("nats (chunked, loopback)", nbytes, best))
        await receiver.stop()
        await pbus.close()
        await dbus.close()
    return results


def measure(model_dir: str, prompt_tokens: int = 2048, repeats: int = 5) -> list[TransferResult]:
    """Move one `prompt_tokens` prompt's KV blocks of this model with each transport; best of `repeats`."""
    return asyncio.run(_measure(model_dir, prompt_tokens, repeats))


def summary(results: list[TransferResult]) -> str:
    base = results[0].gbps
    lines = [f"{r.name:34s} {r.bytes / 1e6:8.1f} MB  {r.seconds * 1e3:8.2f} ms  {r.gbps:6.2f} GB/s  "
             f"{r.gbps / base:5.2f}x memcpy" for r in results]
    return "\n".join(lines)
