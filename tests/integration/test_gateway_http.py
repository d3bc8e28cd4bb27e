"""The gateway over real HTTP (uvicorn) and a real nats-server.

A scripted responder written here stands in for router + workers, ONLY for these gateway-level tests: it answers
ROUTER_GENERATE with Accepted and plays TokenChunks to the request's inbox. The real router and workers are
tested with the gateway in the full-stack tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from nats.aio.msg import Msg

from brigade import protocol as P
from brigade.bus import Bus
from brigade.config import GatewayConfig
from brigade.model.tokenizer import Tokenizer
from brigade.services.gateway import build_app

MODEL = "tiny-llama"
MAX_LEN = 512


@pytest.fixture(scope="module")
def tok(tiny_models: dict[str, Path]) -> Tokenizer:
    return Tokenizer(tiny_models["llama"])


def three_tokens(req: P.GenerateRequest) -> list[P.TokenChunk]:
    """'Hello world <choice>' in three steps; the last one finishes with usage counts."""
    pieces = [(11, "Hello"), (12, " world"), (13, f" {req.request_id.rsplit('-', 1)[1]}")]
    lp = req.params.get("logprobs") is not None
    return [P.TokenChunk(req.request_id, [t], text, "length" if i == 2 else None, None, len(req.prompt_ids), i + 1,
                         0, [[t, -0.5, [[t, -0.5]]]] if lp else None, "w1") for i, (t, text) in enumerate(pieces)]


@dataclass
class Responder:
    """Router + worker stand-in: Accepted (with `code`), then the script's chunks to reply_to, `delay` apart."""

    bus: Bus
    script: Callable[[P.GenerateRequest], list[P.TokenChunk]] = three_tokens
    code: int = 200
    delay: float = 0.0
    hold: asyncio.Event = field(default_factory=asyncio.Event)  # streaming waits for this when `held`
    held: bool = False
    requests: list[P.GenerateRequest] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    beat_as: str = "responder"  # the worker id of its heartbeats
    load: dict[str, int] = field(default_factory=dict)  # WorkerStatus fields its heartbeats report

    async def start(self) -> Responder:
        await self.bus.subscribe(P.ROUTER_GENERATE, self._on_generate)
        await self.bus.subscribe(P.CANCEL, self._on_cancel)
        await self.bus.flush()
        self.tasks.add(asyncio.create_task(self._beat()))
        return self

    async def _beat(self) -> None:
        """A worker's heartbeat, so the gateway's /health says a worker can serve."""
        while True:
            await self.bus.publish(P.HEARTBEAT, P.WorkerStatus(self.beat_as, "colocated", "tiny", 16, 0, **self.load))
            await asyncio.sleep(0.1)

    async def _on_generate(self, msg: Msg) -> None:
        req = P.GenerateRequest.decode(msg.data)
        self.requests.append(req)
        await self.bus.respond(msg, P.Accepted(req.request_id, "w1", None if self.code == 200 else "busy", self.code))
        if self.code == 200:
            task = asyncio.create_task(self._play(req))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _play(self, req: P.GenerateRequest) -> None:
        if self.held:
            await self.hold.wait()
        for chunk in self.script(req):
            if req.request_id in self.cancels:
                return
            await self.bus.publish(req.reply_to, chunk)
            await asyncio.sleep(self.delay)

    async def _on_cancel(self, msg: Msg) -> None:
        self.cancels.append(P.Cancel.decode(msg.data).request_id)

    async def wait_cancel(self, request_id: str, within: float = 1.0) -> float:
        """Seconds until `request_id` was cancelled; fails after `within`."""
        t0 = time.monotonic()
        while request_id not in self.cancels:
            assert time.monotonic() - t0 < within, f"no Cancel for {request_id} within {within}s: {self.cancels}"
            await asyncio.sleep(0.01)
        return time.monotonic() - t0


@dataclass
class Stack:
    url: str
    client: httpx.AsyncClient
    responder: Responder | None
    app: Any


