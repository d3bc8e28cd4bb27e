"""Expert-parallel MoE figures (issue 6): parity on 2 and 4 shards, bus bytes, dispatch overhead, throughput.

`python -m brigade.bench.moe [--model DIR] [--out FILE.json]` (default model: the bench mixtral, made once
under the cache dir). One run measures, on this machine:

- parity: greedy tokens of a few prompts with the experts local, on 2 and on 4 `brigade experts` processes,
  and from transformers;
- decode at batch 32 with the experts on 2 shards pinned to separate cores: payload bytes on the bus per
  token per MoE layer (both directions) against hidden x top-k x 2 x dtype + 10%, the share of the step
  spent in dispatch+combine (executor time minus the slowest shard's expert compute), and tokens/s against
  one process running the same batch on both cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from brigade.bus import Bus
from brigade.engine.engine import Engine, EngineConfig
from brigade.engine.sampling import SamplingParams
from brigade.experts.remote import RemoteExperts
from brigade.launcher import spin_env
from brigade.model.config import load_config
from brigade.nats_server import NatsServer
from brigade.procs import terminate

PROMPTS = ["def fibonacci(n):", "The quick brown fox jumps over the lazy dog.", "Once upon a time, in a land"]
# NATS framing per request/reply pair on top of the payloads (PUB/MSG lines with subject, inbox, sid, size).
FRAMING_PER_MESSAGE = 2 * 70


@dataclass
class DecodeRun:
    name: str
    batch: int
    steps: int
    step_s: float  # median decode step
    tokens_per_s: float
    payload_per_token_layer: float = 0.0  # bytes on the bus (both directions), per token per MoE layer
    framing_per_token_layer: float = 0.0  # estimated NATS protocol lines on top
    dispatch_share: float = 0.0  # (executor time - shard compute) / step time
    expert_share: float = 0.0  # slowest shard's compute (local: the experts) / step time
    extra: dict[str, Any] = field(default_factory=dict)


class Timed:
    """An MoE executor wrapper that adds up the time spent in it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = 0.0

    def __call__(self, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.inner(*args)
        finally:
            self.seconds += time.perf_counter() - t0


class LoopThread:
    """An asyncio loop on a background thread: bus I/O while the engine runs on the calling thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 600) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


def bench_model() -> Path:
    from brigade.model.make import cache_dir, make_model

    out = cache_dir() / "models" / "mixtral-bench"
    if not (out / "model.safetensors").is_file():
        make_model("mixtral", "bench", out)
    return out


def spawn_shards(url: str, model: Path, n: int, cores: list[list[int]] | None = None) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(n):
        argv = [sys.executable, "-m", "brigade.cli", "experts", "--nats", url, "--model", str(model),
                "--shard", f"{i}/{n}", "--shard-id", f"bench-{i}of{n}", "--threads", "1"]
        if cores:
            argv += ["--cpus", ",".join(map(str, cores[i]))]
        procs.append(subprocess.Popen(argv, env={**os.environ, "OMP_NUM_THREADS": "1", "BRIGADE_LOG": "WARNING"}))
    return procs


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    terminate(procs)


def connect_remote(lt: LoopThread, url: str, model: Path, timeout: float = 30.0,
                   direct: bool = True) -> tuple[Bus, RemoteExperts]:
    async def go() -> tuple[Bus, RemoteExperts]:
        bus = await Bus.connect(url, "bench-moe")
        remote = await RemoteExperts.create(bus, str(model), timeout=timeout, direct=direct)
        if not await remote.wait_ready(120):
            raise RuntimeError("expert shards did not announce themselves")
        return bus, remote

    return lt.run(go())  # type: ignore[no-any-return]


def close_remote(lt: LoopThread, bus: Bus, remote: RemoteExperts) -> None:
    async def go() -> None:
        await remote.stop()
        await bus.close()

    lt.run(go())


def greedy(engine: Engine, new_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0)
    return [c.token_ids for c in engine.generate(PROMPTS, params)]


def transformers_greedy(model: Path, prompt_ids: list[list[int]], new_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    out = []
    for ids in prompt_ids:
        with torch.no_grad():
            gen = hf.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)
        out.append(gen[0, len(ids):].tolist())
    return out


def parity(model: Path, url: str, lt: LoopThread, shard_counts: tuple[int, ...], new_tokens: int) -> dict[str, Any]:
    """Greedy tokens: local experts, each shard count, transformers."""
    local = Engine(EngineConfig(model=str(model), num_blocks=256))
    want = greedy(local, new_tokens)
    prompt_ids = [local.tokenizer.encode(p) for p in PROMPTS]
    del local
    res: dict[str, Any] = {"new_tokens": new_tokens, "prompts": len(PROMPTS)}
    for n in shard_counts:
        procs = spawn_shards(url, model, n)
        try:
            bus, remote = connect_remote(lt, url, model)
            got = greedy(Engine(EngineConfig(model=str(model), num_blocks=256), experts=remote), new_tokens)
            close_remote(lt, bus, remote)
        finally:
            stop(procs)
        res[f"shards_{n}_equal_local"] = got == want
    res["transformers_equal_local"] = transformers_greedy(model, prompt_ids, new_tokens) == want
    return res


def decode(engine: Engine, name: str, batch: int, prompt_len: int, steps: int,
           remote: RemoteExperts | None = None) -> DecodeRun:
    """Time `steps` decode steps of a full batch (prefill excluded)."""
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=steps + 2, min_tokens=steps + 2, temperature=0.0)
    for i in range(batch):
        engine.add_request(f"{name}-{i}", torch.randint(16, 1000, (prompt_len,), generator=g).tolist(), params)
    while any(s.num_computed < s.num_prompt for s in engine.scheduler.running + list(engine.scheduler.waiting)):
        engine.step()  # prefill
    engine.step()  # warm-up decode
    local = None
    if remote is not None:
        remote.reset_stats()
    else:
        local = engine.model.experts = Timed(engine.model.experts)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    expert_s = local.seconds if local is not None else 0.0
    while engine.has_unfinished():
        engine.step()
    step = statistics.median(times)
    run = DecodeRun(name, batch, steps, step, batch / step)
    if local is not None:
        run.expert_share = expert_s / sum(times)
    if remote is not None:
        st, layers = remote.stats, engine.model.cfg.num_layers
        total = sum(times)
        run.payload_per_token_layer = (st.bytes_out + st.bytes_in) / st.tokens
        run.framing_per_token_layer = FRAMING_PER_MESSAGE * st.messages / st.tokens
        run.dispatch_share = (st.wall_s - st.compute_s) / total
        run.expert_share = st.compute_s / total
        run.extra = {"messages_per_step": st.messages / steps, "direct_per_step": st.direct / steps, "layers": layers,
                     "rows_per_token_layer": (st.bytes_in / st.tokens) / (engine.model.cfg.hidden_size * 4)}
    return run


DECODE_RUNS = {"single": "single", "direct": "2 shards", "bus": "2 shards, bus"}


def decode_child(kind: str, url: str, model: Path, batch: int, prompt_len: int, steps: int) -> DecodeRun:
    """`decode_one` in a fresh process: its OpenMP settings are the deployed ones, not this process's."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "run.json"
        argv = [sys.executable, "-m", "brigade.bench.moe", "--decode-only", kind, "--nats", url, "--model", str(model),
                "--batch", str(batch), "--prompt-len", str(prompt_len), "--steps", str(steps), "--out", str(result)]
        # A worker whose experts are remote spins its OpenMP threads briefly, as `brigade up` starts it.
        env = {**os.environ, **(spin_env() if kind != "single" else {}), "BRIGADE_LOG": "WARNING"}
        subprocess.run(argv, env=env, check=True, timeout=1800)
        return DecodeRun(**json.loads(result.read_text()))


def decode_one(kind: str, url: str, model: Path, batch: int, prompt_len: int, steps: int) -> DecodeRun:
    """One decode measurement (`DECODE_RUNS`), in this process, on every core of its affinity."""
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    config = EngineConfig(model=str(model), num_blocks=1024, threads=threads)
    if kind == "single":
        return decode(Engine(config), DECODE_RUNS[kind], batch, prompt_len, steps)
    lt = LoopThread()
    try:
        bus, remote = connect_remote(lt, url, model, direct=kind == "direct")
        try:
            return decode(Engine(config, experts=remote), DECODE_RUNS[kind], batch, prompt_len, steps, remote)
        finally:
            close_remote(lt, bus, remote)
    finally:
        lt.stop()


def run(model: Path, batch: int = 32, steps: int = 20, prompt_len: int = 16, new_tokens: int = 16,
        shard_counts: tuple[int, ...] = (2, 4)) -> dict[str, Any]:
    cfg = load_config(model)
    cores = sorted(os.sched_getaffinity(0))
    nats = NatsServer(jetstream=False)
    url = nats.start()
    lt = LoopThread()
    out: dict[str, Any] = {"model": str(model), "cores": cores, "batch": batch, "decode_steps": steps}
    try:
        torch.set_num_threads(len(cores))
        out["parity"] = parity(model, url, lt, shard_counts, new_tokens)

        # Each decode run in a process of its own, set up as deployed: one process on every core with the experts
        # local; a worker (attention, router, lm_head on every core) with the experts on 2 shards, one core each,
        # over their Unix sockets (the one-host data plane, the default) and, for comparison, over NATS.
        shard_cores = [[c] for c in cores[:2]] if len(cores) >= 2 else [cores, cores]
        runs = [decode_child("single", url, model, batch, prompt_len, steps)]
        procs = spawn_shards(url, model, 2, shard_cores)
        try:
            runs.append(decode_child("direct", url, model, batch, prompt_len, steps))
            runs.append(decode_child("bus", url, model, batch, prompt_len, steps))
        finally:
            stop(procs)
        single, sharded = runs[0], runs[1]
        bound = cfg.hidden_size * cfg.num_experts_per_tok * 2 * 4
        out["decode"] = [asdict(r) for r in runs]
        out["bytes_bound_per_token_layer"] = bound * 1.1
        out["bytes_vs_bound"] = sharded.payload_per_token_layer / bound
        out["throughput_ratio_2shards_vs_single"] = sharded.tokens_per_s / single.tokens_per_s
        out["throughput_ratio_2shards_bus_vs_single"] = runs[2].tokens_per_s / single.tokens_per_s
        # With free dispatch, a sharded step would be the worker's own part (attention, gate, lm_head: the single
        # step less its experts) plus the slowest shard's compute: the most sharding can give on these cores.
        ideal = single.step_s * (1 - single.expert_share) + sharded.step_s * sharded.expert_share
        out["throughput_ratio_bound_without_dispatch_cost"] = single.step_s / ideal
    finally:
        lt.stop()
        nats.stop()
    return out


def summary(res: dict[str, Any]) -> str:
    p = res["parity"]
    lines = [f"parity ({p['prompts']} prompts x {p['new_tokens']} tokens): "
             + ", ".join(f"{k}={v}" for k, v in p.items() if k.endswith("_local"))]
    for d in res["decode"]:
        line = f"{d['name']:>9}: step {d['step_s'] * 1e3:.1f} ms, {d['tokens_per_s']:.0f} tok/s"
        if d["payload_per_token_layer"]:
            line += (f"; bus {d['payload_per_token_layer']:.0f} B/token/layer (+~{d['framing_per_token_layer']:.0f} "
                     f"framing) vs bound {res['bytes_bound_per_token_layer']:.0f}; dispatch+combine "
                     f"{d['dispatch_share']:.0%}, experts {d['expert_share']:.0%} of the step")
        else:
            line += f"; experts {d['expert_share']:.0%} of the step"
        lines.append(line)
    lines.append(f"2 shards / single process throughput: {res['throughput_ratio_2shards_vs_single']:.2f}x "
                 f"(over the bus: {res['throughput_ratio_2shards_bus_vs_single']:.2f}x; with dispatch free: "
                 f"{res['throughput_ratio_bound_without_dispatch_cost']:.2f}x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m brigade.bench.moe", description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="mixtral checkpoint (default: the bench mixtral, made once)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16, help="parity continuation length")
    ap.add_argument("--out", help="write the results as JSON")
    ap.add_argument("--decode-only", choices=sorted(DECODE_RUNS), help=argparse.SUPPRESS)  # one run, for `run`
    ap.add_argument("--nats", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.decode_only:
        one = decode_one(a.decode_only, a.nats, Path(a.model), a.batch, a.prompt_len, a.steps)
        Path(a.out).write_text(json.dumps(asdict(one)))
        return 0
    res = run(Path(a.model) if a.model else bench_model(), a.batch, a.steps, a.prompt_len, a.new_tokens)
    print(summary(res))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
