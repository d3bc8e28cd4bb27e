"""One frozen config object per service, built from CLI flags with BRIGADE_* environment defaults."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import uuid
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any


def env(name: str, default: Any) -> Any:
    """BRIGADE_<NAME> from the environment, converted to the default's type."""
    raw = os.environ.get(f"BRIGADE_{name.upper()}")
    if raw is None:
        return default
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


DEFAULT_NATS = "nats://127.0.0.1:4222"

# --dtype: the weights' and activations' dtype; "auto" is the checkpoint's own (resolve_dtype).
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_DTYPE = "float32"  # the CPU fast path's dtype; `auto` follows the checkpoint
# other spellings of a dtype seen in checkpoints' config.json
_DTYPE_ALIASES = {"float": "float32", "fp32": "float32", "half": "float16", "fp16": "float16", "bf16": "bfloat16"}


def resolve_dtype(model: str | Path, name: str) -> str:
    """The engine dtype for `--dtype name`: the name itself, or for "auto" the checkpoint's dtype from its
    config.json (`dtype` in the transformers v5 layout, `torch_dtype` in v4, either under `text_config` too);
    float32 when the checkpoint says nothing we serve (no config.json, a GGUF file, float64, an unknown name)."""
    if name not in DTYPE_CHOICES:  # e.g. from BRIGADE_DTYPE, which argparse does not check
        raise ValueError(f"unknown dtype {name!r} ({', '.join(DTYPE_CHOICES)})")
    if name != "auto":
        return name
    try:
        raw = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    if not isinstance(raw, dict):
        return "float32"
    for cfg in (raw, raw.get("text_config")):
        if not isinstance(cfg, dict):
            continue
        value = cfg.get("dtype") or cfg.get("torch_dtype")
        if isinstance(value, str):
            value = value.lower().removeprefix("torch.")
            value = _DTYPE_ALIASES.get(value, value)
            if value in DTYPE_CHOICES and value != "auto":
                return value
    return "float32"


@dataclass(frozen=True)
class GatewayConfig:
    nats: str = DEFAULT_NATS
    model: str = "demo"
    served_model_name: str = ""  # names clients send as `model`, comma-separated; default: the model as given
    max_model_len: int = 0  # context limit checked here (0: the checkpoint's); workers get the same
    api_key: str = ""  # clients must send `Authorization: Bearer <key>` on /v1/* (empty: no check)
    api_key_metrics: bool = False  # /metrics needs the key too (the operator's scraper then sends it)
    chat_template: str = ""  # a Jinja chat template, or a file holding one; empty: the checkpoint's
    tool_call_parser: str = "auto"  # how tool calls are read from `auto` output: hermes, llama3_json, mistral
    host: str = "127.0.0.1"
    port: int = 8000
    max_inflight: int = 256  # concurrent sequences (prompts x n of each request) before 429
    max_request_bytes: int = 8 << 20  # larger bodies are a 413
    request_timeout: float = 600.0  # whole request, seconds
    token_timeout: float = 60.0  # longest silence between two token messages, unless the worker is alive and busy
    stall_timeout: float = 5.0  # silence after which an idle worker's choice is taken as lost and replayed
    route_timeout: float = 5.0
    worker_timeout: float = 3.0  # a worker silent this long is dead: its requests are replayed elsewhere
    max_replays: int = 2  # per choice; then the client gets the error
    replay_timeout: float = 30.0  # how long a replay waits for some worker to take it (one restarting, say)
    send_timeout: float = 30.0  # a stream send the client does not take this long cuts the client off
    max_pending_events: int = 4096  # token chunks a stream may hold for a client not reading; then it is cut
    sse_ping: int = 0  # seconds between SSE keep-alive comments; 0: none (as OpenAI and vLLM)


@dataclass(frozen=True)
class RouterConfig:
    nats: str = DEFAULT_NATS
    policy: str = "prefix"  # prefix | round_robin | least_loaded
    heartbeat_timeout: float = 3.0  # a worker silent this long is dead
    disagg_threshold: int = 64  # prompts with fewer uncached tokens are prefilled on the decode worker
    forward_timeout: float = 1.5  # a healthy worker accepts at once (it queues the work)
    route_deadline: float = 4.0  # all attempts of one request; under the gateway's route_timeout
    suspect_after: float = 1.2  # a worker this late with its heartbeat is avoided while others are on time
    block_size: int = 16  # workers with another block size or hash seed are refused
    hash_seed: int = 0
    registry_capacity: int = 1_000_000  # block hashes kept in the prefix registry (LRU)
    prefill_weight: float = 1.0  # `a` in the prefix cost (DESIGN §4)
    temperature: float = 0.0  # > 0: sample workers by softmax(-cost / temperature) (several routers)
    recent_ttl: float = 2.0  # seconds a routing decision steers its siblings before KV events arrive
    metrics_port: int = 0  # Prometheus /metrics on this port; 0: off


