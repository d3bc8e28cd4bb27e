"""Dispatch and combine without a network: group a step's routed tokens by shard, encode, decode, sum back.

A token is sent to each shard that holds one of its experts once, with all its assignments to that
shard (so top-2 experts on one shard cost one row, not two). An expert held by several shards (a
replicated hot expert) goes to the replica that already receives the token, else round-robin.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from brigade import protocol as P

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Per msgpack message: map keys, small ints, the dtype name. Chunks leave this much room below the limit.
ENVELOPE = 256


class DispatchError(RuntimeError):
    """A dispatch that cannot be planned or a reply that does not fit its request."""


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise DispatchError(f"unsupported activation dtype {dtype}")
    return name


def to_bytes(t: torch.Tensor) -> bytes:
    """A tensor's elements as little-endian bytes."""
    if sys.byteorder != "little":  # pragma: no cover - every machine we run on
        raise DispatchError("the wire format is little-endian; this host is not")
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `to_bytes` (a copy, so the tensor is writable and outlives the message)."""
    n = 1
    for d in shape:
        n *= d
    if len(data) != n * torch.empty(0, dtype=dtype).element_size():
        raise DispatchError(f"{len(data)} bytes do not hold {shape} {dtype}")
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).view(shape)


@dataclass
class ShardBatch:
    """What one shard gets for one layer: rows of x (each token once) and their assignments."""

    shard: str
    rows: torch.Tensor  # [n] int64: token indices into the step's x, ascending
    token: torch.Tensor  # [a] int64: row (into `rows`) of each assignment
    expert: torch.Tensor  # [a] int64
    weight: torch.Tensor  # [a], x's dtype


def assign_shards(ids: torch.Tensor, owners: Sequence[Sequence[int]], start: Sequence[int] | None = None,
                  ) -> torch.Tensor:
    """Shard index [T, k] for each assignment. `owners[e]`: shard indices holding expert e (first = primary);
    `start[e]`: round-robin offset among e's replicas (callers advance it by e's count to spread steps)."""
    if any(not o for o in owners):
        raise DispatchError(f"experts {[e for e, o in enumerate(owners) if not o]} have no shard")
    primary = torch.tensor([o[0] for o in owners], dtype=torch.int64, device=ids.device)
    shard = primary[ids]
    k = ids.shape[1]
    for e, reps in enumerate(owners):
        if len(reps) < 2:
            continue
        pos = (ids == e).nonzero()  # [(token, slot)], token-major
        n = pos.shape[0]
        if n == 0:
            continue
        r = torch.tensor(list(reps), dtype=torch.int64, device=ids.device)
        offset = start[e] if start is not None else 0
        rr = r[(torch.arange(n, device=ids.device) + offset) % len(reps)]
        if k > 1:  # prefer a replica that already receives this token for another of its experts
            others = shard[pos[:, 0]].clone()
            others[torch.arange(n), pos[:, 1]] = -1
            match = (others[:, :, None] == r[None, None, :]).any(1)  # [n, replicas]
            rr = torch.where(match.any(1), r[match.to(torch.int8).argmax(1)], rr)
        shard[pos[:, 0], pos[:, 1]] = rr
    return shard


def plan(ids: torch.Tensor, weights: torch.Tensor, owners: Sequence[Sequence[str]],
         start: Sequence[int] | None = None) -> list[ShardBatch]:
    """Group one layer's routes [T, k] by shard (shard ids per expert in `owners`), each token once per shard."""
    names = sorted({s for o in owners for s in o})
    index = {s: i for i, s in enumerate(names)}
    shard = assign_shards(ids, [[index[s] for s in o] for o in owners], start).reshape(-1)
    k = ids.shape[1]
    flat_ids, flat_w = ids.reshape(-1), weights.reshape(-1)
    out = []
    for i in shard.unique().tolist():
        a = (shard == i).nonzero().squeeze(1)  # ascending: token-major
        rows, token = torch.unique_consecutive(a // k, return_inverse=True)
        out.append(ShardBatch(names[i], rows, token, flat_ids[a], flat_w[a]))
    return out


def encode(layer: int, x: torch.Tensor, batch: ShardBatch, max_bytes: int,
           trace: dict[str, str] | None = None) -> list[bytes]:
    """ExpertsDispatch messages for one shard: one, or several row ranges when the payload would exceed
    `max_bytes` (each chunk is a self-contained dispatch, so the shard needs no reassembly; 0: no limit).
    `trace`: context headers carried in the message, for paths without bus headers."""
    name = dtype_name(x.dtype)
    elem = x.element_size()
    n, h = batch.rows.numel(), x.shape[1]
    row_bytes = h * elem + (8 + elem) * _max_assignments(batch)  # a row, its ids and weights
    step = (max_bytes - ENVELOPE) // row_bytes if max_bytes else max(1, n)
    if step < 1:
        raise DispatchError(f"one token ({row_bytes} bytes) exceeds the bus max payload ({max_bytes})")
    hidden = x[batch.rows]
    out = []
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        a0, a1 = torch.searchsorted(batch.token, torch.tensor([lo, hi])).tolist()
        out.append(P.ExpertsDispatch(
            layer, name, hi - lo, to_bytes(hidden[lo:hi]), to_bytes((batch.token[a0:a1] - lo).to(torch.int32)),
            to_bytes(batch.expert[a0:a1].to(torch.int32)), to_bytes(batch.weight[a0:a1].to(x.dtype)),
            trace or {}).encode())
    return out


def _max_assignments(batch: ShardBatch) -> int:
    """Most assignments any one row has (bounds a chunk's size)."""
    if batch.token.numel() == 0:
        return 1
    return int(torch.bincount(batch.token).max().item())


def decode(msg: P.ExpertsDispatch, hidden_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x rows [n, h], token [a], expert [a], weight [a]) of a dispatch; DispatchError when malformed."""
    dtype = DTYPES.get(msg.dtype)
    if dtype is None:
        raise DispatchError(f"unsupported dtype {msg.dtype!r}")
    elem = torch.empty(0, dtype=dtype).element_size()
    a = len(msg.expert) // 4
    x = from_bytes(msg.hidden, dtype, (msg.rows, hidden_size))
    token = from_bytes(msg.token, torch.int32, (a,)).long()
    expert = from_bytes(msg.expert, torch.int32, (a,)).long()
    weight = from_bytes(msg.weight, dtype, (len(msg.weight) // elem,))
    if weight.numel() != a or (a and (int(token.min()) < 0 or int(token.max()) >= msg.rows)):
        raise DispatchError("dispatch arrays disagree in length or point outside its rows")
    return x, token, expert, weight


def combine(shape: tuple[int, int], dtype: torch.dtype, batches: Sequence[ShardBatch],
            outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum the shards' per-row results back into the step's tokens [T, h]."""
    out = torch.zeros(shape, dtype=dtype)
    for b, y in zip(batches, outputs, strict=True):
        if y.shape != (b.rows.numel(), shape[1]):
            raise DispatchError(f"shard {b.shard} returned {tuple(y.shape)}, expected ({b.rows.numel()}, {shape[1]})")
        out.index_add_(0, b.rows, y)
    return out
