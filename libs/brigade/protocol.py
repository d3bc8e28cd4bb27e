"""Every bus message and every subject, in one place.

Messages are msgpack maps with a version field `v`; a receiver refuses a major version it does not
know. Bulk tensors never ride in these messages except in the chunked `nats` KV transport, whose
chunks stay under the server's max payload.
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Self, TypeVar

import msgpack

VERSION = 1

# ---- subjects ------------------------------------------------------------------------------------
ROUTER_GENERATE = "brigade.router.generate"  # gateway -> router (request/reply: Accepted)
HEARTBEAT = "brigade.heartbeat"  # workers -> all: WorkerStatus every heartbeat period
CANCEL = "brigade.cancel"  # gateway -> all workers: Cancel (whoever holds the request drops it)
KV_EVENTS = "brigade.kv_events"  # workers -> routers: KvEvents batches
EXPERTS_HEARTBEAT = "brigade.experts.heartbeat"  # expert shards -> workers: ExpertsStatus


def worker_generate(worker_id: str) -> str:
    """Router -> worker: GenerateRequest (request/reply: Accepted)."""
    return f"brigade.worker.{worker_id}.generate"


def worker_allocate(worker_id: str) -> str:
    """Prefill -> decode worker: Allocate (request/reply: Allocation)."""
    return f"brigade.worker.{worker_id}.allocate"


def worker_handoff(worker_id: str) -> str:
    """Prefill -> decode worker: Handoff (request/reply: Ack)."""
    return f"brigade.worker.{worker_id}.handoff"


def worker_release(worker_id: str) -> str:
    """Prefill -> decode worker: Release (no reply): the transfer failed, free the blocks reserved for it."""
    return f"brigade.worker.{worker_id}.release"


def worker_kv_dump(worker_id: str) -> str:
    """Router -> worker: KvDumpRequest (request/reply: KvDump), after a gap or a router restart."""
    return f"brigade.worker.{worker_id}.kv_dump"


def worker_kv(worker_id: str) -> str:
    """Prefill -> decode worker: KvChunk messages of the `nats` transport (request/reply: Ack)."""
    return f"brigade.worker.{worker_id}.kv"


def experts_dispatch(shard_id: str) -> str:
    """Worker -> expert shard: ExpertsDispatch (request/reply: ExpertsResult); a queue group per shard id."""
    return f"brigade.experts.{shard_id}.dispatch"


class ProtocolError(ValueError):
    """A message we cannot decode or whose version we do not speak."""


T = TypeVar("T", bound="Message")


def _unpack(data: bytes, what: str) -> dict[str, Any]:
    """The msgpack map of a message of our major version; ProtocolError otherwise."""
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise ProtocolError(f"undecodable {what}: {e}") from e
    if not isinstance(raw, dict) or raw.get("v") != VERSION:
        version = raw.get("v") if isinstance(raw, dict) else None
        raise ProtocolError(f"{what}: unsupported message version {version!r}")
    return raw


@dataclass
class Message:
    """Base: `encode` to msgpack bytes, `decode` back; unknown fields are ignored (forward compat)."""

    KIND: ClassVar[str] = ""

    def encode(self) -> bytes:
        return msgpack.packb({"v": VERSION, "k": self.KIND, **asdict(self)}, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        raw = _unpack(data, cls.__name__)
        if raw.get("k") != cls.KIND:
            raise ProtocolError(f"expected {cls.KIND!r}, got {raw.get('k')!r}")
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Self:
        """The message from its fields (one nested in another message); unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in raw.items() if k in names})
        except TypeError as e:  # a required field missing
            raise ProtocolError(f"{cls.__name__}: {e}") from e


@dataclass
class GenerateRequest(Message):
    """One sequence to generate (the gateway fans `n` > 1 out into n requests)."""

    KIND: ClassVar[str] = "generate"
    request_id: str
    prompt_ids: list[int]
    params: dict[str, Any]  # SamplingParams fields
    reply_to: str  # inbox on which TokenChunk messages stream back
    model: str = ""
    arrival: float = 0.0  # gateway wall-clock time, for queue-time metrics
    # Set by the router in disaggregated mode: the decode worker that continues after prefill.
    decode_worker: str | None = None
    # Tokens generated so far when a request is replayed on another worker (after a worker died), and how
    # many chars of their text the client has (None: all); the rest was withheld (incomplete UTF-8, a
    # possible stop string) and is emitted by the new worker.
    output_ids: list[int] = field(default_factory=list)
    text_sent: int | None = None
    # Where the worker may send this request's tokens in TokenBatch messages shared with the other requests of
    # the same gateway (one message per step per gateway); "": TokenChunk messages to reply_to only.
    batch_to: str = ""
    # The last TokenChunk.seq sent under this request id: 0 from the gateway; 1 when a prefill worker hands the
    # request on (a Handoff, or its fallback) after sending the first token, so the next worker numbers from 2.
    seq: int = 0