@dataclass(frozen=True)
class WorkerConfig:
    nats: str = DEFAULT_NATS
    model: str = "demo"
    role: str = "colocated"  # prefill | decode | colocated
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}")
    block_size: int = 16
    num_blocks: int = 0  # 0: from kv_cache_bytes
    kv_cache_bytes: int = 0  # 0: automatic, room for several max_model_len requests (engine/kv_size.py)
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048  # vLLM's default for its CPU server; larger prefill matmuls run faster
    long_prefill_tokens: int = 512  # most prompt tokens one request computes per step (0: no cap)
    chunked_prefill: bool = True
    prefix_caching: bool = True
    max_model_len: int = 0
    attention: str = "auto"
    dtype: str = field(default=DEFAULT_DTYPE, metadata={"choices": DTYPE_CHOICES})  # auto: the checkpoint's
    device: str = "cpu"
    threads: int = 0  # torch threads; 0: the cores in this process's affinity set
    cpus: str = ""  # cores to pin to, e.g. "0" or "0-1"; empty: leave affinity alone
    kv_transport: str = "shm"  # shm | nats | nixl | cuda-ipc
    heartbeat_s: float = 0.5
    lease_s: float = 10.0  # blocks allocated for an incoming transfer are freed after this
    hash_seed: int = 0
    experts: int = 0  # MoE expert shards (`brigade experts`) to run the experts on; 0: experts run locally
    experts_timeout: float = 5.0  # seconds a layer's expert dispatch may take before the step fails
    experts_direct: bool = True  # shards on this host over their Unix sockets (experts/channel.py), not the bus
    metrics_port: int = 0  # Prometheus /metrics on this port (expert load with remote experts); 0: off


@dataclass(frozen=True)
class ExpertsConfig:
    nats: str = DEFAULT_NATS
    model: str = "demo"
    shard: str = "0/1"  # I/N: this process holds shard I of N
    placement: str = ""  # experts per shard, ';'-separated, e.g. "0-3,7;4-7" (7 on both); empty: contiguous
    shard_id: str = ""  # dispatch subject name; empty: <model>-<I>of<N>
    dtype: str = field(default=DEFAULT_DTYPE, metadata={"choices": DTYPE_CHOICES})  # auto: the checkpoint's
    device: str = "cpu"
    kernel: str = "auto"  # torch | triton | auto (triton on a GPU)
    threads: int = 0  # torch threads; 0: the cores in this process's affinity set
    cpus: str = ""  # cores to pin to, e.g. "1"; empty: leave affinity alone
    heartbeat_s: float = 0.5
    metrics_port: int = 0  # Prometheus /metrics on this port; 0: off
    direct: bool = True  # also serve workers on this host over a Unix socket (experts/channel.py)


def default_served_names(model: str) -> tuple[str, ...]:
    """The model as given (vLLM's default), plus a local path's directory name (`/models/llama` also answers
    to `llama`)."""
    base = Path(model).name
    return (model,) if base in ("", model) or not Path(model).exists() else (model, base)


_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30,
               "ti": 2**40}


