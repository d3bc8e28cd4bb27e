"""KV page transports: copy a request's prompt KV from a prefill worker's cache into a decode worker's.

Every transport moves the same thing — blocks `src_blocks` of the sender's cache into blocks `dst_blocks`
of the receiver's, K and V of every layer — behind one call, `KvSender.send`, and shares one contract:
when `send` returns, the data is in the receiver's cache, so the prefill worker may send its Handoff.

- `shm`: the decode worker allocates its whole cache in POSIX shared memory (`shared_cache`); a prefill
  worker on the same host attaches by name and writes the blocks itself.
- `nats`: the blocks travel as `KvChunk` requests, each under the bus's max payload; the decode worker's
  `NatsReceiver` writes a chunk before acking it, and `send` returns after the last ack.
- `cuda-ipc`: the decode worker exports a CUDA IPC handle of its cache (`cuda_ipc_cache`); the sender opens
  it once and copies device to device. Needs CuPy and a GPU.

Cache tensors have the runner's shape [layers, 2, num_blocks * block_size, kv_heads, head_dim]; block b is
slots [b * bs, (b + 1) * bs), so `KvLayout.blocks_view` reshapes a cache to [layers, 2, blocks, bs, kvh, d].
"""

from __future__ import annotations

import asyncio
import logging
import math
import mmap
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Protocol

import nats.errors
import numpy as np
import torch
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from brigade.bus import Bus, BusError
from brigade.protocol import Ack, KvChunk, ProtocolError, worker_kv

log = logging.getLogger("brigade.kv.transfer")

TRANSPORTS = ("shm", "nats", "nixl", "cuda-ipc")


class TransferError(RuntimeError):
    """A KV transfer failed: the peer is gone, refused the blocks, timed out, or the layouts disagree."""


