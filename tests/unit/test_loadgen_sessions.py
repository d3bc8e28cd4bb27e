"""The load generator sends a session's next turn only after the previous one finished (`Request.after`)."""

from __future__ import annotations

import asyncio
import json
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import StreamingResponse
from starlette.routing import Route

from brigade.bench import loadgen
from brigade.bench.workloads import Request, rag
from brigade.launcher import free_port


async def test_a_turn_waits_for_its_predecessor() -> None:
    seen: dict[int, tuple[float, float]] = {}  # first prompt id -> (start, end) on the server

    async def completions(request: HttpRequest) -> StreamingResponse:
        body = await request.json()
        key, start = body["prompt"][0], time.perf_counter()

        async def stream():  # type: ignore[no-untyped-def]
            await asyncio.sleep(0.4 if key == 100 else 0.05)
            yield f"data: {json.dumps({'choices': [{'index': 0, 'text': 'x'}]})}\n\n"
            usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
            seen[key] = (start, time.perf_counter())

        return StreamingResponse(stream(), media_type="text/event-stream")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])]),
                                           host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        reqs = [Request((100,), 1), Request((101,), 1, after=0), Request((102,), 1), Request((103,), 1, after=1)]
        cfg = loadgen.LoadConfig(url=f"http://127.0.0.1:{port}", model="m", concurrency=4, warmup=0)
        records, _ = await loadgen.run(cfg, reqs)
    finally:
        server.should_exit = True
        await task
    assert all(r.ok for r in records), [r.error for r in records]
    assert seen[101][0] >= seen[100][1] and seen[103][0] >= seen[101][1]  # each after its predecessor ended
    assert seen[102][0] < seen[100][1]  # an independent request did not wait


def test_rag_turns_follow_their_session() -> None:
    reqs = rag(40, 1024, seed=0, max_context=8192)
    for i, r in enumerate(reqs):
        if r.tag == "first":
            assert r.after is None
        else:
            assert r.after is not None and r.after < i
            assert reqs[r.after].prompt_ids[:2048] == r.prompt_ids[:2048]  # the same session's document
            between = reqs[r.after + 1:i]
            assert all(b.prompt_ids[:2048] != r.prompt_ids[:2048] for b in between)  # its latest turn
