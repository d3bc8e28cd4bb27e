"""Token messages on the bus: TokenBatch round trips, compatibility, and the worker's one message per step."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import msgpack
import pytest

from brigade import protocol as P
from brigade.config import WorkerConfig
from brigade.engine.engine import Engine, EngineConfig, RequestOutput
from brigade.services.worker import Worker

CHUNKS = [
    P.TokenChunk("a-0", [11, 12], "Hé", prompt_tokens=3, completion_tokens=2, worker_id="w1"),
    P.TokenChunk("b-0", [13], "llo\n", "stop", "\n", 5, 7, 4, [[13, -0.25, [[13, -0.25], [14, -2.0]]]], "w1"),
    P.TokenChunk("c-1", [], "", "stop", 2, worker_id="w1"),  # a stop token id as stop_reason
    P.TokenChunk("d-0", [], "", "error", error="worker error: boom", worker_id="w1", retry=True),
]


def test_token_batch_round_trip() -> None:
    data = P.TokenBatch(CHUNKS).encode()
    assert P.TokenBatch.decode(data).chunks == CHUNKS
    assert P.decode_tokens(data) == CHUNKS
    assert P.TokenBatch.decode(P.TokenBatch([]).encode()).chunks == []
    # Smaller than the same chunks one map each: the field names travel once.
    assert len(data) < sum(len(c.encode()) for c in CHUNKS)


def test_decode_tokens_takes_a_single_chunk_too() -> None:
    assert P.decode_tokens(CHUNKS[1].encode()) == [CHUNKS[1]]
    with pytest.raises(P.ProtocolError, match="expected a token message"):
        P.decode_tokens(P.Cancel("a-0").encode())
    with pytest.raises(P.ProtocolError, match="version"):
        P.decode_tokens(msgpack.packb({"v": 99, "k": "token_batch", "fields": [], "rows": []}))
    with pytest.raises(P.ProtocolError, match="undecodable"):
        P.decode_tokens(b"\xc1")
    with pytest.raises(P.ProtocolError, match="expected 'tokens'"):
        P.TokenChunk.decode(P.TokenBatch(CHUNKS).encode())


def _wire(fields: list[str], rows: list[list[Any]]) -> bytes:
    return msgpack.packb({"v": P.VERSION, "k": "token_batch", "fields": fields, "rows": rows})


def test_token_batch_reads_rows_by_name() -> None:
    """A newer sender's extra field is ignored; an older sender's missing optional field takes its default."""
    newer = _wire(["worker_id", "request_id", "token_ids", "text", "shiny_new_field"],
                  [["w2", "a-0", [1], "x", 1], ["w2", "b-0", [2, 3], "yz", None]])
    assert P.decode_tokens(newer) == [P.TokenChunk("a-0", [1], "x", worker_id="w2"),
                                      P.TokenChunk("b-0", [2, 3], "yz", worker_id="w2")]


@pytest.mark.parametrize("raw", [
    {"fields": ["request_id"], "rows": [["a-0"]]},  # token_ids and text missing
    {"fields": ["request_id", "token_ids", "text"], "rows": [["a-0", [1]]]},  # a short row
    {"fields": ["request_id", "token_ids", "text"], "rows": [5]},  # not a row
    {"rows": []},  # no header
])
def test_malformed_token_batch_is_a_protocol_error(raw: dict[str, Any]) -> None:
    with pytest.raises(P.ProtocolError):
        P.TokenBatch.decode(msgpack.packb({"v": P.VERSION, "k": "token_batch", **raw}))


def test_generate_request_batch_to() -> None:
    req = P.GenerateRequest("a-0", [1, 2], {}, "_INBOX.gw.0", batch_to="_INBOX.gw.batch")
    assert P.GenerateRequest.decode(req.encode()).batch_to == "_INBOX.gw.batch"
    assert P.GenerateRequest("a-0", [1], {}, "inbox").batch_to == ""  # other senders: TokenChunks to reply_to


class _Bus:
    """Records publishes; a small max payload, so that a step's batch must be split."""

    def __init__(self, max_payload: int) -> None:
        self.max_payload = max_payload
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, msg: P.Message | bytes, headers: dict[str, str] | None = None) -> None:
        self.published.append((subject, msg.encode() if isinstance(msg, P.Message) else msg))


@pytest.fixture(scope="module")
def engine(tiny_models: dict[str, Path]) -> Engine:
    return Engine(EngineConfig(model=str(tiny_models["llama"]), num_blocks=16))


