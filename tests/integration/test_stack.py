"""The whole system as users run it: `brigade up` processes, real NATS, real HTTP, the openai client."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import free_port, heartbeats, latest

from brigade import protocol as P
from brigade.bus import Bus
from brigade.engine.engine import Engine, EngineConfig
from brigade.engine.sampling import SamplingParams
from brigade.launcher import Up, UpConfig

PROMPTS = ["The quick brown fox jumps over the lazy dog and then", "def fibonacci(n):\n    "]
CHAT = [{"role": "user", "content": "Tell me about the Python standard library."}]
MAX_TOKENS = 12


@dataclass
class Stack:
    up: Up
    url: str
    nats: str
    model: str


@pytest.fixture(scope="module", params=["colocated", "disagg-shm", "disagg-nats", "disagg-nixl"])
def stack(request: pytest.FixtureRequest, tiny_models: dict[str, Path]) -> Iterator[Stack]:
    mode, _, transport = str(request.param).partition("-")
    mp = pytest.MonkeyPatch()
    if transport == "nixl":
        pytest.importorskip("nixl._api", reason="the nixl transport needs nixl-cu12 and nixl (brigade[nixl])")
        mp.setenv("UCX_NET_DEVICES", "lo")  # the children inherit it: UCX over loopback only
    cfg = UpConfig(model=str(tiny_models["llama"]), port=free_port(), mode=mode, prefill=1, decode=1,
                   kv_transport=transport or "shm", disagg_threshold=4,
                   worker_args=("--num-blocks", "256", "--max-num-seqs", "64"))
    up = Up(cfg)
    try:
        url = up.start(timeout=120)
        yield Stack(up, url, up.nats.client_url if up.nats else "", str(tiny_models["llama"]))
    finally:
        up.stop()
        mp.undo()


@pytest.fixture(scope="module")
def reference(tiny_models: dict[str, Path]) -> Engine:
    return Engine(EngineConfig(model=str(tiny_models["llama"]), num_blocks=128))


def _greedy(engine: Engine, ids: list[int]) -> tuple[list[int], str]:
    [out] = engine.generate([ids], SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    return out.token_ids, out.text


def _body(stack: Stack, **kw: object) -> dict[str, object]:
    return {"model": Path(stack.model).name, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, **kw}


def _sse(resp: httpx.Response) -> list[dict[str, object]]:
    events = []
    done = False
    for line in resp.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
            break
        events.append(json.loads(data))
    assert done, "stream must end with data: [DONE]"
    return events


@pytest.mark.parametrize("stream", [False, True])
def test_completions_equal_engine(stack: Stack, reference: Engine, stream: bool) -> None:
    for prompt in PROMPTS:
        want_ids, want_text = _greedy(reference, reference.tokenizer.encode(prompt))
        body = _body(stack, prompt=prompt, stream=stream, stream_options={"include_usage": True} if stream else None)
        if not stream:
            r = httpx.post(f"{stack.url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            data = r.json()
            assert data["choices"][0]["text"] == want_text
            assert data["usage"]["completion_tokens"] == MAX_TOKENS
            continue
        with httpx.stream("POST", f"{stack.url}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            events = _sse(r)
        text = "".join(str(c["text"]) for e in events for c in e["choices"])  # type: ignore[union-attr]
        assert text == want_text
        assert events[-1]["usage"]["completion_tokens"] == MAX_TOKENS  # type: ignore[index]
        assert events[-1]["choices"] == []


@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_engine(stack: Stack, reference: Engine, stream: bool) -> None:
    want_ids, want_text = _greedy(reference, reference.tokenizer.chat(CHAT))
    body = _body(stack, messages=CHAT, stream=stream)
    if not stream:
        r = httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want_text
        return
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json=body, timeout=60) as r:
        events = _sse(r)
    text = "".join(str(c["delta"].get("content") or "") for e in events for c in e["choices"])  # type: ignore[union-attr]
    assert text == want_text


def test_token_id_prompt_and_n(stack: Stack, reference: Engine) -> None:
    ids = reference.tokenizer.encode(PROMPTS[0])
    want_ids, want_text = _greedy(reference, ids)
    r = httpx.post(f"{stack.url}/v1/completions", json=_body(stack, prompt=ids, n=2), timeout=60)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert sorted(c["index"] for c in choices) == [0, 1]
    assert all(c["text"] == want_text for c in choices)


def test_openai_client(stack: Stack, reference: Engine) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", timeout=60)
    model = Path(stack.model).name
    assert model in [m.id for m in client.models.list().data]
    extra = {"ignore_eos": True}
    _, want = _greedy(reference, reference.tokenizer.encode(PROMPTS[0]))
    c = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                  extra_body=extra)
    assert c.choices[0].text == want
    parts = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                      stream=True, extra_body=extra)
    assert "".join(p.choices[0].text for p in parts if p.choices) == want
    _, want_chat = _greedy(reference, reference.tokenizer.chat(CHAT))
    chat = client.chat.completions.create(model=model, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                          extra_body=extra)  # type: ignore[arg-type]
    assert chat.choices[0].message.content == want_chat
    chunks = client.chat.completions.create(model=model, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, extra_body=extra)  # type: ignore[arg-type]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want_chat


N_STREAMS = 8
BATCH_TOKENS = 32


async def _stream_text(client: httpx.AsyncClient, url: str, body: dict[str, object]) -> tuple[str, str]:
    """(request id on the bus, text) of one streamed completion."""
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        events = [json.loads(line[6:]) async for line in r.aiter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    return f"{events[0]['id']}-0", "".join(c["text"] for e in events for c in e["choices"])


async def _unbatched_text(bus: Bus, ids: list[int], params: dict[str, object]) -> tuple[str, int]:
    """A GenerateRequest sent to the router without batch_to, as any other sender: (text, messages received)."""
    inbox = bus.inbox()
    chunks: list[P.TokenChunk] = []
    done = asyncio.Event()

    async def on_chunk(msg: Any) -> None:
        chunks.append(P.TokenChunk.decode(msg.data))  # a TokenBatch would fail here
        if chunks[-1].finish_reason is not None:
            done.set()

    sub = await bus.subscribe(inbox, on_chunk)
    await bus.flush()
    req = P.GenerateRequest(uuid.uuid4().hex, ids, params, inbox)
    assert P.Accepted.decode(await bus.request(P.ROUTER_GENERATE, req, timeout=30)).error is None
    await asyncio.wait_for(done.wait(), 60)
    await sub.unsubscribe()
    assert all(c.error is None for c in chunks), chunks[-1].error
    return "".join(c.text for c in chunks), len(chunks)


async def test_tokens_come_back_in_one_message_per_step(stack: Stack, reference: Engine) -> None:
    """N concurrent streams: each worker step sends one TokenBatch to the gateway carrying every stream's tokens,
    and each stream's text equals the in-process engine's and that of the unbatched path (TokenChunks)."""
    prompts = [f"Request {i} asks about the {word} of" for i, word in
               enumerate(["colour", "weight", "history", "price", "future", "shape", "smell", "sound"])]
    assert len(prompts) == N_STREAMS
    params = SamplingParams(max_tokens=BATCH_TOKENS, temperature=0, ignore_eos=True)
    ids = [reference.tokenizer.encode(p) for p in prompts]
    want = [reference.generate([i], params)[0].text for i in ids]
    assert len(set(want)) > 1  # distinct streams, so a mix-up between them shows

    bus = await Bus.connect(stack.nats, "test-batch-watch")
    batches: list[list[P.TokenChunk]] = []  # every TokenBatch of every gateway (`<prefix>.batch`)
    singles: list[P.TokenChunk] = []  # TokenChunks on any inbox (request replies there are not token messages)

    async def on_batch(msg: Any) -> None:
        batches.append(P.TokenBatch.decode(msg.data).chunks)

    async def on_inbox(msg: Any) -> None:
        if msg.subject.endswith(".batch"):
            return
        try:
            singles.extend(P.decode_tokens(msg.data))
        except P.ProtocolError:
            pass  # a reply to a request (Accepted, Allocation, ...)

    try:
        await bus.subscribe("_INBOX.*.batch", on_batch)
        await bus.subscribe("_INBOX.*.*", on_inbox)
        await bus.flush()
        body = _body(stack, max_tokens=BATCH_TOKENS, stream=True)
        async with httpx.AsyncClient(timeout=60) as client:
            got = await asyncio.gather(*(_stream_text(client, stack.url, {**body, "prompt": p}) for p in prompts))
        assert [text for _, text in got] == want

        # A choice the gateway replayed on another worker (a worker it took for lost under CPU load) carries
        # the id `<rid>-r<n>` from then on; its tokens still travel in TokenBatches.
        def choice(request_id: str) -> str:
            return request_id.split("-r")[0]

        rids = {rid for rid, _ in got}
        mine = [[c for c in b if choice(c.request_id) in rids] for b in batches]
        deadline = time.monotonic() + 5  # the watcher's copies may trail the gateway's
        while sum(len(c.token_ids) for b in mine for c in b) < N_STREAMS * BATCH_TOKENS:
            assert time.monotonic() < deadline, "the watcher did not see every token in a TokenBatch"
            await asyncio.sleep(0.05)
            mine = [[c for c in b if choice(c.request_id) in rids] for b in batches]
        mine = [b for b in mine if b]
        # Every token of the streams travelled in TokenBatches, none as a TokenChunk of its own.
        assert not [c for c in singles if choice(c.request_id) in rids and c.token_ids]
        chunks = sum(len(b) for b in mine)
        assert max(len(b) for b in mine) >= N_STREAMS // 2, [len(b) for b in mine]
        assert len(mine) <= chunks / 2, f"{len(mine)} messages for {chunks} chunks: not batched per step"
        replayed = {choice(c.request_id) for b in mine for c in b if c.request_id not in rids}
        for rid, text in got:
            if rid not in replayed:  # a replayed choice's old worker may send tokens the gateway dropped
                assert "".join(c.text for b in mine for c in b if c.request_id == rid) == text
        assert len(replayed) < N_STREAMS, "every stream was replayed: nothing left to compare"

        # The unbatched path (no batch_to: TokenChunks to reply_to, one per step) gives the same texts.
        unbatched = await asyncio.gather(*(_unbatched_text(bus, i, asdict(params)) for i in ids))
        assert [text for text, _ in unbatched] == want
        assert all(n >= BATCH_TOKENS for _, n in unbatched)  # one message per token: nothing was batched
    finally:
        await bus.close()


async def _cancel_many(url: str, body: dict[str, object], n: int, concurrency: int) -> int:
    """Open n streams, read the first token of each, then hang up. Returns how many got a token."""
    got = 0
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=60) as client:
        async def one() -> None:
            nonlocal got
            async with sem, client.stream("POST", f"{url}/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        got += 1
                        break  # leaving the block closes the connection mid-stream

        await asyncio.gather(*(one() for _ in range(n)))
    return got


def test_disconnect_frees_kv(stack: Stack) -> None:
    before = {w: st.kv_used for w, st in latest(stack.nats).items()}
    body = _body(stack, prompt=PROMPTS[0] * 3, max_tokens=400, stream=True)
    with httpx.stream("POST", f"{stack.url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
    hung_up = time.time()
    # Heartbeats (every 0.5 s, stamped with the worker's clock) show every worker back at its starting
    # KV usage within a second of the hang-up.
    statuses = asyncio.run(heartbeats(stack.nats, 2.5))
    for worker, used in before.items():
        freed = [st.time for st in statuses if st.worker_id == worker and st.kv_used == used]
        assert freed and min(freed) - hung_up <= 1.0, f"{worker}: blocks not freed within a second"
    # Many cancellations leave usage where it started.
    n = 1000
    got = asyncio.run(_cancel_many(stack.url, body, n, concurrency=32))
    assert got == n
    deadline = time.monotonic() + 15
    while {w: st.kv_used for w, st in latest(stack.nats).items()} != before:
        assert time.monotonic() < deadline, "KV usage did not return to where it started"
    r = httpx.post(f"{stack.url}/v1/completions", json=_body(stack, prompt="still serving?"), timeout=60)
    assert r.status_code == 200