def dtype_name(dtype: torch.dtype) -> str:
    """'float16' for torch.float16: the spelling used in layouts and KvChunk messages."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


# ---- layout ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KvLayout:
    """Shape of a paged KV cache: what a sender must know to address the receiver's blocks."""

    layers: int
    block_size: int
    kv_heads: int
    head_dim: int
    dtype: str  # dtype_name(...), e.g. "float16"
    num_blocks: int

    @classmethod
    def of(cls, cache: torch.Tensor, block_size: int) -> KvLayout:
        """The layout of a runner cache tensor [layers, 2, slots, kv_heads, head_dim]."""
        if cache.dim() != 5 or cache.shape[1] != 2 or cache.shape[2] % block_size:
            raise ValueError(f"not a KV cache of block size {block_size}: shape {tuple(cache.shape)}")
        layers, _, slots, kvh, d = cache.shape
        return cls(layers, block_size, kvh, d, dtype_name(cache.dtype), slots // block_size)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """The runner's cache shape."""
        return (self.layers, 2, self.num_blocks * self.block_size, self.kv_heads, self.head_dim)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def bytes_per_block(self) -> int:
        """K and V of one block for every layer."""
        return self.layers * 2 * self.block_size * self.kv_heads * self.head_dim * self.itemsize

    @property
    def nbytes(self) -> int:
        return self.bytes_per_block * self.num_blocks

    def compatible(self, other: KvLayout) -> bool:
        """Same block format (the pools may differ in size)."""
        return (self.layers, self.block_size, self.kv_heads, self.head_dim, self.dtype) == (
            other.layers, other.block_size, other.kv_heads, other.head_dim, other.dtype)

    def blocks_view(self, cache: torch.Tensor, any_num_blocks: bool = False) -> torch.Tensor:
        """[layers, 2, num_blocks, bs, kvh, d] view of `cache` (a sender's own pool may differ in size)."""
        expect = list(self.shape)
        got = list(cache.shape)
        if any_num_blocks and len(got) == 5 and got[2] % self.block_size == 0:
            expect[2] = got[2]
        if got != expect or cache.dtype != self.torch_dtype:
            raise TransferError(f"cache {tuple(got)} {dtype_name(cache.dtype)} does not match layout {self}")
        if not cache.is_contiguous():
            raise TransferError("KV cache must be contiguous")
        return cache.view(self.layers, 2, -1, self.block_size, self.kv_heads, self.head_dim)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KvLayout:
        return cls(**{k: d[k] for k in ("layers", "block_size", "kv_heads", "head_dim", "dtype", "num_blocks")})


@dataclass(frozen=True)
class PeerInfo:
    """Where a decode worker's cache is, from its heartbeat (WorkerStatus) or Allocation."""

    worker_id: str
    shm_name: str  # "" when its pool is not in shared memory
    layout: KvLayout
    host: str = ""
    cuda_ipc_handle: bytes = field(default=b"", repr=False)  # cudaIpcMemHandle of its cache, for cuda-ipc
    nixl: dict[str, Any] | None = field(default=None, repr=False)  # its NIXL agent and cache (NixlPeer.to_dict())


# ---- block copies -----------------------------------------------------------------------------------


def block_runs(src_blocks: Sequence[int], dst_blocks: Sequence[int]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, count) for each stretch where both sides are consecutive block ids."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_blocks, dst_blocks, strict=True):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs


def _rows(blocks: torch.Tensor) -> np.ndarray:
    """A contiguous CPU block view as numpy words [layers * 2, blocks, words] (dtype-agnostic, bf16 too)."""
    r = blocks.reshape(blocks.shape[0] * blocks.shape[1], blocks.shape[2], -1)
    row_bytes = r.shape[2] * r.element_size()
    word = torch.int64 if row_bytes % 8 == 0 else {1: torch.uint8, 2: torch.int16, 4: torch.int32}[r.element_size()]
    return r.view(word).numpy()


def copy_rows(src: np.ndarray, src_blocks: Sequence[int], dst: np.ndarray, dst_blocks: Sequence[int]) -> None:
    """dst[:, dst_blocks[i]] = src[:, src_blocks[i]] on [rows, blocks, words] arrays, one slice copy per run.

    Measured on this CPU (1 thread) against torch: numpy slice copies run near memcpy speed (6-12 GB/s) for
    blocks of 8 KiB-2 MiB, while torch's index_select/index_copy_ over the block dimension reach 1.5 GB/s,
    per-layer torch gathers 3-5 GB/s, and per-block torch copy_ pays ~5 us of dispatch per call.
    """
    for s, d, n in block_runs(src_blocks, dst_blocks):
        # numpy clips out-of-range slices (and broadcasts into the empty result) instead of raising.
        if s < 0 or d < 0 or s + n > src.shape[1] or d + n > dst.shape[1]:
            raise IndexError(f"blocks [{s}, {s + n}) -> [{d}, {d + n}) out of range")
        dst[:, d:d + n] = src[:, s:s + n]


def copy_blocks(src: torch.Tensor, src_blocks: Sequence[int], dst: torch.Tensor, dst_blocks: Sequence[int]) -> None:
    """dst[:, :, dst_blocks[i]] = src[:, :, src_blocks[i]] for block views [layers, 2, blocks, bs, kvh, d]."""
    if not src_blocks:
        return
    if src.device.type == "cpu" and dst.device.type == "cpu":
        copy_rows(_rows(src), src_blocks, _rows(dst), dst_blocks)
        return
    # On a GPU one gather and one scatter are two kernel launches for every layer at once.
    si = torch.tensor(list(src_blocks), dtype=torch.int64, device=src.device)
    di = torch.tensor(list(dst_blocks), dtype=torch.int64, device=dst.device)
    dst.index_copy_(2, di, src.index_select(2, si).to(dst.device, non_blocking=True))


def _check_blocks(src_view: torch.Tensor, src_blocks: Sequence[int], layout: KvLayout,
                  dst_blocks: Sequence[int]) -> None:
    if len(src_blocks) != len(dst_blocks):
        raise TransferError(f"{len(src_blocks)} source blocks for {len(dst_blocks)} destination blocks")
    n_src = src_view.shape[2]
    if any(not 0 <= b < n_src for b in src_blocks):
        raise TransferError(f"source block out of range [0, {n_src}): {list(src_blocks)}")
    if any(not 0 <= b < layout.num_blocks for b in dst_blocks):
        raise TransferError(f"destination block out of range [0, {layout.num_blocks}): {list(dst_blocks)}")
    if len(set(dst_blocks)) != len(dst_blocks):
        raise TransferError(f"duplicate destination blocks: {list(dst_blocks)}")


def check_expected(layout: KvLayout | None, block_ids: Sequence[int]) -> None:
    """For a receiver's allowlist: ValueError unless every id is a block of its pool."""
    assert layout is not None, "start() first"
    n = layout.num_blocks
    if any(not 0 <= b < n for b in block_ids):
        raise ValueError(f"block ids out of range [0, {n}): {list(block_ids)}")


# ---- shared memory ----------------------------------------------------------------------------------


class SharedCacheMemory(SharedMemory):
    """A SharedMemory whose owner unlinks on close and which tolerates tensors still viewing it.

    The cache tensor holds an export of the mapping, so the stock `close()` raises BufferError while any
    view of it is alive. Here close() drops our handles instead; the pages are unmapped when the last view
    dies. Garbage collection only closes (never unlinks), so dropping this object while the cache tensor
    lives on keeps the segment attachable.
    """

    owner: bool = False
    _unlinked: bool = False

    def _release(self) -> None:
        try:
            super().close()
        except BufferError:
            self._buf = None  # type: ignore[assignment]
            self._mmap = None  # type: ignore[assignment]
            fd = getattr(self, "_fd", -1)
            if fd >= 0:
                os.close(fd)
                self._fd = -1

    def close(self) -> None:
        """Unmap (once no tensor views it); the owner also unlinks the name."""
        self._release()
        if self.owner and not self._unlinked:
            self._unlinked = True
            try:
                self.unlink()
            except FileNotFoundError:
                # Someone else removed it; stop our resource tracker from trying again (and warning) at exit.
                resource_tracker.unregister(self._name, "shared_memory")  # type: ignore[attr-defined]

    def __del__(self) -> None:
        try:
            self._release()
        except Exception:  # interpreter shutdown: nothing left to do
            pass

    def prefault(self) -> bool:
        """Map every page now (MADV_POPULATE_WRITE, Linux >= 5.14); False where the kernel cannot.

        Each process faults a shared page on its first touch. Measured here: a first copy into freshly
        attached pages ran at 0.25-0.9 GB/s against ~5 GB/s warm (~16 us per 4 KiB fault); populating
        128 MiB up front took 0.17 s (~5 us a page) and the first copy then ran at full speed.
        """
        if self._mmap is None or not hasattr(self._mmap, "madvise"):
            return False
        try:
            self._mmap.madvise(getattr(mmap, "MADV_POPULATE_WRITE", _MADV_POPULATE_WRITE))
        except OSError:  # EINVAL on older kernels: pages fault in lazily instead
            return False
        return True


_TRACKER_LOCK = threading.Lock()
_MADV_POPULATE_WRITE = 23  # linux/mman.h; Python < 3.13 has no constant for it


def _attach_untracked(name: str) -> SharedCacheMemory:
    """Attach without registering the segment with this process's resource tracker.

    Python < 3.13 registers every attach; when the attaching process exits its tracker unlinks the
    owner's segment (and warns about a "leak"). Unregistering after the fact is wrong when the attacher
    shares the owner's tracker (a multiprocessing child): it would drop the owner's registration too. So
    skip registration: 3.13's `track=False`, or a short, locked stub of `resource_tracker.register`.
    """
    if sys.version_info >= (3, 13):
        return SharedCacheMemory(name=name, create=False, track=False)  # type: ignore[call-arg]
    with _TRACKER_LOCK:
        register = resource_tracker.register
        resource_tracker.register = lambda *a, **k: None  # type: ignore[assignment]
        try:
            return SharedCacheMemory(name=name, create=False)
        finally:
            resource_tracker.register = register  # type: ignore[assignment]


def shared_cache(name: str | None, shape: tuple[int, ...], dtype: torch.dtype,
                 create: bool) -> tuple[torch.Tensor, SharedCacheMemory]:
    """A tensor over POSIX shared memory: create it (zeroed; owner) or attach to `name` (attacher).

    The tensor (and every view of it) keeps its mapping alive by itself. `close()` the SharedMemory when
    done: the owner's close unlinks the name (mappings stay valid until their last view dies), an
    attacher's close only lets go of its mapping.
    """
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes <= 0:
        raise ValueError(f"empty shared cache shape {shape}")
    if create:
        shm = SharedCacheMemory(name=name, create=True, size=nbytes)
        shm.owner = True
        try:
            # ftruncate leaves tmpfs pages unbacked: a /dev/shm too small for the cache would SIGBUS at some
            # later write. Reserving now fails cleanly instead (and the pages read as zeros either way).
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(shm._fd, 0, nbytes)  # type: ignore[attr-defined]
        except OSError as e:
            shm.close()
            raise OSError(e.errno, f"cannot reserve {nbytes} bytes of shared memory for the KV cache "
                                   f"(is /dev/shm large enough?): {e.strerror}") from e
    else:
        if not name:
            raise ValueError("attaching to a shared cache needs its name")
        shm = _attach_untracked(name)
        if shm.size < nbytes:
            shm.close()
            raise ValueError(f"shared memory {name!r} has {shm.size} bytes, {shape} {dtype} needs {nbytes}")
    # Not torch.frombuffer: it keeps the memoryview but drops its buffer export, so closing the SharedMemory
    # unmaps the pages under a live tensor (a segfault at the next access). A numpy array holds the export,
    # which keeps the mapping alive for as long as any tensor view of it exists.
    words = np.frombuffer(shm.buf, dtype=np.uint8, count=nbytes)
    tensor = torch.from_numpy(words).view(dtype).view(shape)
    return tensor, shm


def _shm_inode(name: str) -> int | None:
    """Identity of a segment by name (Linux): a restarted worker reusing a name gets a new inode."""
    try:
        return os.stat(f"/dev/shm/{name.lstrip('/')}").st_ino
    except OSError:
        return None


# ---- senders ----------------------------------------------------------------------------------------


class KvSender(Protocol):
    """Copies blocks of the sender's cache into a peer's blocks; the data is in place when send returns."""

    async def send(self, request_id: str, src: torch.Tensor, src_blocks: list[int], peer: PeerInfo,
                   dst_blocks: list[int]) -> None: ...

    async def close(self) -> None: ...


@dataclass
class _Attached:
    name: str
    inode: int | None
    layout: KvLayout
    view: torch.Tensor
    shm: SharedCacheMemory


class ShmSender:
    """Writes blocks straight into a same-host decode worker's shared-memory cache.

    `prefault`: map the whole peer cache once at attach (see SharedCacheMemory.prefault), so the first
    transfers into each page do not pay a page fault per 4 KiB.
    """

    def __init__(self, prefault: bool = True) -> None:
        self.prefault = prefault
        self._peers: dict[str, _Attached] = {}
        self._lock = threading.Lock()  # attachments are made in worker threads

    def _attach(self, peer: PeerInfo) -> torch.Tensor:
        with self._lock:
            return self._attach_locked(peer)

    def _attach_locked(self, peer: PeerInfo) -> torch.Tensor:
        cur = self._peers.get(peer.worker_id)
        inode = _shm_inode(peer.shm_name)
        if cur is not None and cur.name == peer.shm_name and cur.layout == peer.layout and cur.inode == inode:
            return cur.view
        if cur is not None:  # the worker restarted (new segment) or resized: drop the stale mapping
            del self._peers[peer.worker_id]
            cur.shm.close()
        layout = peer.layout
        try:
            tensor, shm = shared_cache(peer.shm_name, layout.shape, layout.torch_dtype, create=False)
        except FileNotFoundError as e:
            raise TransferError(f"shared KV pool {peer.shm_name!r} of worker {peer.worker_id} is gone "
                                f"(worker restarted, or on another host)") from e
        except ValueError as e:
            raise TransferError(str(e)) from e
        view = layout.blocks_view(tensor)
        if self.prefault:
            shm.prefault()
        self._peers[peer.worker_id] = _Attached(peer.shm_name, _shm_inode(peer.shm_name), layout, view, shm)
        return view

    def _send(self, src_view: torch.Tensor, src_blocks: list[int], peer: PeerInfo, dst_blocks: list[int]) -> None:
        copy_blocks(src_view, src_blocks, self._attach(peer), dst_blocks)

    async def send(self, request_id: str, src: torch.Tensor, src_blocks: list[int], peer: PeerInfo,
                   dst_blocks: list[int]) -> None:
        if not peer.shm_name:
            raise TransferError(f"worker {peer.worker_id} has no shared-memory KV pool")
        src_view = peer.layout.blocks_view(src, any_num_blocks=True)
        _check_blocks(src_view, src_blocks, peer.layout, dst_blocks)
        # Attaching (and prefaulting) and copying are memory-bound work outside the GIL: keep the event loop
        # responsive meanwhile.
        await asyncio.to_thread(self._send, src_view, src_blocks, peer, dst_blocks)

    async def close(self) -> None:
        for a in self._peers.values():
            a.shm.close()
        self._peers.clear()


# Room in a KvChunk message for everything but the data: msgpack keys, version, kind, dtype (block ids and the
# request id are counted separately).
_CHUNK_OVERHEAD = 128
_MSGPACK_INT = 9  # worst case bytes of one packed block id


def _require_little_endian() -> None:
    if sys.byteorder != "little":
        raise TransferError("the nats KV transport sends raw little-endian arrays; this host is big-endian")


class NatsSender:
    """Sends blocks as KvChunk requests to the peer's `worker_kv` subject, a few in flight at a time.

    Request/reply gives flow control (at most `window` chunks unacknowledged) and per-chunk errors; the
    receiver writes a chunk before acking it, so once every ack is in, the whole transfer is in place.
    """

    def __init__(self, bus: Bus, timeout: float = 5.0, window: int = 4, max_chunk_bytes: int | None = None) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.bus = bus
        self.timeout = timeout
        self.window = window
        self.max_chunk_bytes = max_chunk_bytes

    def blocks_per_chunk(self, layout: KvLayout, request_id: str) -> int:
        limit = self.bus.max_payload
        if self.max_chunk_bytes is not None:
            limit = min(limit, self.max_chunk_bytes)
        room = limit - _CHUNK_OVERHEAD - len(request_id.encode())
        n = room // (layout.bytes_per_block + _MSGPACK_INT)
        if n < 1:
            # KvChunk has no layer range, so a block cannot be split across messages.
            raise TransferError(f"one KV block is {layout.bytes_per_block} bytes, over the {limit}-byte chunk "
                                f"limit: raise the NATS server's max_payload or use another transport")
        return n

    async def send(self, request_id: str, src: torch.Tensor, src_blocks: list[int], peer: PeerInfo,
                   dst_blocks: list[int]) -> None:
        _require_little_endian()
        layout = peer.layout
        src_view = layout.blocks_view(src, any_num_blocks=True)
        _check_blocks(src_view, src_blocks, layout, dst_blocks)
        if not src_blocks:
            return
        per = self.blocks_per_chunk(layout, request_id)
        starts = range(0, len(src_blocks), per)
        subject = worker_kv(peer.worker_id)
        in_flight: set[asyncio.Task[None]] = set()
        try:
            for k, a in enumerate(starts):
                # Gathering one chunk (<= max payload, ~1 MiB) takes ~0.1 ms: not worth a thread hop.
                payload = self._encode(request_id, src_view, src_blocks[a:a + per], dst_blocks[a:a + per], layout)
                what = f"KV chunk {k + 1}/{len(starts)} of {request_id} to {peer.worker_id}"
                in_flight.add(asyncio.create_task(self._request(subject, payload, what)))
                while len(in_flight) >= self.window:
                    done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    for t in done:
                        t.result()
            while in_flight:
                done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_EXCEPTION)
                for t in done:
                    t.result()
        finally:
            for t in in_flight:
                t.cancel()

    @staticmethod
    def _encode(request_id: str, src_view: torch.Tensor, src_blocks: list[int], dst_blocks: list[int],
                layout: KvLayout) -> bytes:
        src_rows = _rows(src_view)
        buf = np.empty((src_rows.shape[0], len(src_blocks), src_rows.shape[2]), dtype=src_rows.dtype)
        copy_rows(src_rows, src_blocks, buf, range(len(src_blocks)))
        # buf is [layers * 2, n, words], byte-identical to [layers, 2, n, bs, kvh, d].
        return KvChunk(request_id, list(dst_blocks), layout.dtype, buf.tobytes()).encode()

    async def _request(self, subject: str, payload: bytes, what: str) -> None:
        try:
            reply = await self.bus.request(subject, payload, timeout=self.timeout)
        except (BusError, nats.errors.Error) as e:
            raise TransferError(f"{what}: {e}") from e
        try:
            ack = Ack.decode(reply)
        except ProtocolError as e:
            raise TransferError(f"{what}: bad reply: {e}") from e
        if not ack.ok:
            raise TransferError(f"{what} refused: {ack.error}")

    async def close(self) -> None:
        """Nothing to release: the bus belongs to the caller."""