@contextlib.asynccontextmanager
async def gateway(nats_url: str, tok: Tokenizer, responder: bool = True, **overrides: Any) -> AsyncIterator[Stack]:
    """The gateway app on a real uvicorn socket, plus (optionally) a responder on its own connection."""
    cfg = GatewayConfig(**{"nats": nats_url, "model": "tiny", "served_model_name": MODEL, **overrides})
    bus = await Bus.connect(nats_url, "test-gateway")
    resp = await Responder(await Bus.connect(nats_url, "test-responder")).start() if responder else None
    app = build_app(cfg, bus, tok, MAX_LEN)
    await app.state.gateway.start()  # heartbeats: /health is 200 once the responder's arrives
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            yield Stack(url, client, resp, app)
    finally:
        if resp is not None:
            resp.hold.set()
            for t in resp.tasks:
                t.cancel()
        server.should_exit = True
        await task
        await app.state.gateway.aclose()
        await bus.close()
        if resp is not None:
            await resp.bus.close()


async def sse_data(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[str]:
    """The `data:` payloads of a streamed response."""
    async with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        return [line[len("data: "):] async for line in r.aiter_lines() if line.startswith("data: ")]


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3}


async def test_completion_non_stream(nats_url: str, tok: Tokenizer) -> None:
    async with gateway(nats_url, tok) as s:
        r = await s.client.post("/v1/completions", json={**COMPLETION, "logprobs": 1, "seed": 7})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == MODEL
        [choice] = body["choices"]
        assert (choice["index"], choice["text"], choice["finish_reason"]) == (0, "Hello world 0", "length")
        assert choice["logprobs"]["token_logprobs"] == [-0.5] * 3
        n_prompt = len(tok.encode("Once upon a time"))
        assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 3, "total_tokens": n_prompt + 3,
                                 "prompt_tokens_details": {"cached_tokens": 0}}
        [req] = s.responder.requests
        assert req.request_id == f"{body['id']}-0" and req.model == MODEL
        assert req.prompt_ids == tok.encode("Once upon a time")
        assert (req.params["max_tokens"], req.params["seed"], req.params["logprobs"]) == (3, 7, 1)


async def test_chat_stream_with_usage(nats_url: str, tok: Tokenizer) -> None:
    async with gateway(nats_url, tok) as s:
        data = await sse_data(s.client, "/v1/chat/completions",
                              {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1]]
        assert "".join(deltas) == "Hello world 0"
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
        prompt_len = len(tok.chat(CHAT["messages"]))
        assert chunks[-1]["usage"]["prompt_tokens"] == prompt_len
        # Chat's default max_tokens is the room left in the context.
        assert s.responder.requests[0].params["max_tokens"] == MAX_LEN - prompt_len


async def test_n2_stream_and_non_stream(nats_url: str, tok: Tokenizer) -> None:
    async with gateway(nats_url, tok) as s:
        data = await sse_data(s.client, "/v1/completions", {**COMPLETION, "n": 2, "stream": True})
        texts = {0: "", 1: ""}
        for d in data[:-1]:
            c = json.loads(d)["choices"][0]
            texts[c["index"]] += c["text"]
        assert texts == {0: "Hello world 0", 1: "Hello world 1"} and data[-1] == "[DONE]"

        s.responder.requests.clear()
        r = await s.client.post("/v1/chat/completions", json={**CHAT, "n": 2, "seed": 5, "temperature": 0.8})
        body = r.json()
        assert [(c["index"], c["message"]["content"]) for c in body["choices"]] == [
            (0, "Hello world 0"), (1, "Hello world 1")]
        assert body["usage"]["completion_tokens"] == 6
        assert sorted(q.params["seed"] for q in s.responder.requests) == [5, 6]


