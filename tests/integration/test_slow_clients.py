"""Stream clients that stop reading are cut off, so they cannot hold the gateway's admission slots (or its memory).

Real HTTP against the gateway fixture of test_gateway_http (its scripted Responder stands in for the workers):
raw sockets send a streaming request and never read, while the responder floods them with long token texts, so
the kernel's socket buffers fill and the gateway's sends block.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from typing import Any

import pytest
from test_gateway_http import COMPLETION, gateway, three_tokens, tok  # noqa: F401 (tok: the fixture)

from brigade import protocol as P
from brigade.model.tokenizer import Tokenizer

STUCK = 3
TEXT = "x" * 4000  # per token: a few hundred chunks fill any socket buffer on the way


def flood(steps: int = 3000, text: str = TEXT) -> Callable[[P.GenerateRequest], list[P.TokenChunk]]:
    """A script of `steps` steps of one `text` token each (3000 x 4000 chars: far more than socket buffers hold)."""
    def script(req: P.GenerateRequest) -> list[P.TokenChunk]:
        return [P.TokenChunk(req.request_id, [20 + i % 50], text, "length" if i == steps - 1 else None,
                             prompt_tokens=1, completion_tokens=i + 1) for i in range(steps)]
    return script


def open_stuck(port: int, body: dict[str, Any]) -> socket.socket:
    """A streaming request on a socket that is never read (a small receive buffer, so it fills sooner)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    payload = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    sock.sendall(head + payload)
    return sock


async def wait_for(cond: Any, within: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, f"not within {within}s: {what}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(("limits", "reason"), [
    ({"max_pending_events": 32, "send_timeout": 60.0}, "pending"),
    ({"max_pending_events": 1 << 20, "send_timeout": 0.5}, "send_timeout"),
])
async def test_stuck_stream_clients_are_cut(nats_url: str, tok: Tokenizer, limits: dict[str, Any],  # noqa: F811
                                            reason: str) -> None:
    async with gateway(nats_url, tok, max_inflight=STUCK, worker_timeout=60.0, **limits) as s:
        s.responder.script = flood()
        gw = s.app.state.gateway
        port = int(s.url.rsplit(":", 1)[1])
        socks = [open_stuck(port, {**COMPLETION, "max_tokens": 400, "stream": True}) for _ in range(STUCK)]
        try:
            await wait_for(lambda: len(s.responder.requests) == STUCK, 10, "every stuck request reached a worker")
            # Every slot is taken by a client that is not reading: they must be cut to let anyone else in.
            await wait_for(lambda: gw.inflight == 0, 30, "the stuck clients were cut and their slots freed")
            for req in s.responder.requests:
                await s.responder.wait_cancel(req.request_id, within=5)
            metrics = (await s.client.get("/metrics")).text
            assert f'brigade:streams_cut_total{{reason="{reason}"}} {float(STUCK)}' in metrics, metrics

            s.responder.script = three_tokens  # a short, normal answer
            r = await s.client.post("/v1/completions", json=COMPLETION)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == "Hello world 0"
            assert gw.inflight == 0 and not gw.flows
        finally:
            for sock in socks:
                sock.close()


async def test_reading_stream_is_not_cut(nats_url: str, tok: Tokenizer) -> None:  # noqa: F811
    """A client that reads keeps its whole stream, even one much larger than the pending bound."""
    # The flood starves the responder's heartbeats (one loop runs it all): no worker_lost replays here.
    async with gateway(nats_url, tok, max_pending_events=256, send_timeout=5.0, worker_timeout=60.0) as s:
        s.responder.script = flood(1000, "y" * 1000)
        text = []
        async with s.client.stream("POST", "/v1/completions", json={**COMPLETION, "max_tokens": 400,
                                                                    "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text.append(json.loads(line[6:])["choices"][0]["text"])
        assert "".join(text) == "y" * 1000 * 1000
        assert "brigade:streams_cut_total{" not in (await s.client.get("/metrics")).text
