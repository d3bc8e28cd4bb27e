"""`nixl` KV transport: one-sided WRITEs over NIXL/UCX from a prefill worker's cache into a decode worker's.

The decode worker's `NixlReceiver` owns a NIXL agent that registers its whole cache and publishes a `NixlPeer`
(agent metadata, base address, block geometry) in its heartbeat. A prefill worker's `NixlSender` adds that agent
once, prepares one descriptor per (layer, K|V, block) on both sides, and per request posts one WRITE of all the
request's blocks carrying a notification; NIXL merges descriptors that are contiguous on both sides, so a run of
consecutive blocks moves as one piece per layer row. The notification arrives after the data.

Unlike `nats`, the receiver cannot refuse a write: the bytes land before it sees the notification. Its allowlist
(`expect`/`forget`) decides only what counts as received; a write for a forgotten request or into blocks it did
not expect is logged and ignored, but has already happened. Blocks of a forgotten request whose notification
never came may still be written until the sender's timeout has passed.

Neither side runs NIXL's progress thread (it spins a core: its delay is hard-wired to 0 in nixl 1.5.1's Python
API). Instead the receiver polls from a thread (UCX needs the target to make progress for connection setup and
transfer completion), and the sender drives its transfers from one executor thread polled by the event loop.

nixl-cu12 1.5.1 / UCX crash the process (not raise) in three cases this module steers around: an agent holding
two registrations of the same memory while one is in use (the sender keeps at most one per region), a post to
an agent stopped in the same process (refused up front), and destroying an agent right after a post to a dead
peer failed (the sender makes progress first). See `NixlSender._local_side`, `_STOPPED_HERE` and `_fail`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import msgpack
import numpy as np
import torch

from brigade.kv.transfer import KvLayout, PeerInfo, TransferError, _check_blocks, check_expected

log = logging.getLogger("brigade.kv.nixl")

INSTALL_HINT = "pip install nixl-cu12==1.5.1 && pip install --no-deps nixl==1.5.1"
MEM_TYPES = ("DRAM", "VRAM")

# Agents of receivers stopped in this process. Posting to one of them from an agent in the same process can
# crash inside UCX (ucp_put_nbx segfaults; seen with nixl-cu12 1.5.1), where another process's dead agent
# just gives nixlRemoteDisconnectError: senders check this first.
_STOPPED_HERE: set[str] = set()


def ucx_defaults(mem_type: str | None = "DRAM") -> None:
    """Environment defaults for NIXL and UCX, each set only where unset; takes effect for agents created later.

    UCX_TLS=tcp,sm,self is what STACK.md measured for host memory (puts go zero-copy over cma, tcp carries
    control and notifications). GPU memory needs cuda_copy/cuda_ipc/rc, so for VRAM (or None: not known yet)
    UCX_TLS is left to UCX. UCX_NET_DEVICES is not set here: tests use lo, deployments their NICs.
    """
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")  # nixl's Python logger prints INFO lines to stdout
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    if mem_type == "DRAM":
        os.environ.setdefault("UCX_TLS", "tcp,sm,self")


def nixl_api() -> Any:
    """nixl._api, or a TransferError that says how to install it."""
    ucx_defaults(None)  # NIXL_LOG_LEVEL is read when nixl is first imported
    try:
        import nixl._api as api  # type: ignore[import-not-found,import-untyped]
    except ImportError as e:
        raise TransferError(f"the nixl KV transport needs the nixl package: {INSTALL_HINT}") from e
    if os.environ.get("NIXL_LOG_LEVEL", "").upper() == "WARN":
        logging.getLogger("nixl").setLevel(logging.WARNING)  # also where nixl was imported before us
    return api


def _new_agent(prefix: str, mem_type: str) -> Any:
    if mem_type not in MEM_TYPES:
        raise ValueError(f"memory type must be one of {MEM_TYPES}, not {mem_type!r}")
    ucx_defaults(mem_type)
    api = nixl_api()
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"  # unique: a restarted worker must not reuse its old agent's name
    try:
        # Progress thread off: with a 0 us delay it spins a core; we poll instead.
        return api.nixl_agent(name, api.nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
    except Exception as e:  # nixlBackendError and friends: UCX could not start with these settings
        raise TransferError(f"cannot create a NIXL agent with UCX: {e!r}") from e


def _mem_type(tensor: torch.Tensor, mem_type: str | None) -> str:
    want = "VRAM" if tensor.device.type == "cuda" else "DRAM"
    if mem_type is not None and mem_type != want:
        raise TransferError(f"memory type {mem_type} for a tensor on {tensor.device}")
    return want


def _device_id(tensor: torch.Tensor) -> int:
    return (tensor.device.index or 0) if tensor.device.type == "cuda" else 0


def _descs(addr: int, rows: int, num_blocks: int, row_block: int, device: int) -> np.ndarray:
    """(address, length, device) of every (row, block) piece, row-major: index = row * num_blocks + block.

    A row is one layer's K or V: [num_blocks * block_size, kv_heads, head_dim], so block b of row r starts at
    addr + (r * num_blocks + b) * row_block.
    """
    out = np.empty((rows * num_blocks, 3), dtype=np.uint64)
    out[:, 0] = addr + np.arange(rows * num_blocks, dtype=np.uint64) * np.uint64(row_block)
    out[:, 1] = row_block
    out[:, 2] = device
    return out


def _indices(rows: int, num_blocks: int, blocks: Sequence[int]) -> np.ndarray:
    """Descriptor indices of `blocks` in every row, row by row: consecutive blocks sit next to each other."""
    b = np.asarray(blocks, dtype=np.int64)
    return (np.arange(rows, dtype=np.int64)[:, None] * num_blocks + b[None, :]).ravel().astype(np.int32)


# ---- what the decode worker publishes -----------------------------------------------------------------


@dataclass(frozen=True)
class NixlPeer:
    """A decode worker's NIXL agent and where its cache is: what a sender needs to write into it."""

    agent: str  # agent name, unique per receiver start
    metadata: bytes = field(repr=False)  # nixl agent metadata (~400 bytes), for add_remote_agent
    addr: int  # base address of the cache in the receiver's process
    nbytes: int
    num_blocks: int
    bytes_per_block: int
    mem_type: str = "DRAM"  # "DRAM" or "VRAM"
    device: int = 0  # CUDA device index for VRAM

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NixlPeer:
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        kw["metadata"] = bytes(kw["metadata"])
        return cls(**kw)


