"""Service-path overhead: TTFT through gateway + router + worker minus the in-process engine's TTFT."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import httpx
import torch

from brigade.engine.engine import Engine, EngineConfig
from brigade.engine.sampling import SamplingParams
from brigade.launcher import Up, UpConfig, free_port


@dataclass
class Overhead:
    requests: int
    prompt_tokens: int
    inprocess_ms: list[float]
    service_ms: list[float]

    @property
    def p50_inprocess(self) -> float:
        return statistics.median(self.inprocess_ms)

    @property
    def p50_service(self) -> float:
        return statistics.median(self.service_ms)


def _prompt(i: int, n: int) -> list[int]:
    # Different prompts so no request is a prefix-cache hit of an earlier one.
    return [16 + (i * 7919 + j * 104729) % 900 for j in range(n)]


def _inprocess(model: str, n: int, prompt_tokens: int) -> list[float]:
    threads = len(os.sched_getaffinity(0))
    engine = Engine(EngineConfig(model=model, threads=threads, num_blocks=512))
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    engine.generate([_prompt(-1, prompt_tokens)], params)  # warm-up
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        engine.add_request(f"r{i}", _prompt(i, prompt_tokens), params)
        while not engine.step():
            pass
        out.append((time.perf_counter() - t0) * 1e3)
        while engine.has_unfinished():
            engine.step()
    return out


def _service(model: str, n: int, prompt_tokens: int) -> list[float]:
    up = Up(UpConfig(model=model, port=free_port(), worker_args=("--num-blocks", "512")))
    url = up.start()
    name = os.path.basename(model.rstrip("/"))
    out = []
    try:
        with httpx.Client(timeout=60) as client:
            for i in range(-3, n):  # three warm-up requests
                body = {"model": name, "prompt": _prompt(i + n, prompt_tokens), "max_tokens": 2, "temperature": 0,
                        "ignore_eos": True, "stream": True}
                t0 = time.perf_counter()
                with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                    lines = r.iter_lines()
                    for line in lines:
                        if line.startswith("data: "):
                            ttft = (time.perf_counter() - t0) * 1e3
                            break
                    for _ in lines:  # drain the rest of the stream
                        pass
                if i >= 0:
                    out.append(ttft)
    finally:
        up.stop()
    return out


def measure(model: str, n: int = 50, prompt_tokens: int = 16) -> Overhead:
    """Sequential short requests, one at a time: first the whole system, then the engine alone."""
    service = _service(model, n, prompt_tokens)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    return Overhead(n, prompt_tokens, _inprocess(model, n, prompt_tokens), service)


def summary(o: Overhead) -> str:
    q = statistics.quantiles
    return (f"{o.requests} sequential requests, {o.prompt_tokens}-token prompts\n"
            f"in-process TTFT  p50 {o.p50_inprocess:7.2f} ms  p90 {q(o.inprocess_ms, n=10)[-1]:7.2f} ms\n"
            f"service TTFT     p50 {o.p50_service:7.2f} ms  p90 {q(o.service_ms, n=10)[-1]:7.2f} ms\n"
            f"overhead (p50)   {o.p50_service - o.p50_inprocess:7.2f} ms")