def _worker(engine: Engine, max_payload: int = 1 << 20) -> tuple[Worker, _Bus]:
    bus = _Bus(max_payload)
    return Worker(WorkerConfig(worker_id="w1", num_blocks=16), bus, engine), bus  # type: ignore[arg-type]


def _out(rid: str, token: int, finished: bool = False, text: str = "t") -> RequestOutput:
    return RequestOutput(rid, [token], text, finished, "length" if finished else None, num_prompt_tokens=2,
                         num_output_tokens=1)


async def test_worker_sends_one_batch_per_gateway_per_step(engine: Engine) -> None:
    w, bus = _worker(engine)
    for rid, batch_to in [("g1-a", "_INBOX.g1.batch"), ("g1-b", "_INBOX.g1.batch"), ("g2-a", "_INBOX.g2.batch"),
                          ("old", "")]:
        w.active[rid] = P.GenerateRequest(rid, [1, 2], {}, f"inbox.{rid}", batch_to=batch_to)
    await w._on_outputs([_out("g1-a", 5), _out("g2-a", 6), _out("old", 7), _out("g1-b", 8, finished=True),
                         _out("gone", 9)])  # "gone": cancelled meanwhile, nothing is sent for it
    by_subject = {subject: data for subject, data in bus.published}
    assert sorted(by_subject) == ["_INBOX.g1.batch", "_INBOX.g2.batch", "inbox.old"]
    g1 = P.TokenBatch.decode(by_subject["_INBOX.g1.batch"]).chunks
    assert [(c.request_id, c.token_ids, c.finish_reason, c.worker_id) for c in g1] == [
        ("g1-a", [5], None, "w1"), ("g1-b", [8], "length", "w1")]
    assert [c.request_id for c in P.TokenBatch.decode(by_subject["_INBOX.g2.batch"]).chunks] == ["g2-a"]
    assert P.TokenChunk.decode(by_subject["inbox.old"]).token_ids == [7]
    assert "g1-b" not in w.active and w.served == 1


async def test_worker_splits_a_batch_over_the_max_payload(engine: Engine) -> None:
    w, bus = _worker(engine, max_payload=1024)
    rids = [f"r{i}" for i in range(40)]
    for rid in rids:
        w.active[rid] = P.GenerateRequest(rid, [1], {}, f"inbox.{rid}", batch_to="_INBOX.g.batch")
    await w._on_outputs([_out(rid, i, text="x" * 50) for i, rid in enumerate(rids)])
    assert len(bus.published) > 2 and all(len(data) <= 1024 for _, data in bus.published)
    chunks = [c for _, data in bus.published for c in P.TokenBatch.decode(data).chunks]
    assert [c.request_id for c in chunks] == rids  # in order, each once


async def test_worker_numbers_each_requests_chunks(engine: Engine) -> None:
    """seq 1, 2, ... per request id; a request handed on after the prefill worker's first chunk goes on from 2."""
    w, bus = _worker(engine)
    w.active["a"] = P.GenerateRequest("a", [1, 2], {}, "inbox.a", batch_to="_INBOX.g.batch")
    w.active["b"] = P.GenerateRequest("b", [1, 2], {}, "inbox.b", batch_to="_INBOX.g.batch")
    await w._on_outputs([_out("a", 5), _out("b", 6)])
    await w._on_outputs([_out("a", 7)])
    # What a Handoff (or its fallback) carries is the prefill worker's request as it stands after its chunk.
    handed_on = P.GenerateRequest.from_dict(asdict(w.active["b"]))
    w.active["b"] = handed_on
    await w._on_outputs([_out("b", 8, finished=True)])
    chunks = [c for _, data in bus.published for c in P.TokenBatch.decode(data).chunks]
    assert [(c.request_id, c.seq) for c in chunks] == [("a", 1), ("b", 1), ("a", 2), ("b", 2)]


def test_token_chunk_seq_travels_and_older_senders_leave_it_unset() -> None:
    chunk = P.TokenChunk("a-0", [1], "x", seq=7)
    assert P.decode_tokens(P.TokenBatch([chunk]).encode()) == [chunk]
    assert P.decode_tokens(chunk.encode()) == [chunk]
    older = _wire(["request_id", "token_ids", "text"], [["a-0", [1], "x"]])  # a worker from before seq
    assert P.decode_tokens(older)[0].seq == 0