def _cupy() -> Any:
    """CuPy with a usable CUDA device, or a TransferError that says what is missing."""
    try:
        import cupy  # type: ignore[import-not-found]
    except ImportError as e:
        raise TransferError("the cuda-ipc KV transport needs CuPy: pip install cupy-cuda12x") from e
    try:
        available = bool(cupy.cuda.is_available())
    except Exception:  # a broken driver raises instead of answering
        available = False
    if not available:
        raise TransferError("the cuda-ipc KV transport needs a CUDA device; CuPy sees none")
    return cupy


def cuda_ipc_cache(shape: tuple[int, ...], dtype: torch.dtype, device: int = 0) -> tuple[torch.Tensor, bytes]:
    """Decode side: a zeroed cache in its own cudaMalloc allocation, and its IPC handle to advertise.

    IPC handles name a whole allocation; torch's caching allocator may place a tensor inside a larger
    segment, so the cache gets a dedicated allocation whose base is the tensor's first byte.
    """
    cp = _cupy()
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    with cp.cuda.Device(device):
        mem = cp.cuda.Memory(nbytes)
        arr = cp.ndarray((nbytes,), dtype=cp.uint8, memptr=cp.cuda.MemoryPointer(mem, 0))
        arr.fill(0)
        handle = bytes(cp.cuda.runtime.ipcGetMemHandle(mem.ptr))
        cp.cuda.runtime.deviceSynchronize()
    # as_tensor over __cuda_array_interface__ keeps `arr` (and so the allocation) alive with the tensor.
    tensor = torch.as_tensor(arr, device=f"cuda:{device}").view(dtype).view(shape)
    return tensor, handle


