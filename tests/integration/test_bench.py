"""`brigade bench` end to end: against `brigade up` (tiny llama), a server that fails some requests, and none."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from helpers import free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from brigade.cli import main
from brigade.launcher import Up, UpConfig

SUMMARY_KEYS = {"requests", "successful", "failed", "duration_s", "total_input_tokens", "total_output_tokens",
                "request_throughput", "output_throughput", "total_token_throughput", "peak_concurrency",
                "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "errors"}
RECORD_KEYS = {"index", "tag", "prompt_tokens", "max_tokens", "start_s", "ok", "output_tokens", "ttft_s", "itl_s",
               "e2e_s", "status", "error"}


@pytest.fixture(scope="module")
def brigade_url(tiny_models: dict[str, Path]) -> Iterator[str]:
    with Up(UpConfig(model=str(tiny_models["llama"]), port=free_port(), mode="colocated", decode=1,
                     worker_args=("--num-blocks", "256", "--max-num-seqs", "16"))) as up:
        yield up.url


def _check_schema(res: dict[str, Any], n: int) -> None:
    assert {"config", "summary", "tags", "requests"} <= set(res)  # bench compare adds name and kind
    s = res["summary"]
    assert set(s) == SUMMARY_KEYS
    assert s["requests"] == len(res["requests"]) == n
    assert s["successful"] + s["failed"] == n
    assert [r["index"] for r in res["requests"]] == list(range(n))
    for r in res["requests"]:
        assert set(r) == RECORD_KEYS
    for t in res["tags"].values():
        assert set(t) == SUMMARY_KEYS
    assert sum(t["requests"] for t in res["tags"].values()) == n


def test_bench_against_brigade_up(brigade_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "run.json", tmp_path / "run.png"
    args = ["bench", "--url", brigade_url, "--workload", "mixed", "--requests", "12", "--concurrency", "4",
            "--out", str(out)]
    try:
        import matplotlib  # noqa: F401

        args += ["--plot", str(png)]
    except ImportError:  # the bench extra is not installed
        png = None  # type: ignore[assignment]
    assert main(args) == 0
    assert "Serving Benchmark Result" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert set(res) == {"config", "summary", "tags", "requests"}
    _check_schema(res, 12)
    s = res["summary"]
    assert res["config"]["max_context"] == 512  # from /v1/models: the tiny model's positions
    assert s["failed"] == 0, s["errors"]
    ok = [r for r in res["requests"] if r["ok"]]
    assert s["total_output_tokens"] == sum(r["max_tokens"] for r in ok) == sum(r["output_tokens"] for r in ok)
    assert s["total_input_tokens"] == sum(r["prompt_tokens"] for r in ok)
    assert 1 <= s["peak_concurrency"] <= 4
    for r in ok:
        assert r["status"] == 200 and 0 < r["ttft_s"] <= r["e2e_s"]
        assert len(r["itl_s"]) <= r["output_tokens"] - 1
    assert s["ttft_ms"]["median"] > 0 and s["tpot_ms"]["mean"] > 0
    if png is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def flaky_url() -> Iterator[str]:
    """Every 3rd completion is a 500; the others stream max_tokens one-character chunks, then usage."""
    calls = itertools.count(1)

    async def completions(request: Request) -> Response:
        body = await request.json()
        if next(calls) % 3 == 0:
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
        n = int(body["max_tokens"])

        async def events() -> AsyncIterator[str]:
            for _ in range(n):
                await asyncio.sleep(0.001)
                yield "data: " + json.dumps({"choices": [{"index": 0, "text": "x", "finish_reason": None}]}) + "\n\n"
            yield "data: " + json.dumps({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}) + "\n\n"
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n}
            yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "flaky", "object": "model"}]})

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]), Route("/v1/models", models)])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "test server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(5)


def test_failed_requests_are_counted(flaky_url: str, tmp_path: Path) -> None:
    out = tmp_path / "flaky.json"
    assert main(["bench", "--url", flaky_url, "--workload", "rag", "--requests", "9", "--concurrency", "3",
                 "--max-context", "256", "--timeout", "20", "--warmup", "0", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    _check_schema(res, 9)
    s = res["summary"]
    assert (s["successful"], s["failed"]) == (6, 3)
    assert s["errors"] == {"500: boom": 3}
    assert res["config"]["model"] == "flaky"
    failed = [r for r in res["requests"] if not r["ok"]]
    assert all(r["status"] == 500 and r["error"] == "boom" and r["output_tokens"] == 0 for r in failed)
    ok = [r for r in res["requests"] if r["ok"]]
    assert s["total_output_tokens"] == sum(r["max_tokens"] for r in ok)
    assert all(len(r["itl_s"]) == r["max_tokens"] - 1 for r in ok)  # one token per chunk here
    assert set(res["tags"]) == {"first", "followup"}


def test_unreachable_server_fails_requests_not_the_run(tmp_path: Path) -> None:
    out = tmp_path / "none.json"
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens
    assert main(["bench", "--url", url, "--model", "m", "--requests", "3", "--max-context", "512",
                 "--timeout", "5", "--out", str(out)]) == 1  # nothing succeeded
    res = json.loads(out.read_text())
    _check_schema(res, 3)
    assert res["summary"]["failed"] == 3
    assert all(r["status"] is None and "ConnectError" in r["error"] for r in res["requests"])


def test_compare_url_hf_static_and_a_broken_system(flaky_url: str, tiny_models: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    conf = {"workload": "sharegpt", "requests": 6, "concurrency": 3, "max_context": 128, "warmup": 0, "threads": 1,
            "systems": [{"name": "flaky", "url": flaky_url},
                        {"name": "hf", "hf_static": {"model": str(tiny_models["llama"]), "batch_size": 3}},
                        {"name": "broken", "url": f"http://127.0.0.1:{free_port()}"}]}
    cfg, out = tmp_path / "compare.json", tmp_path / "compare-out.json"
    cfg.write_text(json.dumps(conf))
    assert main(["bench", "compare", "--config", str(cfg), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "flaky" in table and "1.00x" in table and "broken" in table and "error:" in table
    flaky, hf, broken = json.loads(out.read_text())["systems"]
    _check_schema(flaky, 6)
    assert (flaky["summary"]["successful"], flaky["summary"]["failed"]) == (4, 2)
    assert hf["kind"] == "hf_static" and hf["summary"]["output_throughput"] > 0
    assert hf["summary"]["total_output_tokens"] == hf["static"]["output_tokens"]
    assert "no model listed" in broken["error"]


def test_compare_up_reports_fleet_balance_and_cache_hits(tiny_models: dict[str, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """An `up:` system: per-worker requests from the heartbeats, and prefix hits against the cacheable tokens of a
    hot-document rag run (every follow-up can reuse the one document)."""
    conf = {"workload": "rag", "requests": 8, "concurrency": 1, "max_context": 512, "warmup": 0, "vocab": 1024,
            "workload_options": {"hot": True, "turns": 4, "doc_tokens": 256},
            "systems": [{"name": "two", "up": ["--model", str(tiny_models["llama"]), "--decode", "2",
                                               "--worker-arg=--num-blocks=128"]}]}
    cfg, out = tmp_path / "compare.json", tmp_path / "compare-out.json"
    cfg.write_text(json.dumps(conf))
    assert main(["bench", "compare", "--config", str(cfg), "--out", str(out)]) == 0
    assert "served per worker" in capsys.readouterr().out
    [two] = json.loads(out.read_text())["systems"]
    f = two["fleet"]
    assert set(f["workers"]) == {"decode-0", "decode-1"}
    assert sum(w["served"] for w in f["workers"].values()) == 8
    assert f["cacheable_tokens"] == 7 * 256
    # One closed-loop client: follow-ups stay on the worker holding the document (at most one more computes it).
    assert f["cache_hit_share"] >= 6 / 7 - 0.01