async def test_validation_errors_then_still_serving(nats_url: str, tok: Tokenizer) -> None:
    cases: list[tuple[str, Any, int, str | None, str | None]] = [
        ("/v1/completions", b"{not json", 400, None, "invalid_json"),
        ("/v1/chat/completions", b"[]", 400, None, "invalid_json"),
        ("/v1/completions", {**COMPLETION, "model": "gpt-4"}, 404, "model", "model_not_found"),
        ("/v1/completions", {**COMPLETION, "temperature": -1}, 400, "temperature", None),
        ("/v1/completions", {**COMPLETION, "top_p": 2}, 400, "top_p", None),
        ("/v1/completions", {**COMPLETION, "n": 17}, 400, "n", None),
        ("/v1/completions", {**COMPLETION, "max_tokens": MAX_LEN}, 400, "max_tokens", "context_length_exceeded"),
        ("/v1/completions", {**COMPLETION, "prompt": [1, 10**6]}, 400, "prompt", None),
        ("/v1/completions", {"model": MODEL}, 400, "prompt", None),
        ("/v1/chat/completions", {"model": MODEL}, 400, "messages", None),
        ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs", None),
        ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    ]
    async with gateway(nats_url, tok) as s:
        for path, body, status, param, code in cases:
            kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = await s.client.post(path, **kwargs)
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]
            assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, code), body
        assert (await s.client.get("/v1/nope")).status_code == 404
        assert (await s.client.get("/v1/completions")).json()["error"]["type"] == "invalid_request_error"  # 405
        assert s.responder.requests == []  # nothing invalid reached the bus
        r = await s.client.post("/v1/completions", json=COMPLETION)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "Hello world 0"
        metrics = (await s.client.get("/metrics")).text
        assert 'brigade:requests_rejected_total{code="400"} 11.0' in metrics
        assert 'brigade:requests_rejected_total{code="404"} 1.0' in metrics
        assert s.app.state.gateway.inflight == 0


async def test_no_worker_is_503(nats_url: str, tok: Tokenizer) -> None:
    async with gateway(nats_url, tok, responder=False, route_timeout=0.5) as s:
        for stream in (False, True):
            r = await s.client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
            assert r.status_code == 503
            assert r.json()["error"]["type"] == "service_unavailable_error"
            assert r.json()["error"]["code"] == "no_worker_available"
        health = await s.client.get("/health")  # connected to NATS, but no worker: not ready
        assert health.status_code == 503 and health.json()["reason"] == "no worker serving the model yet"
    async with gateway(nats_url, tok, route_timeout=0.5) as s:  # a router that answers "nobody free"
        s.responder.code = 503
        r = await s.client.post("/v1/completions", json=COMPLETION)
        assert r.status_code == 503 and "no worker available" in r.json()["error"]["message"]
        assert len(s.responder.requests) > 1  # asked again within the route timeout before giving up


async def test_overload_is_429(nats_url: str, tok: Tokenizer) -> None:
    async with gateway(nats_url, tok, max_inflight=1) as s:
        s.responder.held = True
        first = asyncio.create_task(s.client.post("/v1/completions", json=COMPLETION))
        while not s.responder.requests:
            await asyncio.sleep(0.01)
        r = await s.client.post("/v1/completions", json=COMPLETION)
        assert r.status_code == 429
        assert r.json()["error"] == {"message": r.json()["error"]["message"], "type": "rate_limit_error",
                                     "param": None, "code": "rate_limit_exceeded"}
        s.responder.hold.set()
        assert (await first).status_code == 200
        assert (await s.client.post("/v1/completions", json=COMPLETION)).status_code == 200


def long_script(req: P.GenerateRequest) -> list[P.TokenChunk]:
    return [P.TokenChunk(req.request_id, [20 + i % 50], "x", prompt_tokens=1, completion_tokens=i + 1)
            for i in range(200)]


async def test_stream_disconnect_cancels(nats_url: str, tok: Tokenizer) -> None:
    async with gateway(nats_url, tok) as s:
        s.responder.script, s.responder.delay = long_script, 0.02
        async with s.client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            async for line in r.aiter_lines():
                if '"x"' in line:  # a content delta: the request is mid-stream
                    break
        [req] = s.responder.requests
        assert await s.responder.wait_cancel(req.request_id) < 1.0
        gw = s.app.state.gateway
        while gw.inflight:
            await asyncio.sleep(0.01)


async def test_non_stream_disconnect_cancels(nats_url: str, tok: Tokenizer) -> None:
    async with gateway(nats_url, tok) as s:
        s.responder.held = True
        with pytest.raises(httpx.ReadTimeout):
            await s.client.post("/v1/completions", json={**COMPLETION, "n": 2}, timeout=0.3)
        for req in s.responder.requests:
            assert await s.responder.wait_cancel(req.request_id) < 1.0


