"""In-process throughput: the Brigade engine against Hugging Face `generate` with static batches.

Both run the same requests in one process, one after the other, on the same threads. Static batching
pads each batch to its longest prompt and runs until its longest output is done; only the requested
tokens count as output.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from brigade.bench.workloads import WORKLOADS, Request
from brigade.engine.engine import DTYPES, Engine, EngineConfig
from brigade.engine.sampling import SamplingParams


@dataclass
class EngineRun:
    seconds: float
    output_tokens: int
    tokens_per_s: float
    steps: int
    kv_utilization: float  # live token slots / allocated slots, averaged over steps
    contiguous_max_len_utilization: float  # same requests, each reserving the model's context
    contiguous_request_len_utilization: float  # each reserving prompt + max_tokens
    max_running: int
    preemptions: int


@dataclass
class StaticRun:
    seconds: float
    output_tokens: int
    tokens_per_s: float
    batch_size: int
    generated_slots: int  # batch rows x steps, useful or not


@dataclass
class Report:
    model: str
    workload: str
    requests: int
    threads: int
    engine: EngineRun
    hf_static: StaticRun | None = None
    ratio: float | None = None
    decode_batch1_ms: float | None = None
    bandwidth_floor_ms: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


def run_engine(engine: Engine, requests: list[Request]) -> EngineRun:
    """All requests arrive at once; the engine batches them continuously."""
    bs = engine.pool.block_size
    for i, r in enumerate(requests):
        params = SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True)
        engine.add_request(f"bench-{i}", list(r.prompt_ids), params)
    live = alloc = cont_max = cont_req = 0
    steps = max_running = 0
    produced = 0
    pre0 = engine.pool.stats.preemptions
    t0 = time.perf_counter()
    while engine.has_unfinished():
        outs = engine.step()
        produced += sum(len(o.new_token_ids) for o in outs)
        running = engine.scheduler.running
        steps += 1
        max_running = max(max_running, len(running))
        live += sum(s.num_computed for s in running)
        alloc += engine.pool.num_used * bs
        cont_max += len(running) * engine.max_model_len
        cont_req += sum(s.num_prompt + s.params.max_tokens for s in running)
    dt = time.perf_counter() - t0
    return EngineRun(dt, produced, produced / dt, steps, live / max(alloc, 1), live / max(cont_max, 1),
                     live / max(cont_req, 1), max_running, engine.pool.stats.preemptions - pre0)


def run_hf_static(model_dir: str, requests: list[Request], batch_size: int, dtype: str = "float32") -> StaticRun:
    """Hugging Face `generate`, greedy, batches of `batch_size` in arrival order, left-padded."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype]).eval()
    pad = 0
    slots = 0
    t0 = time.perf_counter()
    for start in range(0, len(requests), batch_size):
        batch = requests[start:start + batch_size]
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.int64)
        mask = torch.zeros((len(batch), width), dtype=torch.int64)
        for row, r in enumerate(batch):
            ids[row, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[row, width - len(r.prompt_ids):] = 1
        new = max(r.max_tokens for r in batch)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=pad)
        slots += len(batch) * new
    dt = time.perf_counter() - t0
    useful = sum(r.max_tokens for r in requests)
    return StaticRun(dt, useful, useful / dt, batch_size, slots)


def decode_batch1_ms(engine: Engine, steps: int = 30) -> float:
    """Mean decode step time for one sequence with a 128-token context."""
    engine.add_request("b1", list(range(16, 144)), SamplingParams(max_tokens=steps + 8, temperature=0.0,
                                                                  ignore_eos=True))
    for _ in range(5):
        engine.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    dt = (time.perf_counter() - t0) / steps
    engine.abort("b1")
    return dt * 1e3


def bandwidth_floor_ms(engine: Engine) -> tuple[float, float]:
    """(weight bytes read per decode step / measured copy bandwidth in ms, bandwidth in GB/s)."""
    m = engine.model
    tensors = [m.lm_head, m.norm] + [t for layer in m.layers for t in vars(layer).values()
                                     if isinstance(t, torch.Tensor)]
    if m.experts is not None:
        tensors += [t for pair in getattr(m.experts, "weights", []) for t in pair]
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    src = torch.empty(1 << 28, dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    gbps = 2 * src.numel() * 4 / best / 1e9  # read + write
    return weight_bytes / (gbps * 1e9) * 1e3, gbps


def bench(model_dir: str, workload: str, n: int, seed: int, threads: int, batch_size: int,
          hf: bool = True, max_num_seqs: int = 128, max_num_batched_tokens: int = 1024,
          dtype: str = "float32", fast_path: bool = True, options: dict[str, Any] | None = None) -> Report:
    """Run the engine (and the HF static baseline, in the same dtype) on one workload; return the report.

    `fast_path=False` measures the eager reference path; `options` go to the workload (e.g. mixed's ranges)."""
    torch.set_num_threads(threads)
    engine = Engine(EngineConfig(model=model_dir, max_num_seqs=max_num_seqs, fast_path=fast_path,
                                 max_num_batched_tokens=max_num_batched_tokens, dtype=dtype))
    requests = WORKLOADS[workload](n, engine.model.cfg.vocab_size, seed, **(options or {}))
    engine.generate([list(requests[0].prompt_ids)], SamplingParams(max_tokens=4))  # warm-up
    run = run_engine(engine, requests)
    b1 = decode_batch1_ms(engine)
    floor, gbps = bandwidth_floor_ms(engine)
    report = Report(model_dir, workload, n, threads, run, decode_batch1_ms=b1, bandwidth_floor_ms=floor,
                    extra={"copy_bandwidth_gbps": gbps})
    if hf:
        report.hf_static = run_hf_static(model_dir, requests, batch_size, dtype)
        report.ratio = run.tokens_per_s / report.hf_static.tokens_per_s
    return report


def summary(r: Report) -> str:
    """Human-readable table of a report."""
    e = r.engine
    lines = [
        f"model {r.model}  workload {r.workload}  requests {r.requests}  threads {r.threads}",
        f"brigade engine   : {e.output_tokens} tokens in {e.seconds:.1f} s = {e.tokens_per_s:.1f} tok/s "
        f"({e.steps} steps, max running {e.max_running}, preemptions {e.preemptions})",
    ]
    if r.hf_static:
        s = r.hf_static
        lines.append(f"HF static (b={s.batch_size}): {s.output_tokens} tokens in {s.seconds:.1f} s = "
                     f"{s.tokens_per_s:.1f} tok/s ({s.generated_slots} generated slots)")
        lines.append(f"throughput ratio : {r.ratio:.2f}x")
    lines += [
        f"KV utilization   : paged {e.kv_utilization:.1%}  vs contiguous max-length "
        f"{e.contiguous_max_len_utilization:.1%}  vs contiguous prompt+max_tokens "
        f"{e.contiguous_request_len_utilization:.1%}",
        f"decode batch 1   : {r.decode_batch1_ms:.2f} ms/step; bandwidth floor {r.bandwidth_floor_ms:.2f} ms "
        f"(weights / {r.extra.get('copy_bandwidth_gbps', 0):.1f} GB/s copy bandwidth)",
    ]
    return "\n".join(lines)


def write(r: Report, path: str | Path) -> None:
    Path(path).write_text(json.dumps(asdict(r), indent=2))