def _notif(request_id: str, dst_blocks: Sequence[int]) -> bytes:
    return msgpack.packb({"r": request_id, "b": list(dst_blocks)})


def _parse_notif(msg: bytes) -> tuple[str, list[int]]:
    d = msgpack.unpackb(msg)
    rid, blocks = d["r"], d["b"]
    if not isinstance(rid, str) or not isinstance(blocks, list) or not all(isinstance(b, int) for b in blocks):
        raise ValueError("bad KV notification")
    return rid, blocks


# ---- receiver (decode side) ---------------------------------------------------------------------------


class NixlReceiver:
    """Decode side of the `nixl` transport: registers the cache with a NIXL agent and tracks notifications.

    Same allowlist semantics as NatsReceiver: `expect(request_id, blocks)` before the sender may write, then
    `complete(request_id)` (or `await wait(...)`) once the sender's notification says every expected block is
    in. A poll thread drives UCX: every `busy_poll` seconds while a request is expected and not complete, every
    `idle_poll` otherwise (UCX still needs some progress for keepalive and connection requests). Measured on
    this 2-core VM: ~3% of a core at 1 ms, ~0 at 20 ms; a sender's transfers wait for the target's polls.
    """

    def __init__(self, mem_type: str | None = None, busy_poll: float = 0.001, idle_poll: float = 0.02) -> None:
        self.mem_type = mem_type
        self.busy_poll = busy_poll
        self.idle_poll = idle_poll
        self._lock = threading.Lock()
        self._expected: dict[str, frozenset[int]] = {}
        self._received: dict[str, set[int]] = {}
        self._pending: set[str] = set()  # expected and not complete yet: the poll thread polls fast meanwhile
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[bool]]]] = {}
        self._agent: Any = None
        self._reg: Any = None
        self._peer: NixlPeer | None = None
        self._layout: KvLayout | None = None
        self._cache: torch.Tensor | None = None  # held so its memory stays registered and mapped
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.stray = 0  # notifications for requests or blocks we did not expect (their data did land)

    async def start(self, worker_id: str, cache: torch.Tensor, layout: KvLayout) -> None:
        """Create the agent and register `cache` (runner shape, matching `layout`); starts the poll thread."""
        if self._agent is not None:
            raise RuntimeError("NixlReceiver already started")
        layout.blocks_view(cache)  # TransferError unless shape, dtype and contiguity match
        mem_type = _mem_type(cache, self.mem_type)
        agent, reg = await asyncio.to_thread(self._register, f"brigade-kv-{worker_id}", cache, mem_type)
        self._agent, self._reg, self._cache, self._layout = agent, reg, cache, layout
        self._peer = NixlPeer(agent=agent.name, metadata=agent.get_agent_metadata(), addr=cache.data_ptr(),
                              nbytes=layout.nbytes, num_blocks=layout.num_blocks,
                              bytes_per_block=layout.bytes_per_block, mem_type=mem_type, device=_device_id(cache))
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll_loop, name=f"nixl-recv-{worker_id}", daemon=True)
        self._thread.start()

    @staticmethod
    def _register(prefix: str, cache: torch.Tensor, mem_type: str) -> tuple[Any, Any]:
        agent = _new_agent(prefix, mem_type)
        try:
            reg = agent.register_memory([(cache.data_ptr(), cache.nbytes, _device_id(cache), "")], mem_type)
        except Exception as e:
            raise TransferError(f"cannot register the KV cache with NIXL: {e!r}") from e
        return agent, reg

    def peer(self) -> NixlPeer:
        """What to publish (NixlPeer.to_dict() travels in the heartbeat)."""
        assert self._peer is not None, "start() first"
        return self._peer

    def metadata(self) -> bytes:
        return self.peer().metadata

    async def stop(self) -> None:
        """Stop polling, deregister the cache and release the agent (senders then fail fast)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            self._wake.set()
            await asyncio.to_thread(thread.join)
        agent, reg = self._agent, self._reg
        self._agent = self._reg = self._cache = None
        if agent is not None:
            _STOPPED_HERE.add(agent.name)
            try:
                agent.deregister_memory(reg)
            except Exception as e:  # the agent is going away regardless
                log.debug("deregister_memory failed: %r", e)
        with self._lock:
            waiters = [w for ws in self._waiters.values() for w in ws]
            self._waiters.clear()
        for loop, fut in waiters:
            _resolve(loop, fut, False)

    # -- allowlist --

    def expect(self, request_id: str, block_ids: Sequence[int]) -> None:
        """Count writes of `request_id` into `block_ids` (the blocks allocated for it)."""
        check_expected(self._layout, block_ids)
        with self._lock:
            self._expected[request_id] = frozenset(block_ids)
            self._received[request_id] = set()
            if block_ids:
                self._pending.add(request_id)
        self._wake.set()  # switch the poll thread to busy polling now

    def forget(self, request_id: str) -> None:
        """Stop tracking `request_id` (handed off, cancelled, or its lease expired); its waiters get False."""
        with self._lock:
            self._expected.pop(request_id, None)
            self._received.pop(request_id, None)
            self._pending.discard(request_id)
            waiters = self._waiters.pop(request_id, [])
        for loop, fut in waiters:
            _resolve(loop, fut, False)

    def received(self, request_id: str) -> frozenset[int]:
        with self._lock:
            return frozenset(self._received.get(request_id, ()))

    def complete(self, request_id: str) -> bool:
        """The sender's notifications cover every expected block of `request_id` (the data came before them)."""
        with self._lock:
            return self._complete_locked(request_id)

    def _complete_locked(self, request_id: str) -> bool:
        want = self._expected.get(request_id)
        return want is not None and want <= self._received[request_id]

    async def wait(self, request_id: str, timeout: float) -> bool:
        """True once `request_id` is complete; False on timeout, forget() or stop()."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        with self._lock:
            if self._complete_locked(request_id):
                return True
            if request_id not in self._expected:
                return False
            self._waiters.setdefault(request_id, []).append((loop, fut))
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return False
        finally:
            with self._lock:
                ws = self._waiters.get(request_id)
                if ws is not None and (loop, fut) in ws:
                    ws.remove((loop, fut))
                    if not ws:
                        del self._waiters[request_id]

    # -- polling --

    def _poll(self) -> int:
        """Progress UCX and apply new notifications; returns how many arrived. Called by the poll thread."""
        agent = self._agent
        if agent is None:
            return 0
        notifs: dict[str, list[bytes]] = agent.get_new_notifs()
        n = 0
        for sender, msgs in notifs.items():
            for msg in msgs:
                n += 1
                self._on_notif(sender, msg)
        return n

    def _on_notif(self, sender: str, msg: bytes) -> None:
        try:
            rid, blocks = _parse_notif(msg)
        except Exception:
            self.stray += 1
            log.warning("malformed KV notification from NIXL agent %s: %r", sender, msg[:64])
            return
        with self._lock:
            allowed = self._expected.get(rid)
            stray = sorted(set(blocks) - allowed) if allowed is not None else blocks
            if allowed is None or stray:
                self.stray += 1
            else:
                self._received[rid].update(blocks)
                waiters = []
                if self._complete_locked(rid):
                    self._pending.discard(rid)
                    waiters = self._waiters.pop(rid, [])
        if allowed is None:
            log.warning("KV for request %s, which is not (or no longer) expected, was written into blocks %s by %s",
                        rid, blocks, sender)
        elif stray:
            log.error("KV for request %s was written into blocks %s not allocated to it (by %s)", rid, stray, sender)
        else:
            for loop, fut in waiters:
                _resolve(loop, fut, True)

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._poll()
            except Exception:  # keep polling: one bad call must not leave the cache without progress
                log.exception("NIXL notification poll failed")
            self._wake.clear()  # before looking: an expect() from now on cuts the wait short
            with self._lock:
                busy = bool(self._pending)
            self._wake.wait(self.busy_poll if busy else self.idle_poll)


def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[bool], value: bool) -> None:
    def set_result() -> None:
        if not fut.done():
            fut.set_result(value)

    try:
        loop.call_soon_threadsafe(set_result)
    except RuntimeError:  # that loop is closed: nobody waits any more
        pass


# ---- sender (prefill side) ----------------------------------------------------------------------------


@dataclass(eq=False)
class _Registered:
    """A prepared descriptor list (and what it pins) that transfers in flight may still use."""

    dlist: Any
    inflight: int = 0
    retired: bool = False  # replaced: drop once no transfer uses it
    dropped: bool = False


@dataclass(eq=False)
class _Local(_Registered):
    key: tuple[int, int, int, int] = (0, 0, 0, 0)  # (data_ptr, nbytes, rows, num_blocks)
    tensor: torch.Tensor | None = None  # held so the registered memory cannot be freed under us
    reg: Any = None
    num_blocks: int = 0

    def overlaps(self, addr: int, nbytes: int) -> bool:
        return self.key[0] < addr + nbytes and addr < self.key[0] + self.key[1]


@dataclass(eq=False)
class _Remote(_Registered):
    peer: NixlPeer | None = None
    name: str = ""
    failed: str = ""  # why a transfer to this agent failed: it is dropped and never posted to again


@dataclass(eq=False)
class _Xfer:
    handle: Any
    local: _Local
    remote: _Remote
    what: str


class NixlSender:
    """Writes blocks into decode workers' caches with NIXL WRITEs (KvSender).

    All agent calls run on one executor thread (the agent is created without locking); the event loop polls
    a transfer's state every `poll_interval` seconds. A transfer not done within `timeout` raises TransferError.
    Call close() once no send is running.
    """

    def __init__(self, mem_type: str | None = None, timeout: float = 5.0, poll_interval: float = 0.0002) -> None:
        self.mem_type = mem_type
        self.timeout = timeout
        self.poll_interval = poll_interval
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nixl-send")
        self._agent: Any = None
        self._local: _Local | None = None  # the registration new transfers use
        self._locals: dict[tuple[int, int, int, int], _Local] = {}  # it and older ones still in use
        self._remotes: dict[str, _Remote] = {}
        self._closed = False

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._exec, fn, *args)

    async def send(self, request_id: str, src: torch.Tensor, src_blocks: list[int], peer: PeerInfo,
                   dst_blocks: list[int]) -> None:
        info = _peer_nixl(peer)
        layout = peer.layout
        src_view = layout.blocks_view(src, any_num_blocks=True)
        _check_blocks(src_view, src_blocks, layout, dst_blocks)
        if (info.num_blocks, info.bytes_per_block, info.nbytes) != (layout.num_blocks, layout.bytes_per_block,
                                                                   layout.nbytes):
            raise TransferError(f"NIXL cache of worker {peer.worker_id} ({info.num_blocks} blocks of "
                                f"{info.bytes_per_block} bytes) does not match its layout {layout}")
        mem_type = _mem_type(src, self.mem_type)
        if not src_blocks:
            return
        if self._closed:
            raise TransferError("the NIXL sender is closed")
        what = f"KV of {request_id} to worker {peer.worker_id}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        post = loop.run_in_executor(self._exec, self._post, peer.worker_id, info, layout, src, mem_type, request_id,
                                    src_blocks, dst_blocks, what)
        try:
            xfer, state = await asyncio.wait_for(asyncio.shield(post), self.timeout)
        except TransferError as e:
            raise TransferError(f"{what}: {e}") from e
        except BaseException as e:
            # Timed out (connection setup to an unresponsive host) or cancelled: the post still runs on the
            # executor thread; release its transfer once it returns.
            post.add_done_callback(self._release_later)
            if isinstance(e, TimeoutError):
                raise TransferError(f"{what}: no answer in {self.timeout:.1f} s") from e
            raise
        try:
            while state == "PROC":
                if loop.time() > deadline:
                    raise TransferError(f"{what}: not done in {self.timeout:.1f} s")
                await asyncio.sleep(self.poll_interval)
                state = await self._call(self._check, xfer)
            if state != "DONE":
                raise TransferError(f"{what}: transfer failed ({state})")
        finally:
            await self._call(self._release, xfer)

    def _release_later(self, post: asyncio.Future[tuple[_Xfer, str]]) -> None:
        if post.cancelled() or post.exception() is not None:
            return
        try:
            self._exec.submit(self._release, post.result()[0])
        except RuntimeError:  # executor shut down (closed): nixl releases leaked handles with the agent
            pass

    # -- on the executor thread --

    def _ensure_agent(self, mem_type: str) -> Any:
        if self._agent is None:
            self._agent = _new_agent(f"brigade-kvsend-{os.getpid()}", mem_type)
        return self._agent

    def _local_side(self, src: torch.Tensor, layout: KvLayout, mem_type: str) -> _Local:
        agent = self._ensure_agent(mem_type)
        rows = layout.layers * 2
        num_blocks = src.shape[2] // layout.block_size
        key = (src.data_ptr(), src.nbytes, rows, num_blocks)
        cur = self._local
        if cur is not None and cur.key == key:
            return cur
        # Another cache tensor (or geometry) than before. The agent must never hold two registrations of the
        # same memory: with transfers in flight on the older one, nixl 1.5.1 / UCX corrupted its heap (double
        # free, crashes). So reuse a registration still alive, or drop overlapping ones first.
        new = self._locals.get(key)
        if new is not None:
            new.retired = False
        else:
            for other in list(self._locals.values()):
                if other.overlaps(src.data_ptr(), src.nbytes):
                    if other.inflight:
                        raise TransferError("an older registration of this memory is still in use")
                    self._drop(other)
            new = self._register(agent, src, key, layout, mem_type)
        if cur is not None and cur is not new:
            self._retire(cur)
        self._local = new
        return new

    def _register(self, agent: Any, src: torch.Tensor, key: tuple[int, int, int, int], layout: KvLayout,
                  mem_type: str) -> _Local:
        _, _, rows, num_blocks = key
        dev = _device_id(src)
        try:
            reg = agent.register_memory([(src.data_ptr(), src.nbytes, dev, "")], mem_type)
        except Exception as e:
            raise TransferError(f"cannot register the KV cache with NIXL: {e!r}") from e
        try:
            descs = _descs(src.data_ptr(), rows, num_blocks, layout.bytes_per_block // rows, dev)
            dlist = agent.prep_xfer_dlist("NIXL_INIT_AGENT", descs, mem_type)
        except Exception as e:
            _quietly(agent.deregister_memory, reg)
            raise TransferError(f"cannot prepare local NIXL descriptors: {e!r}") from e
        self._locals[key] = local = _Local(dlist, key=key, tensor=src, reg=reg, num_blocks=num_blocks)
        return local

    def _remote_side(self, worker_id: str, info: NixlPeer, layout: KvLayout) -> _Remote:
        cur = self._remotes.get(worker_id)
        if cur is not None and cur.peer == info:
            if cur.failed:
                raise TransferError(f"its NIXL agent failed before ({cur.failed}); waiting for it to restart")
            return cur
        if cur is not None:  # the worker restarted (new agent) or re-registered: forget the old one
            self._retire(self._remotes.pop(worker_id))
        agent = self._agent
        try:
            name = agent.add_remote_agent(info.metadata)  # connects: fails at once if nobody listens
        except Exception as e:
            raise TransferError(f"cannot add the NIXL agent of worker {worker_id}: {e!r}") from e
        name = name.decode() if isinstance(name, bytes) else name
        try:
            rows = layout.layers * 2
            descs = _descs(info.addr, rows, info.num_blocks, info.bytes_per_block // rows, info.device)
            dlist = agent.prep_xfer_dlist(name, descs, info.mem_type)
        except Exception as e:
            _quietly(agent.remove_remote_agent, name)
            raise TransferError(f"cannot prepare NIXL descriptors of worker {worker_id}: {e!r}") from e
        self._remotes[worker_id] = r = _Remote(dlist, peer=info, name=name)
        return r

    def _post(self, worker_id: str, info: NixlPeer, layout: KvLayout, src: torch.Tensor, mem_type: str,
              request_id: str, src_blocks: list[int], dst_blocks: list[int], what: str) -> tuple[_Xfer, str]:
        if info.agent in _STOPPED_HERE:
            raise TransferError("the receiver was stopped")
        local = self._local_side(src, layout, mem_type)
        remote = self._remote_side(worker_id, info, layout)
        rows = layout.layers * 2
        agent = self._agent
        try:
            # One descriptor per (row, block) on each side; NIXL merges the ones contiguous on both sides.
            handle = agent.make_prepped_xfer("WRITE", local.dlist, _indices(rows, local.num_blocks, src_blocks),
                                             remote.dlist, _indices(rows, info.num_blocks, dst_blocks),
                                             _notif(request_id, dst_blocks))
        except Exception as e:
            raise TransferError(f"cannot create the NIXL transfer: {e!r}") from e
        xfer = _Xfer(handle, local, remote, what)
        local.inflight += 1
        remote.inflight += 1
        try:
            # With cma (same host) the data moves inside this call: it runs here, off the event loop.
            state = agent.transfer(handle)
        except Exception as e:  # nixlRemoteDisconnectError: the receiver is gone
            self._fail(remote, repr(e))
            self._release(xfer)
            raise TransferError(repr(e)) from e
        if state == "ERR":
            self._fail(remote, "transfer failed")
        return xfer, state

    def _check(self, xfer: _Xfer) -> str:
        try:
            state = str(self._agent.check_xfer_state(xfer.handle))
        except Exception as e:  # the receiver went away mid-transfer
            state = f"ERR {e!r}"
        if state.startswith("ERR"):
            self._fail(xfer.remote, state)
        return state

    def _fail(self, remote: _Remote, why: str) -> None:
        """A transfer to `remote` failed (its agent died, mostly): drop it and refuse that agent from now on.

        A restarted worker has a new agent, so new metadata, and is added afresh.
        """
        if not remote.failed:
            remote.failed = why
            self._retire(remote)
        # A failed post leaves requests queued on the dead endpoint until our worker makes progress; destroying
        # the agent before that aborts the process (UCX's ucs_arbiter_group_is_empty assertion in
        # ucp_worker_destroy; nixl-cu12 1.5.1, ~50% of runs). ~1 ms of progress cleared it in every run here.
        self._progress(0.005)

    def _progress(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            _quietly(self._agent.get_new_notifs)

    def _release(self, xfer: _Xfer) -> None:
        try:
            xfer.handle.release()  # aborts a transfer still in progress, where the backend can
        except Exception as e:
            # nixl keeps the handle and retries when the agent goes; the write may still land meanwhile, so
            # its descriptor lists and registration stay as they are.
            log.warning("%s: could not release the NIXL transfer: %r", xfer.what, e)
            return
        for r in (xfer.local, xfer.remote):
            r.inflight -= 1
            if r.retired and r.inflight == 0:
                self._drop(r)

    def _retire(self, r: _Registered) -> None:
        """Drop `r` now, or once the transfers still using it are released."""
        r.retired = True
        if r.inflight == 0:
            self._drop(r)

    def _drop(self, r: _Registered) -> None:
        if r.dropped:
            return
        r.dropped = True
        _quietly(r.dlist.release)
        if isinstance(r, _Remote):
            _quietly(self._agent.remove_remote_agent, r.name)
        elif isinstance(r, _Local):
            _quietly(self._agent.deregister_memory, r.reg)
            self._locals.pop(r.key, None)
            r.tensor = None

    def _close(self) -> None:
        if self._agent is None:
            return
        self._progress(0.005)  # settle anything a failure left queued (see _fail) before the agent goes
        for r in self._remotes.values():
            self._drop(r)
        self._remotes.clear()
        for local in list(self._locals.values()):
            self._drop(local)
        self._local = None
        self._agent = None

    def _forget_peer(self, worker_id: str) -> None:
        r = self._remotes.pop(worker_id, None)
        if r is not None:
            self._retire(r)

    # -- lifecycle --

    async def forget_peer(self, worker_id: str) -> None:
        """Drop a worker's agent and descriptors (it left); a later send to it adds it again."""
        await self._call(self._forget_peer, worker_id)

    async def close(self) -> None:
        """Release every remote agent, the registration and our agent."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._call(self._close)
        finally:
            self._exec.shutdown(wait=False)


def _peer_nixl(peer: PeerInfo) -> NixlPeer:
    info = getattr(peer, "nixl", None)
    if not info:
        raise TransferError(f"worker {peer.worker_id} advertises no NIXL agent")
    if isinstance(info, NixlPeer):
        return info
    try:
        return NixlPeer.from_dict(info)
    except (KeyError, TypeError) as e:
        raise TransferError(f"bad NIXL info from worker {peer.worker_id}: {e!r}") from e


def _quietly(fn: Any, *args: Any) -> None:
    """Cleanup that may fail once the peer or agent is gone; nothing to do about it then."""
    try:
        fn(*args)
    except Exception as e:
        log.debug("NIXL cleanup %s failed: %r", getattr(fn, "__name__", fn), e)