async def test_worker_error_and_token_timeout(nats_url: str, tok: Tokenizer) -> None:
    def failing(req: P.GenerateRequest) -> list[P.TokenChunk]:
        return [P.TokenChunk(req.request_id, [11], "Hi"),
                P.TokenChunk(req.request_id, [], "", "error", error="worker died")]

    async with gateway(nats_url, tok, token_timeout=0.3) as s:
        s.responder.script = failing
        r = await s.client.post("/v1/completions", json=COMPLETION)
        assert r.status_code == 500 and r.json()["error"]["code"] == "worker_error"
        assert "worker died" in r.json()["error"]["message"]
        data = await sse_data(s.client, "/v1/completions", {**COMPLETION, "stream": True})
        assert data[-1] == "[DONE]" and json.loads(data[-2])["error"]["code"] == "worker_error"

        s.responder.held = True  # accepted, then silence
        r = await s.client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        await s.responder.wait_cancel(s.responder.requests[-1].request_id)


async def test_a_request_queued_on_a_live_busy_worker_waits(nats_url: str, tok: Tokenizer) -> None:
    """Silence longer than token_timeout is no 504 while the worker holding the request beats and is busy."""
    async with gateway(nats_url, tok, token_timeout=0.3) as s:
        s.responder.beat_as, s.responder.load = "w1", {"running": 4, "waiting": 1}
        s.responder.held = True
        task = asyncio.create_task(s.client.post("/v1/completions", json=COMPLETION))
        await asyncio.sleep(1.2)  # four token timeouts
        assert not task.done()
        s.responder.hold.set()
        r = await task
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "Hello world 0"
        s.responder.load = {}  # idle: the same silence is a 504 again
        s.responder.hold.clear()
        await asyncio.sleep(0.3)
        r = await s.client.post("/v1/completions", json=COMPLETION)
        assert r.status_code == 504


async def test_admission_counts_sequences(nats_url: str, tok: Tokenizer) -> None:
    async with gateway(nats_url, tok, max_inflight=4) as s:
        s.responder.held = True
        r = await s.client.post("/v1/completions", json={**COMPLETION, "n": 5})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        first = asyncio.create_task(s.client.post("/v1/completions", json={**COMPLETION, "n": 3}))
        while len(s.responder.requests) < 3:
            await asyncio.sleep(0.01)
        r = await s.client.post("/v1/completions", json={**COMPLETION, "prompt": ["a", "b"]})
        assert r.status_code == 429  # 3 + 2 sequences > 4
        assert s.app.state.gateway.inflight == 3
        second = asyncio.create_task(s.client.post("/v1/completions", json=COMPLETION))  # 3 + 1 fits
        while len(s.responder.requests) < 4:
            await asyncio.sleep(0.01)
        s.responder.hold.set()
        assert (await first).status_code == 200 and (await second).status_code == 200
        assert s.app.state.gateway.inflight == 0


async def test_metrics_carry_every_workers_engine_gauges(nats_url: str, tok: Tokenizer) -> None:
    async with gateway(nats_url, tok) as s:
        s.responder.load = {"running": 3, "waiting": 2, "kv_used": 16, "kv_total": 64, "prefix_queries": 100,
                            "prefix_hits": 40, "preemptions": 1, "kv_transfer_bytes": 4096}
        await asyncio.sleep(0.3)
        text = (await s.client.get("/metrics")).text
        labels = f'model_name="{MODEL}",role="colocated",worker="responder"'
        for line in (f"vllm:num_requests_running{{{labels}}} 3.0", f"vllm:num_requests_waiting{{{labels}}} 2.0",
                     f"vllm:kv_cache_usage_perc{{{labels}}} 0.25", f"vllm:prefix_cache_hits_total{{{labels}}} 40.0",
                     f"vllm:num_preemptions_total{{{labels}}} 1.0",
                     f"brigade:worker_kv_transfer_bytes_total{{{labels}}} 4096.0"):
            assert line in text, line


async def test_shutdown_ends_streams_cleanly(nats_url: str, tok: Tokenizer) -> None:
    async with gateway(nats_url, tok) as s:
        s.responder.held = True
        task = asyncio.create_task(sse_data(s.client, "/v1/chat/completions", {**CHAT, "stream": True}))
        while not s.responder.requests:
            await asyncio.sleep(0.01)
        s.app.state.gateway.shutdown()  # what SIGTERM does before uvicorn stops
        data = await task
        assert data[-1] == "[DONE]" and json.loads(data[-2])["error"]["code"] == "shutting_down"
        await s.responder.wait_cancel(s.responder.requests[0].request_id)