def parse_size(raw: str) -> int:
    """Bytes from "4GiB", "512MiB", "4G" (10**9), "1e9" or a plain integer; ValueError otherwise."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]i?)?[bB]?\s*", raw)
    if m is None:
        raise ValueError(f"not a size: {raw!r} (e.g. 4GiB, 512MiB, 4000000000)")
    value = float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()]
    if value < 1:
        raise ValueError(f"size must be positive: {raw!r}")
    return int(value)


# One line of --help per flag (the same name means the same thing on every service); argparse adds the default.
HELP = {
    "nats": "NATS server URL",
    "model": "checkpoint: a Hugging Face directory, a .gguf file, a Hugging Face id, or 'demo'",
    "served_model_name": "names clients send as `model`, comma-separated (empty: the model as given)",
    "max_model_len": "longest prompt + output in tokens (0: the checkpoint's)",
    "api_key": "require `Authorization: Bearer KEY` on /v1/*, several keys comma-separated (empty: no check)",
    "api_key_metrics": "with --api-key, /metrics needs the key too (default: open for scrapers)",
    "chat_template": "a Jinja chat template, or a file holding one (empty: the checkpoint's)",
    "tool_call_parser": "format of tool calls in model output: hermes, llama3_json, mistral, or auto (guessed "
                        "from the chat template)",
    "host": "interface to listen on",
    "port": "HTTP port",
    "max_inflight": "concurrent sequences (prompts x n of each request) before 429",
    "max_request_bytes": "largest request body in bytes; larger ones get a 413",
    "request_timeout": "longest a whole request may take, seconds",
    "token_timeout": "longest silence between two token messages, seconds; a request on a live, busy worker "
                     "waits on",
    "stall_timeout": "seconds of silence after which a choice whose worker is alive but idle is replayed (its "
                     "last messages were lost)",
    "sse_ping": "seconds between SSE keep-alive comments on streams (0: none, as OpenAI and vLLM)",
    "route_timeout": "longest the router may take to place a request, seconds",
    "worker_timeout": "a worker silent this long is lost: its requests are replayed elsewhere, seconds",
    "max_replays": "replays per choice before the client gets the error",
    "replay_timeout": "how long a replayed choice waits for a worker to take it, seconds",
    "send_timeout": "a stream client that takes no data for this long is cut off, seconds",
    "max_pending_events": "token chunks held for a stream client that is not reading before it is cut off",
    "policy": "routing: prefix | round_robin | least_loaded",
    "heartbeat_timeout": "a worker silent this long is dead, seconds",
    "disagg_threshold": "prompts with fewer uncached tokens are prefilled on the decode worker",
    "forward_timeout": "longest a worker may take to accept a request, seconds",
    "route_deadline": "longest the router tries workers for one request (under the gateway's route timeout), s",
    "suspect_after": "seconds of heartbeat silence after which a worker is avoided while others beat",
    "block_size": "KV block size in tokens (router and workers must agree)",
    "hash_seed": "seed of the KV block hashes (router and workers must agree)",
    "registry_capacity": "block hashes kept in the prefix registry (LRU)",
    "prefill_weight": "weight of the tokens to prefill in the prefix routing cost",
    "temperature": "> 0: sample workers by softmax(-cost / temperature) (several routers)",
    "recent_ttl": "seconds a routing decision steers its siblings before KV events arrive",
    "metrics_port": "Prometheus /metrics on this port (0: off)",
    "role": "prefill | decode | colocated",
    "worker_id": "this worker's id on the bus",
    "num_blocks": "KV blocks (0: sized from --kv-cache-bytes)",
    "kv_cache_bytes": "KV cache size in bytes (0: automatic, several max_model_len requests)",
    "max_num_seqs": "most sequences in one step",
    "max_num_batched_tokens": "most tokens in one step",
    "long_prefill_tokens": "most prompt tokens one request computes per step (0: no cap)",
    "chunked_prefill": "split long prompts across steps",
    "prefix_caching": "reuse the KV blocks of shared prompt prefixes",
    "attention": "attention kernels: torch | native | triton | auto",
    "dtype": "weights and activations: auto (the checkpoint's) | float32 | bfloat16 | float16",
    "device": "cpu, or cuda[:N]",
    "threads": "torch threads (0: the cores this process may run on)",
    "cpus": "cores to pin to, e.g. 0 or 0-1 (empty: leave affinity alone)",
    "kv_transport": "prefill -> decode KV pages: shm | nats | nixl | cuda-ipc",
    "heartbeat_s": "seconds between status messages",
    "lease_s": "seconds blocks reserved for an incoming transfer are kept",
    "experts": "MoE expert shards to run the experts on (0: in this process)",
    "experts_timeout": "longest a layer's expert dispatch may take, seconds",
    "experts_direct": "reach shards on this host over Unix sockets rather than the bus",
    "shard": "I/N: this process holds shard I of N",
    "placement": "experts per shard, ';'-separated, e.g. 0-3,7;4-7 (empty: contiguous)",
    "shard_id": "dispatch subject name (empty: <model>-<I>of<N>)",
    "kernel": "expert kernels: torch | triton | auto",
    "direct": "also serve workers on this host over a Unix socket",
}


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per config field, defaulting to BRIGADE_<FIELD> or the field default."""
    for f in fields(cls):
        default = f.default if f.default_factory is MISSING else f.default_factory()
        default = env(f.name, default)
        flag = "--" + f.name.replace("_", "-")
        text = f"{HELP.get(f.name, f.name.replace('_', ' '))} (default: %(default)s; env BRIGADE_{f.name.upper()})"
        if isinstance(default, bool):
            parser.add_argument(flag, type=_bool, default=default, metavar="BOOL", help=text)
        else:
            parser.add_argument(flag, type=type(default), default=default, choices=f.metadata.get("choices"),
                                help=text)


def from_args(cls: type, args: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def parse_cpus(spec: str) -> set[int]:
    """'0-2,5' -> {0, 1, 2, 5}."""
    out: set[int] = set()
    for part in filter(None, spec.split(",")):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _bool(raw: str) -> bool:
    return raw.lower() in ("1", "true", "yes", "on")