@dataclass
class Accepted(Message):
    """Reply to a GenerateRequest: which worker took it, or why nobody did (HTTP-like code)."""

    KIND: ClassVar[str] = "accepted"
    request_id: str
    worker_id: str = ""
    error: str | None = None
    code: int = 200


@dataclass
class TokenChunk(Message):
    """Worker -> gateway inbox: the tokens of one step for one request; the last one has finish_reason."""

    KIND: ClassVar[str] = "tokens"
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    # Per token: [token_id, logprob, [[token_id, logprob], ...]] when logprobs were asked for.
    logprobs: list[Any] | None = None
    worker_id: str = ""
    error: str | None = None
    retry: bool = False  # the error is the serving path's, not the request's: the gateway may replay it elsewhere
    # 1, 2, ... per request id, so the gateway notices chunks lost on the bus; 0: not numbered (an error, an older
    # worker).
    seq: int = 0


_CHUNK_FIELDS = [f.name for f in fields(TokenChunk)]
_chunk_row = operator.attrgetter(*_CHUNK_FIELDS)


@dataclass
class TokenBatch(Message):
    """Worker -> gateway (GenerateRequest.batch_to): one step's TokenChunks for every request of that gateway.

    On the wire a table, not a list of maps: `fields` (TokenChunk's field names, once) and one row of values
    per chunk, so a step of hundreds of requests costs one message and one decode. Rows are read by name:
    a field the receiver does not know is ignored, one the sender did not send takes its default.
    """

    KIND: ClassVar[str] = "token_batch"
    chunks: list[TokenChunk]

    def encode(self) -> bytes:
        return msgpack.packb({"v": VERSION, "k": self.KIND, "fields": _CHUNK_FIELDS,
                              "rows": [_chunk_row(c) for c in self.chunks]}, use_bin_type=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Self:
        names, rows = raw.get("fields"), raw.get("rows")
        if not isinstance(names, list) or not isinstance(rows, list):
            raise ProtocolError("TokenBatch: fields and rows are required")
        try:
            if names == _CHUNK_FIELDS:  # the same version on both ends: positional
                return cls([TokenChunk(*row) for row in rows])
            known = [(i, n) for i, n in enumerate(names) if n in _CHUNK_FIELDS]
            return cls([TokenChunk(**{n: row[i] for i, n in known}) for row in rows])
        except (TypeError, IndexError) as e:  # a malformed row, a required field missing
            raise ProtocolError(f"TokenBatch: {e}") from e


def decode_tokens(data: bytes) -> list[TokenChunk]:
    """The chunks of a message on a gateway's token inbox: a TokenBatch, or a single TokenChunk."""
    raw = _unpack(data, "token message")
    kind = raw.get("k")
    if kind == TokenBatch.KIND:
        return TokenBatch.from_dict(raw).chunks
    if kind == TokenChunk.KIND:
        return [TokenChunk.from_dict(raw)]
    raise ProtocolError(f"expected a token message, got {kind!r}")


@dataclass
class Cancel(Message):
    KIND: ClassVar[str] = "cancel"
    request_id: str


@dataclass
class WorkerStatus(Message):
    """Heartbeat and load report of one worker."""

    KIND: ClassVar[str] = "status"
    worker_id: str
    role: str  # prefill | decode | colocated
    model: str
    block_size: int
    hash_seed: int
    running: int = 0
    waiting: int = 0
    kv_used: int = 0
    kv_total: int = 0
    prefill_queued: int = 0  # prompt tokens not yet computed
    served: int = 0  # requests finished here since start (handoffs excluded)
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of which served from cache
    preemptions: int = 0  # requests preempted since start
    kv_transfer_bytes: int = 0  # KV bytes this (prefill) worker sent to decode workers since start
    transports: list[str] = field(default_factory=list)  # KV transports it accepts
    host: str = ""  # for the shm transport: same host means shared memory works
    shm_name: str = ""  # name of its shared-memory KV pool ("" when not shared)
    kv_layout: dict[str, Any] = field(default_factory=dict)  # transfer.KvLayout of its cache
    cuda_ipc_handle: bytes = b""  # cudaIpcMemHandle of its cache, for the cuda-ipc transport
    nixl: dict[str, Any] = field(default_factory=dict)  # its NIXL agent metadata and cache address (nixl)
    time: float = 0.0
    stopping: bool = False


@dataclass
class Allocate(Message):
    """Prefill -> decode: reserve blocks for `num_tokens` of prompt KV, under a lease."""

    KIND: ClassVar[str] = "allocate"
    request_id: str
    num_tokens: int
    lease_s: float = 10.0
    reply_to: str = ""  # the client's token inbox: told of the failure if the lease runs out before the handoff


@dataclass
class Release(Message):
    """Prefill -> decode: drop the reservation of `request_id` (the request went elsewhere)."""

    KIND: ClassVar[str] = "release"
    request_id: str


@dataclass
class Allocation(Message):
    KIND: ClassVar[str] = "allocation"
    request_id: str
    block_ids: list[int] = field(default_factory=list)
    error: str | None = None
    # The decode worker's WorkerStatus fields: how to reach its cache (layout, shm name, host, NIXL agent), for a
    # prefill worker that has not seen its heartbeat yet (both just started).
    status: dict[str, Any] = field(default_factory=dict)


@dataclass
class KvChunk(Message):
    """A slice of blocks for the `nats` transport: raw little-endian bytes [layers, 2, n, block, kvh, d]."""

    KIND: ClassVar[str] = "kv"
    request_id: str
    block_ids: list[int]
    dtype: str
    data: bytes


@dataclass
class Handoff(Message):
    """Prefill -> decode: the KV is in your blocks; continue this request from its first token."""

    KIND: ClassVar[str] = "handoff"
    request: dict[str, Any]  # GenerateRequest fields
    first_token: int
    block_ids: list[int]
    num_cached: int = 0
    text_sent: int = 0  # chars of the first token's text already streamed (the rest was withheld)


@dataclass
class Ack(Message):
    KIND: ClassVar[str] = "ack"
    ok: bool = True
    error: str | None = None


@dataclass
class KvEvents(Message):
    """A batch of prefix-cache changes on one worker, numbered 0, 1, 2, ... per worker.

    `ops` in order: ["stored", [hashes], parent_hash | None], ["removed", [hashes], None], ["cleared", [], None].
    """

    KIND: ClassVar[str] = "kv_events"
    worker_id: str
    event_id: int
    ops: list[Any] = field(default_factory=list)


@dataclass
class KvDumpRequest(Message):
    KIND: ClassVar[str] = "kv_dump_request"
    worker_id: str


@dataclass
class KvDump(Message):
    """Every block hash a worker has cached, as of its event `event_id` (-1: none sent yet)."""

    KIND: ClassVar[str] = "kv_dump"
    worker_id: str
    event_id: int
    hashes: list[int] = field(default_factory=list)
    block_size: int = 16
    hash_seed: int = 0


# ---- MoE expert shards (DESIGN §5): one dispatch per shard per layer per step, tensors as raw bytes ------
@dataclass
class ExpertsStatus(Message):
    """Heartbeat of one expert shard: which experts of which layers it holds (the published placement)."""

    KIND: ClassVar[str] = "experts_status"
    shard_id: str  # dispatch subject: experts_dispatch(shard_id)
    model: str
    shard: int = 0
    num_shards: int = 1
    num_experts: int = 0
    hidden_size: int = 0
    experts: list[list[int]] = field(default_factory=list)  # per MoE layer: expert ids held here
    dtype: str = "float32"
    host: str = ""
    socket: str = ""  # Unix socket of the direct data plane (experts/channel.py), for workers on `host`
    metrics_port: int = 0
    served: int = 0  # dispatches answered since start
    time: float = 0.0
    stopping: bool = False


@dataclass
class ExpertsDispatch(Message):
    """Worker -> shard: the step's tokens routed to this shard for one layer, each token once.

    Little-endian raw arrays: `hidden` [rows, h] in `dtype`; per assignment (a token's routed expert that
    lives here) `token` int32 [a] (row in `hidden`), `expert` int32 [a], `weight` [a] in `dtype`.
    """

    KIND: ClassVar[str] = "experts_dispatch"
    layer: int
    dtype: str
    rows: int
    hidden: bytes
    token: bytes
    expert: bytes
    weight: bytes
    trace: dict[str, str] = field(default_factory=dict)  # W3C context, where no bus headers carry it (channel)


@dataclass
class ExpertsResult(Message):
    """Shard -> worker: per row of the dispatch, the gate-weighted sum of its experts' outputs [rows, h]."""

    KIND: ClassVar[str] = "experts_result"
    data: bytes = b""
    error: str | None = None
    compute_s: float = 0.0  # time the shard spent in the experts (for dispatch/combine overhead figures)