async def test_models_health_metrics_openapi(nats_url: str, tok: Tokenizer) -> None:
    async with gateway(nats_url, tok) as s:
        assert (await s.client.post("/v1/completions", json=COMPLETION)).status_code == 200
        models = (await s.client.get("/v1/models")).json()
        assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
        assert models["data"][0]["max_model_len"] == MAX_LEN
        text = (await s.client.get("/metrics")).text
        for name in ("vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                     "vllm:e2e_request_latency_seconds_count", "vllm:prompt_tokens_total",
                     "vllm:generation_tokens_total", "brigade:requests_rejected_total"):
            assert name in text
        assert f'vllm:request_success_total{{finished_reason="length",model_name="{MODEL}"}} 1.0' in text
        assert f'vllm:generation_tokens_total{{model_name="{MODEL}"}} 3.0' in text
        paths = (await s.client.get("/openapi.json")).json()["paths"]
        assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(paths)
        assert (await s.client.get("/health")).status_code == 200
        await s.app.state.gateway.bus.close()
        r = await s.client.get("/health")
        assert r.status_code == 503


async def test_official_openai_client(nats_url: str, tok: Tokenizer) -> None:
    async with gateway(nats_url, tok) as s:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0)

        def run() -> list[Any]:  # the sync client blocks: run it off the loop that serves it
            chat = client.chat.completions.create(model=MODEL, messages=CHAT["messages"], max_tokens=3)
            chat_stream = list(client.chat.completions.create(
                model=MODEL, messages=CHAT["messages"], stream=True, stream_options={"include_usage": True}))
            comp = client.completions.create(model=MODEL, prompt="Once", max_tokens=3)
            comp_stream = list(client.completions.create(model=MODEL, prompt="Once", max_tokens=3, stream=True))
            return [chat, chat_stream, comp, comp_stream]

        chat, chat_stream, comp, comp_stream = await asyncio.to_thread(run)
        assert chat.choices[0].message.content == "Hello world 0" and chat.usage.total_tokens > 3
        assert "".join(c.choices[0].delta.content or "" for c in chat_stream if c.choices) == "Hello world 0"
        assert chat_stream[-1].choices == [] and chat_stream[-1].usage.completion_tokens == 3
        assert comp.choices[0].text == "Hello world 0" and comp.choices[0].finish_reason == "length"
        assert "".join(c.choices[0].text for c in comp_stream) == "Hello world 0"
        with pytest.raises(openai.NotFoundError) as info:
            await asyncio.to_thread(client.completions.create, model="nope", prompt="x")
        assert info.value.code == "model_not_found"


def test_streams_send_no_keepalive_pings() -> None:
    """OpenAI and vLLM send no SSE comments; vLLM's benchmark client fails a stream whose first event is one."""
    from brigade.services.gateway import _EventStream

    async def body() -> Any:
        yield b"data: x\n\n"

    assert _EventStream(body(), lambda: None).ping_interval == 0
    assert _EventStream(body(), lambda: None, ping=15).ping_interval == 15  # --sse-ping 15 turns them on


