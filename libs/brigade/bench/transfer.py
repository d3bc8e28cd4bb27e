"""KV transfer throughput: a prompt's blocks moved by each transport, next to a plain memcpy of the same bytes."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
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
    try:
        from brigade.kv import nixl
        nixl.nixl_api()
    except (ImportError, transfer.TransferError):
        return results  # not installed: no nixl rows
    for tls, label in (("tcp,sm,self", "nixl (UCX tcp,sm,self)"), ("tcp,self", "nixl (UCX tcp only)")):
        best = await _nixl_best(lay, src, src_blocks, dst_blocks, repeats, tls)
        results.append(TransferResult(f"{label}, other process", nbytes, best))
    return results


# The decode side of a nixl measurement, in its own process: a pool registered with a NIXL agent whose NixlPeer goes
# to stdout, expecting the given requests' blocks (as a decode worker does once it has allocated them, which is
# also what switches its UCX polling to busy); it polls notifications until stdin closes.
_NIXL_RECEIVER = """
import asyncio, sys, msgpack, torch
from brigade.kv.nixl import NixlReceiver
from brigade.kv.transfer import KvLayout
async def main():
    lay, rids, blocks = msgpack.unpackb(bytes.fromhex(sys.argv[1]))
    lay = KvLayout.from_dict(lay)
    cache = torch.zeros(lay.shape, dtype=lay.torch_dtype)
    r = NixlReceiver()
    await r.start("bench-decode", cache, lay)
    for rid in rids:
        r.expect(rid, blocks)
    print(msgpack.packb(r.peer().to_dict()).hex(), flush=True)
    await asyncio.to_thread(sys.stdin.read)
    await r.stop()
asyncio.run(main())
"""


async def _nixl_best(lay: transfer.KvLayout, src: torch.Tensor, src_blocks: list[int], dst_blocks: list[int],
                     repeats: int, tls: str) -> float:
    """Best time of one WRITE of the blocks into another process's pool, UCX limited to `tls`."""
    import msgpack

    from brigade.kv.nixl import NixlSender

    env = {**os.environ, "UCX_TLS": tls, "UCX_NET_DEVICES": os.environ.get("UCX_NET_DEVICES", "lo")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _NIXL_RECEIVER,
        msgpack.packb([lay.to_dict(), ["warm", *(f"x{i}" for i in range(repeats))], dst_blocks]).hex(), env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    saved = {k: os.environ.get(k) for k in ("UCX_TLS", "UCX_NET_DEVICES")}
    os.environ.update({k: env[k] for k in saved})  # read when the sender's agent is created
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        peer = transfer.PeerInfo("bench-decode", "", lay, nixl=msgpack.unpackb(bytes.fromhex(line.decode().strip())))
        sender = NixlSender(timeout=30.0)
        await sender.send("warm", src, src_blocks, peer, dst_blocks)  # connects
        best = float("inf")
        for i in range(repeats):
            t0 = time.perf_counter()
            await sender.send(f"x{i}", src, src_blocks, peer, dst_blocks)
            best = min(best, time.perf_counter() - t0)
        await sender.close()
        proc.stdin.close()
        await asyncio.wait_for(proc.wait(), 30)
        return best
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if proc.returncode is None:
            proc.kill()


def measure(model_dir: str, prompt_tokens: int = 2048, repeats: int = 5) -> list[TransferResult]:
    """Move one `prompt_tokens` prompt's KV blocks of this model with each transport; best of `repeats`."""
    return asyncio.run(_measure(model_dir, prompt_tokens, repeats))


def summary(results: list[TransferResult]) -> str:
    base = results[0].gbps
    lines = [f"{r.name:34s} {r.bytes / 1e6:8.1f} MB  {r.seconds * 1e3:8.2f} ms  {r.gbps:6.2f} GB/s  "
             f"{r.gbps / base:5.2f}x memcpy" for r in results]
    return "\n".join(lines)


def handoff_latency(model_dir: str, transports: tuple[str, ...] = ("shm", "nats", "nixl"), requests: int = 8,
                    prompt_tokens: int = 2048) -> list[dict[str, float | str]]:
    """What a disaggregated request pays for moving its KV: per system, the median time to the first and to the
    second token of `requests` sequential streamed requests (distinct prompts, nothing cached). In disaggregated
    mode the prefill worker sends the first token, so the transfer and handoff show in the gap to the second.
    Every model process gets one core (colocated: one worker with one thread)."""
    import random
    import statistics

    import httpx

    from brigade.launcher import Up, UpConfig, free_port

    vocab = load_config(model_dir).vocab_size
    served = os.path.basename(model_dir.rstrip("/"))
    rng = random.Random(0)
    prompts = [[rng.randrange(16, vocab) for _ in range(prompt_tokens)] for _ in range(requests + 1)]
    systems = [("colocated", UpConfig(model=model_dir, port=0, decode=1, worker_args=("--threads", "1")))]
    systems += [(f"disagg {t}", UpConfig(model=model_dir, port=0, mode="disagg", kv_transport=t)) for t in transports]
    out: list[dict[str, float | str]] = []
    for name, cfg in systems:
        up = Up(dataclasses.replace(cfg, port=free_port()))
        firsts, gaps = [], []
        try:
            url = up.start(timeout=300)
            for i, prompt in enumerate(prompts):
                body = {"model": served, "prompt": prompt, "max_tokens": 2, "ignore_eos": True, "temperature": 0,
                        "stream": True}
                t0 = time.perf_counter()
                stamps = []
                with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {") and '"text"' in line:
                            stamps.append(time.perf_counter() - t0)
                if i and len(stamps) >= 2:  # the first request warms up
                    firsts.append(stamps[0])
                    gaps.append(stamps[1] - stamps[0])
        finally:
            up.stop()
        out.append({"system": name, "ttft_ms": statistics.median(firsts) * 1e3,
                    "second_token_gap_ms": statistics.median(gaps) * 1e3})
    return out