@dataclass
class _Opened:
    handle: bytes
    ptr: int
    view: torch.Tensor
    keep: Any  # the CuPy array over the opened pointer


class CudaIpcSender:
    """Device-to-device copies into a decode worker's cache opened from its CUDA IPC handle (same host)."""

    def __init__(self) -> None:
        self._cp = _cupy()
        self._peers: dict[str, _Opened] = {}

    def _open(self, peer: PeerInfo, device: torch.device) -> torch.Tensor:
        if not peer.cuda_ipc_handle:
            raise TransferError(f"worker {peer.worker_id} advertises no CUDA IPC handle")
        cur = self._peers.get(peer.worker_id)
        if cur is not None and cur.handle == peer.cuda_ipc_handle:
            return cur.view
        if cur is not None:  # the worker restarted: its old allocation is gone
            self._close_one(self._peers.pop(peer.worker_id))
        cp = self._cp
        layout = peer.layout
        with cp.cuda.Device(device.index or 0):
            try:
                ptr = cp.cuda.runtime.ipcOpenMemHandle(peer.cuda_ipc_handle)
            except Exception as e:  # CUDARuntimeError: stale handle, other host, no peer access
                raise TransferError(f"cannot open the CUDA IPC handle of worker {peer.worker_id}: {e}") from e
            mem = cp.cuda.UnownedMemory(ptr, layout.nbytes, None, device.index or 0)
            arr = cp.ndarray((layout.nbytes,), dtype=cp.uint8, memptr=cp.cuda.MemoryPointer(mem, 0))
        view = layout.blocks_view(torch.as_tensor(arr, device=device).view(layout.torch_dtype).view(layout.shape))
        self._peers[peer.worker_id] = _Opened(peer.cuda_ipc_handle, ptr, view, arr)
        return view

    def _copy(self, src_view: torch.Tensor, src_blocks: list[int], dst_view: torch.Tensor,
              dst_blocks: list[int]) -> None:
        copy_blocks(src_view, src_blocks, dst_view, dst_blocks)
        # The decode process reads with its own streams: the copy must be finished before the Handoff.
        torch.cuda.current_stream(src_view.device).synchronize()

    async def send(self, request_id: str, src: torch.Tensor, src_blocks: list[int], peer: PeerInfo,
                   dst_blocks: list[int]) -> None:
        if src.device.type != "cuda":
            raise TransferError(f"cuda-ipc sends from a CUDA cache, not {src.device}")
        src_view = peer.layout.blocks_view(src, any_num_blocks=True)
        _check_blocks(src_view, src_blocks, peer.layout, dst_blocks)
        dst_view = self._open(peer, src.device)
        await asyncio.to_thread(self._copy, src_view, src_blocks, dst_view, dst_blocks)

    def _close_one(self, o: _Opened) -> None:
        try:
            self._cp.cuda.runtime.ipcCloseMemHandle(o.ptr)
        except Exception as e:  # closing a handle whose owner died: nothing to recover
            log.debug("ipcCloseMemHandle failed: %s", e)

    async def close(self) -> None:
        for o in self._peers.values():
            self._close_one(o)
        self._peers.clear()


