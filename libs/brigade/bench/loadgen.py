"""The load generator: streams every workload request to an OpenAI-compatible server and times it.

Arrivals: a request's own `arrival` offset when it has one, else Poisson at `rate` (seeded), else all at
once; `concurrency` caps requests in flight (closed loop when everything arrives at once). Every request is
POST /v1/completions with stream=true, include_usage and ignore_eos, so output lengths are the workload's.
A request that errs or times out becomes a failed record; nothing a server does stops the run.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import httpx

from brigade.bench.metrics import RequestRecord, timing
from brigade.bench.workloads import LOW_ID, Request


@dataclass(frozen=True)
class LoadConfig:
    url: str  # server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)
    model: str
    rate: float | None = None  # requests/s, Poisson; None: all at once
    concurrency: int | None = None  # most requests in flight; None: no cap
    seed: int = 0
    timeout: float = 600.0  # whole request, seconds
    connect_timeout: float = 10.0
    warmup: int = 1  # short untimed requests first, so one-off start-up costs stay out of the numbers


def base_url(url: str) -> str:
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def discover(url: str, timeout: float = 10.0) -> tuple[str | None, int | None]:
    """(served model id, max_model_len) from GET /v1/models; None for what the server does not say."""
    try:
        r = httpx.get(base_url(url) + "/v1/models", timeout=timeout)
        entry = r.json()["data"][0]
        max_len = entry.get("max_model_len")
        return str(entry["id"]), int(max_len) if max_len else None
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return None, None


def arrival_offsets(requests: Sequence[Request], rate: float | None, seed: int) -> list[float]:
    """Send times in seconds after the start: a request's own arrival, else Poisson at rate, else 0."""
    rng = random.Random(seed)
    t = 0.0
    out = []
    for r in requests:
        if r.arrival is not None:
            out.append(r.arrival)
            continue
        out.append(t)
        if rate:
            t += rng.expovariate(rate)
    return out


def _error_message(obj: Any) -> str:
    """The message of an OpenAI-style error body ({"error": {...}}, or vLLM's older {"object": "error"})."""
    err = obj.get("error", obj) if isinstance(obj, dict) else obj
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err)


class StreamParser:
    """Collects one SSE completion stream: text-chunk arrival times, the usage object, an in-band error."""

    def __init__(self) -> None:
        self.chunk_times: list[float] = []
        self.usage: dict[str, Any] | None = None
        self.error = ""
        self.done = False

    def feed(self, line: str, now: float) -> None:
        if not line.startswith("data:"):
            return  # blank separators, comments (": ping"), event names
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return
        try:
            obj = json.loads(data)
        except ValueError:
            self.error = f"bad SSE data: {data[:100]}"
            return
        if not isinstance(obj, dict):
            self.error = f"bad SSE data: {data[:100]}"
        elif "error" in obj or obj.get("object") == "error":
            self.error = _error_message(obj)  # a server that fails mid-stream says so in-band, then [DONE]
        else:
            if obj.get("usage"):
                self.usage = obj["usage"]
            for choice in obj.get("choices") or []:
                text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                # Only chunks with text count (a finish chunk has none). A chunk is not a token: a server may
                # send several tokens in one chunk, or hold back a token whose text is an incomplete
                # character, so ITL is per chunk while TPOT (from usage's token count) is per token. Times
                # are when the client reads a line: events that arrive in one network read get near-zero gaps.
                if text:
                    self.chunk_times.append(now)
                    break


def _body(cfg: LoadConfig, req: Request) -> dict[str, Any]:
    return {"model": cfg.model, "prompt": list(req.prompt_ids), "max_tokens": req.max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}