async def test_api_key_guards_the_api_not_the_probes(nats_url: str, tok: Tokenizer) -> None:
    async with gateway(nats_url, tok, api_key="sesame, other") as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            r = await s.client.post("/v1/completions", json=COMPLETION, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
            assert r.json()["error"]["type"] == "authentication_error"
        assert (await s.client.get("/v1/models")).status_code == 401
        assert s.responder.requests == []
        for key in ("sesame", "other"):  # any of the keys
            r = await s.client.post("/v1/completions", json=COMPLETION, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == "Hello world 0"
        assert (await s.client.get("/metrics")).status_code == 200
        deadline = asyncio.get_running_loop().time() + 5
        while (await s.client.get("/health")).status_code != 200:  # the responder's heartbeat arrives
            assert asyncio.get_running_loop().time() < deadline


async def test_api_key_metrics_protects_the_scrape_too(nats_url: str, tok: Tokenizer) -> None:
    async with gateway(nats_url, tok, api_key="sesame", api_key_metrics=True) as s:
        assert (await s.client.get("/metrics")).status_code == 401
        r = await s.client.get("/metrics", headers={"Authorization": "Bearer sesame"})
        assert r.status_code == 200 and "vllm:" in r.text
        assert (await s.client.get("/health")).status_code in (200, 503)  # never 401: probes carry no key


async def test_several_served_names(nats_url: str, tok: Tokenizer) -> None:
    async with gateway(nats_url, tok, served_model_name="alpha, beta") as s:
        ids = [m["id"] for m in (await s.client.get("/v1/models")).json()["data"]]
        assert ids == ["alpha", "beta"]
        r = await s.client.post("/v1/completions", json={**COMPLETION, "model": "beta"})
        assert r.status_code == 200 and r.json()["model"] == "beta"
        r = await s.client.post("/v1/completions", json={**COMPLETION, "model": MODEL})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_oversized_body_is_413(nats_url: str, tok: Tokenizer) -> None:
    async with gateway(nats_url, tok, max_request_bytes=1000) as s:
        big = {**COMPLETION, "prompt": "word " * 400}
        r = await s.client.post("/v1/completions", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        async def chunks() -> Any:  # no content-length: counted as it streams in
            yield json.dumps(big).encode()

        r = await s.client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = await s.client.post("/v1/completions", json=COMPLETION)
        assert r.status_code == 200 and s.app.state.gateway.inflight == 0


def gappy(req: P.GenerateRequest) -> list[P.TokenChunk]:
    """Ten tokens 't0 '..'t9 ', numbered by seq; the first worker repeats seq 2 and loses seq 4 (the bus dropped
    it); a replay (output_ids set) goes on from where the gateway resumed it, numbered from 1 again."""
    start = len(req.output_ids)
    chunks = [P.TokenChunk(req.request_id, [100 + i], f"t{i} ", "length" if i == 9 else None, prompt_tokens=1,
                           completion_tokens=i + 1, worker_id="w1", seq=i - start + 1) for i in range(start, 10)]
    if start == 0:
        chunks = chunks[:2] + [chunks[1]] + chunks[2:3] + chunks[4:]  # seq 1 2 2 3 5 6 ...
    return chunks


async def test_lost_chunks_replay_the_choice_and_keep_the_text_exact(nats_url: str, tok: Tokenizer) -> None:
    async with gateway(nats_url, tok) as s:
        s.responder.script = gappy
        data = await sse_data(s.client, "/v1/completions", {**COMPLETION, "max_tokens": 10, "stream": True})
        text = "".join(json.loads(d)["choices"][0]["text"] for d in data[:-1])
        assert text == "".join(f"t{i} " for i in range(10)) and data[-1] == "[DONE]"
        first, again = s.responder.requests
        assert again.request_id == f"{first.request_id}-r1"
        assert again.output_ids == [100, 101, 102] and again.text_sent == len("t0 t1 t2 ")
        await s.responder.wait_cancel(first.request_id)
        assert 'brigade:requests_replayed_total{reason="gap"} 1.0' in (await s.client.get("/metrics")).text

        s.responder.requests.clear()  # the same, not streamed: the usage counts every token once
        r = await s.client.post("/v1/completions", json={**COMPLETION, "max_tokens": 10})
        body = r.json()
        assert body["choices"][0]["text"] == text and body["usage"]["completion_tokens"] == 10
        assert len(s.responder.requests) == 2


async def test_a_short_token_count_at_the_end_is_a_gap(nats_url: str, tok: Tokenizer) -> None:
    """Unnumbered chunks (an older worker): the final chunk's count shows the loss, so that chunk is not relayed
    and the choice is replayed from the tokens the client has."""
    def unnumbered(req: P.GenerateRequest) -> list[P.TokenChunk]:
        if req.output_ids:  # the replay: goes on from the one token the client has, counting it
            return [P.TokenChunk(req.request_id, [101], "b", "length", prompt_tokens=1, completion_tokens=2)]
        return [P.TokenChunk(req.request_id, [100], "a", prompt_tokens=1, completion_tokens=1),
                P.TokenChunk(req.request_id, [102], "c", "length", prompt_tokens=1, completion_tokens=3)]

    async with gateway(nats_url, tok) as s:
        s.responder.script = unnumbered
        r = await s.client.post("/v1/completions", json=COMPLETION)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == "ab" and r.json()["usage"]["completion_tokens"] == 2
        first, again = s.responder.requests
        assert again.output_ids == [100] and again.request_id == f"{first.request_id}-r1"