def make_sender(name: str, bus: Bus | None = None, **kwargs: Any) -> KvSender:
    """The sender of transport `name`: "shm", "nats" (needs `bus`), "nixl" (an optional extra) or "cuda-ipc"."""
    if name == "shm":
        return ShmSender()
    if name == "nats":
        if bus is None:
            raise ValueError("the nats KV transport needs a bus")
        return NatsSender(bus, **kwargs)
    if name == "cuda-ipc":
        return CudaIpcSender()
    if name == "nixl":
        from brigade.kv import nixl

        nixl.nixl_api()  # fail now, naming the package to install, not at the first transfer
        return nixl.NixlSender(**kwargs)
    raise ValueError(f"unknown KV transport {name!r}; expected one of {', '.join(TRANSPORTS)}")


# ---- receiver ---------------------------------------------------------------------------------------


class _Refused(Exception):
    """A chunk we will not write; its message goes back in the Ack."""


class NatsReceiver:
    """Decode side of the `nats` transport: writes KvChunk blocks into the cache and acks each chunk.

    Only blocks registered with `expect(request_id, block_ids)` are written, so a late or misaddressed chunk
    cannot overwrite blocks that now belong to someone else. Chunks of one subscription are handled one at
    a time, in order, so once the last ack went out every earlier chunk is in the cache.
    """

    def __init__(self, offload_bytes: int = 256 << 10) -> None:
        self.offload_bytes = offload_bytes  # chunks at least this large are written in a worker thread
        # Guards the allowlist against a write in progress: after forget() returns, no write to the
        # forgotten request's blocks is under way or will start.
        self._lock = threading.Lock()
        self._expected: dict[str, frozenset[int]] = {}
        self._received: dict[str, set[int]] = {}
        self._bus: Bus | None = None
        self._sub: Subscription | None = None
        self._rows: np.ndarray | None = None
        self._layout: KvLayout | None = None

    async def start(self, bus: Bus, worker_id: str, cache: torch.Tensor, layout: KvLayout) -> None:
        _require_little_endian()
        if cache.device.type != "cpu":
            raise TransferError("the nats KV receiver writes into a CPU cache")
        self._rows = _rows(layout.blocks_view(cache))
        self._layout = layout
        self._bus = bus
        self._sub = await bus.subscribe(worker_kv(worker_id), self._on_chunk)
        await bus.flush()  # the subscription is live at the server once start returns

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    def expect(self, request_id: str, block_ids: Sequence[int]) -> None:
        """Allow chunks of `request_id` into `block_ids` (the blocks allocated for it)."""
        check_expected(self._layout, block_ids)
        with self._lock:
            self._expected[request_id] = frozenset(block_ids)
            self._received[request_id] = set()

    def forget(self, request_id: str) -> None:
        """Refuse further chunks of `request_id` (handed off, cancelled, or its lease expired)."""
        with self._lock:
            self._expected.pop(request_id, None)
            self._received.pop(request_id, None)

    def received(self, request_id: str) -> frozenset[int]:
        with self._lock:
            return frozenset(self._received.get(request_id, ()))

    def complete(self, request_id: str) -> bool:
        """Every expected block of `request_id` has been written."""
        with self._lock:
            want = self._expected.get(request_id)
            return want is not None and want <= self._received[request_id]

    def _decode(self, data: bytes) -> tuple[KvChunk, np.ndarray]:
        assert self._layout is not None and self._rows is not None
        layout = self._layout
        chunk = KvChunk.decode(data)  # ProtocolError when undecodable or a field is missing
        ids = chunk.block_ids
        if not isinstance(ids, list) or not all(isinstance(b, int) for b in ids):
            raise _Refused("block_ids must be a list of ints")
        if chunk.dtype != layout.dtype:
            raise _Refused(f"dtype {chunk.dtype!r}, this cache holds {layout.dtype!r}")
        if not isinstance(chunk.data, bytes) or len(chunk.data) != len(ids) * layout.bytes_per_block:
            raise _Refused(f"{len(chunk.data)} bytes for {len(ids)} blocks of {layout.bytes_per_block}")
        rows = np.frombuffer(chunk.data, dtype=self._rows.dtype).reshape(self._rows.shape[0], len(ids), -1)
        return chunk, rows

    def _apply(self, request_id: str, block_ids: list[int], rows: np.ndarray) -> None:
        assert self._rows is not None
        with self._lock:
            allowed = self._expected.get(request_id)
            if allowed is None:
                raise _Refused(f"no blocks expected for request {request_id!r}")
            stray = sorted(set(block_ids) - allowed)
            if stray:
                raise _Refused(f"blocks {stray} are not allocated to request {request_id!r}")
            if len(set(block_ids)) != len(block_ids):
                raise _Refused("duplicate block ids in one chunk")
            copy_rows(rows, range(len(block_ids)), self._rows, block_ids)
            self._received[request_id].update(block_ids)

    async def _on_chunk(self, msg: Msg) -> None:
        assert self._bus is not None
        try:
            chunk, rows = self._decode(msg.data)
            if len(chunk.data) >= self.offload_bytes:
                await asyncio.to_thread(self._apply, chunk.request_id, chunk.block_ids, rows)
            else:
                self._apply(chunk.request_id, chunk.block_ids, rows)
            ack = Ack()
        except (_Refused, ProtocolError) as e:
            ack = Ack(ok=False, error=str(e))
        except Exception as e:  # a bug here must still answer, or the sender waits for its timeout
            log.exception("KV chunk failed")
            ack = Ack(ok=False, error=f"receiver error: {e!r}")
        await self._bus.respond(msg, ack)