async def send(client: httpx.AsyncClient, cfg: LoadConfig, index: int, req: Request, t0: float) -> RequestRecord:
    """Stream one request; always returns a record (failed ones carry status and message)."""
    rec = RequestRecord(index, req.tag, len(req.prompt_ids), req.max_tokens)
    parser = StreamParser()
    start = time.perf_counter()
    rec.start_s = start - t0
    try:
        async with asyncio.timeout(cfg.timeout), \
                client.stream("POST", base_url(cfg.url) + "/v1/completions", json=_body(cfg, req)) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                raw = await resp.aread()
                try:
                    parser.error = _error_message(json.loads(raw))
                except ValueError:
                    parser.error = raw.decode(errors="replace")[:200] or resp.reason_phrase
            else:
                async for line in resp.aiter_lines():
                    parser.feed(line, time.perf_counter())
                    if parser.done or parser.error:
                        break
                if not parser.done and not parser.error:
                    parser.error = "stream ended without [DONE]"
    except TimeoutError:
        parser.error = f"timed out after {cfg.timeout:g}s"
    except (httpx.HTTPError, OSError) as e:
        parser.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    end = time.perf_counter()
    rec.ttft_s, rec.itl_s, rec.e2e_s = timing(start, parser.chunk_times, end)
    rec.error = parser.error
    rec.ok = not parser.error
    usage = parser.usage or {}
    rec.prompt_tokens = int(usage.get("prompt_tokens") or rec.prompt_tokens)
    # Token counts come from usage; without it, text chunks are the best guess (see StreamParser.feed).
    rec.output_tokens = int(usage.get("completion_tokens") or len(parser.chunk_times))
    return rec


class Progress:
    """A one-line progress bar on stderr, redrawn in place (every 10% on new lines when not a terminal)."""

    def __init__(self, total: int, out: TextIO | None = None, width: int = 30) -> None:
        self.total = total
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.width = width
        self.done = self.failed = self.tokens = 0
        self.t0 = time.perf_counter()
        self.shown = -1

    def update(self, rec: RequestRecord) -> None:
        self.done += 1
        self.failed += not rec.ok
        self.tokens += rec.output_tokens if rec.ok else 0
        tenth = self.done * 10 // max(self.total, 1)
        if self.tty or tenth != self.shown or self.done == self.total:
            self.shown = tenth
            self._draw()

    def _draw(self) -> None:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        filled = self.width * self.done // max(self.total, 1)
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"failed {self.failed}  {self.tokens / dt:.1f} tok/s  {dt:.0f}s")
        self.out.write(("\r" + line) if self.tty else line + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()


async def run(cfg: LoadConfig, requests: Sequence[Request], progress: Progress | None = None
              ) -> tuple[list[RequestRecord], float]:
    """Send every request on schedule; return the records (in workload order) and the run's duration."""
    offsets = arrival_offsets(requests, cfg.rate, cfg.seed)
    sem = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency else None
    # No pool cap: with Poisson arrivals the requests in flight are the server's business, not the client's.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=cfg.concurrency or 100)
    timeout = httpx.Timeout(cfg.timeout, connect=cfg.connect_timeout)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        for i in range(cfg.warmup):
            # Token ids unlike any workload's, so no prompt of the run finds them in a prefix cache.
            await send(client, cfg, -1, Request(tuple(range(LOW_ID + i, LOW_ID + i + 16)), 4), time.perf_counter())
        t0 = time.perf_counter()

        done = [asyncio.Event() for _ in requests]

        async def launch(i: int, req: Request, at: float) -> RequestRecord:
            try:
                delay = t0 + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if req.after is not None:  # a later turn waits for its predecessor (finished or failed)
                    await done[req.after].wait()
                if sem is None:
                    rec = await send(client, cfg, i, req, t0)
                else:
                    async with sem:
                        rec = await send(client, cfg, i, req, t0)
            finally:
                done[i].set()
            if progress is not None:
                progress.update(rec)
            return rec

        records = await asyncio.gather(*(launch(i, r, at) for i, (r, at) in enumerate(zip(requests, offsets,
                                                                                           strict=True))))
        duration = time.perf_counter() - t0
    if progress is not None:
        progress.close()
    return list(records), duration
