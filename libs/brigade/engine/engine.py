"""The engine: `add_request`, `step`, `abort`, and an offline `generate`.

Synchronous and single-threaded by design; services call `step` from a worker thread so the event
loop never blocks on a model step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from brigade.engine.grammar import GrammarError, Grammars
from brigade.engine.kv_size import kv_size
from brigade.engine.runner import Runner
from brigade.engine.sampler import Sampled, Sampler, SampleRow
from brigade.engine.sampling import SamplingParams
from brigade.engine.scheduler import Scheduler
from brigade.engine.sequence import Sequence as Seq
from brigade.kernels.attention import make_attention
from brigade.kernels.moe import MoEExecutor
from brigade.kv.manager import KvManager
from brigade.kv.pool import BlockPool, KvEvent
from brigade.model.llama import Model, load_model
from brigade.model.tokenizer import Detokenizer, Tokenizer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class InvalidRequest(ValueError):
    """A request the engine refuses; `param` names the offending field when there is one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of one engine; services build it from their flags."""

    model: str
    block_size: int = 16
    num_blocks: int | None = None  # None: size from kv_cache_bytes
    kv_cache_bytes: int = 0  # 0: automatic (engine/kv_size.py); else at least one max_model_len request
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 1024
    long_prefill_tokens: int = 512  # most prompt tokens one request computes per step (0: no cap)
    chunked_prefill: bool = True
    prefix_caching: bool = True
    max_model_len: int | None = None
    attention: str = "auto"  # torch | native | triton | auto
    # Packed matmuls, fused native kernels and in-place paged attention where they apply (float32 on the CPU);
    # False runs the eager reference path everywhere (what the fast path is tested against).
    fast_path: bool = True
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None  # torch threads; None leaves torch's setting alone
    seed: int = 0
    hash_seed: int = 0


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None  # stop | length | abort
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    logprobs: list[Sampled] | None = None
    time_in_queue: float = 0.0  # seconds from arrival to first scheduling


@dataclass
class Completion:
    """A finished request, as `generate` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    logprobs: list[Sampled] = field(default_factory=list)


@dataclass
class _Text:
    """Per-request detokenization state and the stop-string hold-back."""

    detok: Detokenizer
    text: str = ""
    sent: int = 0  # chars of text already returned; the rest is withheld while it could begin a stop string


class Engine:
    """Continuous-batching inference over a paged KV cache."""

    def __init__(self, config: EngineConfig, model: Model | None = None, tokenizer: Tokenizer | None = None,
                 on_kv_event: Callable[[KvEvent], None] | None = None,
                 allocate_cache: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None,
                 experts: MoEExecutor | None = None) -> None:
        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config
        dtype = DTYPES[config.dtype]
        name = config.attention if config.fast_path or config.attention != "auto" else "torch"
        attention = make_attention(name, config.block_size, config.device, dtype)
        self.model = model or load_model(config.model, dtype, attention=attention, device=config.device,
                                         experts=experts, fast=None if config.fast_path else False)
        self.tokenizer = tokenizer or Tokenizer(config.model)
        cfg = self.model.cfg
        self.max_model_len = min(config.max_model_len or cfg.max_position, cfg.max_position)
        num_blocks = config.num_blocks
        if not num_blocks:  # sized from a byte budget, or automatically (kv_size.py)
            num_blocks, self.max_model_len = kv_size(self._block_bytes(), config.block_size, self.max_model_len,
                                                     config.kv_cache_bytes)
        self.pool = BlockPool(num_blocks, config.block_size, on_event=on_kv_event)
        # Every layer slides (Mistral v0.1): blocks that left the window go back to the pool during decode. Not
        # with global layers too (Gemma), which read every block.
        windows = {cfg.window(i) for i in range(cfg.num_layers)}
        self.window = windows.pop() if len(windows) == 1 else 0
        self.kv = KvManager(self.pool, config.prefix_caching, extra=cfg.name.encode(), hash_seed=config.hash_seed,
                            window=self.window)
        budget = config.max_num_batched_tokens
        if not config.chunked_prefill:
            budget = max(budget, self.max_model_len)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, budget, config.chunked_prefill,
                                   config.long_prefill_tokens)
        self.runner = Runner(self.model, num_blocks, config.block_size, config.device, allocate_cache,
                             window=self.window)
        eos = cfg.eos_token_ids or ((self.tokenizer.eos_token_id,) if self.tokenizer.eos_token_id is not None else ())
        self.eos_token_ids = frozenset(eos)
        self.grammars = Grammars(self.tokenizer.hf, cfg.vocab_size, sorted(self.eos_token_ids))
        self.sampler = Sampler(sorted(self.eos_token_ids), seed=config.seed, grammars=self.grammars)
        self.seqs: dict[str, Seq] = {}
        self.texts: dict[str, _Text] = {}
        self.held: dict[str, Seq] = {}  # prefilled, finished "handoff", blocks kept until release()
        self.ended: list[RequestOutput] = []  # resumed requests that had every token: reported by the next step
        self.reserved: dict[str, tuple[list[int], float]] = {}  # incoming transfers: blocks, deadline
        self.num_steps = 0
        self.current: list[Seq] = []  # the sequences of the step in progress (for per-step tracing)
        self.prompt_tokens = 0  # prompts of requests that produced their first token here
        self.generation_tokens = 0

    def _block_bytes(self) -> int:
        cfg = self.model.cfg
        elem = torch.empty(0, dtype=self.model.dtype).element_size()
        return 2 * cfg.num_layers * self.config.block_size * cfg.num_kv_heads * cfg.head_dim * elem

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    output_ids: Sequence[int] = (), prefill_only: bool = False, text_sent: int | None = None) -> None:
        """Queue a request; raise InvalidRequest (state unchanged) when it cannot be served.

        `output_ids` resumes a request that already generated those tokens elsewhere (replay or a
        failed handoff); `text_sent` is how many chars of their text the client has (None: all of it).
        `prefill_only` stops after the first token with finish_reason "handoff" and keeps the blocks
        (see `held`) until `release`, unless the request ended at that token anyway.
        """
        seq = self._new_seq(request_id, prompt, params, output_ids)
        seq.prefill_only = prefill_only
        self._register(seq, text_sent)
        if seq.num_output >= seq.params.max_tokens:
            self._end_resumed(seq)
            return
        self.scheduler.add(seq)

    def _end_resumed(self, seq: Seq) -> None:
        """A resumed request that already has all its tokens (only its last message was lost): it ends at the
        next step with the text still withheld, as the first worker would have ended it."""
        state = self.texts.pop(seq.request_id)
        del self.seqs[seq.request_id]
        text, reason, stop = state.text, "length", None
        cut = _cut_at_stop(text, len(text) - state.sent, seq.params)
        if cut is not None:
            (text, stop), reason = cut, "stop"
        self.ended.append(RequestOutput(seq.request_id, [], text[state.sent:], True, reason, stop, seq.num_prompt,
                                        0, seq.num_output))

    def _new_seq(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams | None,
                 output_ids: Sequence[int]) -> Seq:
        params = params or SamplingParams()
        if request_id in self.seqs or request_id in self.held:
            raise InvalidRequest(f"request id {request_id!r} is already in use", "request_id")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        self.validate(ids, params, output_ids)
        seq = Seq(request_id, ids + [int(t) for t in output_ids], len(ids), params)
        if params.structured is not None:
            try:  # from the cache when the service prepared it off its event loop
                seq.matcher = self.grammars.matcher(*params.structured, output_ids)
            except GrammarError as e:
                raise InvalidRequest(f"invalid constraint: {e}", "structured") from e
        return seq

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams, output_ids: Sequence[int] = ()) -> None:
        """Raise InvalidRequest unless this request can be served. Reads only fixed settings, so a
        service may call it from its event loop while a step runs."""
        try:
            params.validate()
        except ValueError as e:
            raise InvalidRequest(str(e), getattr(e, "param", None)) from e
        self.check_prompt(prompt_ids, params)
        if len(output_ids) > params.max_tokens:
            raise InvalidRequest("the request already generated more than max_tokens tokens", "max_tokens")

    def _register(self, seq: Seq, text_sent: int | None = None) -> None:
        """Track `seq`; a resumed one replays its earlier tokens through the detokenizer, so that the text
        withheld elsewhere (incomplete UTF-8, a possible stop string) is still emitted and a stop string
        that spans the cut is still found."""
        self.seqs[seq.request_id] = seq
        state = _Text(Detokenizer(self.tokenizer, seq.token_ids[:seq.num_prompt]))
        for t in seq.token_ids[seq.num_prompt:]:
            state.text += state.detok.add(t)
        state.sent = len(state.text) if text_sent is None else min(max(text_sent, 0), len(state.text))
        self.texts[seq.request_id] = state

    # ---- disaggregation: the decode side -----------------------------------------------------
    def reserve(self, request_id: str, num_tokens: int, lease_s: float) -> list[int] | None:
        """Blocks for `num_tokens` of incoming KV (a prefill worker writes them); None if they don't fit."""
        if request_id in self.reserved or request_id in self.seqs:
            return None
        need = -(-num_tokens // self.pool.block_size)
        if need > self.pool.num_free:
            return None
        blocks = [self.pool.allocate() for _ in range(need)]
        self.reserved[request_id] = (blocks, time.monotonic() + lease_s)
        return blocks

    def unreserve(self, request_id: str) -> bool:
        """Free a reservation that will not be filled."""
        entry = self.reserved.pop(request_id, None)
        if entry is None:
            return False
        for b in reversed(entry[0]):
            self.pool.release(b)
        return True

    def expire_reservations(self, now: float | None = None) -> list[str]:
        """Free reservations whose lease ran out (their sender died or gave up); return their ids."""
        now = time.monotonic() if now is None else now
        gone = [rid for rid, (_, deadline) in self.reserved.items() if deadline < now]
        for rid in gone:
            self.unreserve(rid)
        return gone

    def add_prefilled(self, request_id: str, prompt_ids: Sequence[int], first_token: int,
                      params: SamplingParams, num_cached: int = 0, text_sent: int | None = None,
                      output_ids: Sequence[int] = (), earlier_sent: int | None = None) -> None:
        """Continue a request whose KV arrived in its reserved blocks and whose next token is known.

        `output_ids`: tokens the request had generated before this prefill (a replay), whose KV came too.
        `text_sent`: chars of the first token's text the prefill worker emitted (it withholds incomplete UTF-8
        and what could begin a stop string); the rest is emitted here. `earlier_sent`: chars of the earlier
        tokens' text the client had (None: all of it).
        """
        entry = self.reserved.get(request_id)
        if entry is None:
            raise InvalidRequest(f"no reservation for request {request_id!r} (lease expired?)", "request_id")
        seq = self._new_seq(request_id, prompt_ids, params, [*output_ids, first_token])
        computed = seq.num_prompt + len(output_ids)
        blocks = entry[0]
        if len(blocks) * self.pool.block_size < computed:
            raise InvalidRequest(f"reservation of {len(blocks)} blocks is too small for the prompt", "prompt")
        del self.reserved[request_id]
        seq.block_ids = list(blocks)
        seq.num_computed = computed
        seq.num_cached = num_cached
        seq.first_token_time = time.monotonic()
        base = 0
        if output_ids:  # where the first token's text starts: after what the client had of the earlier text
            earlier = Detokenizer(self.tokenizer, seq.token_ids[:seq.num_prompt])
            full = len("".join(earlier.add(t) for t in output_ids))
            base = full if earlier_sent is None else min(max(earlier_sent, 0), full)
        self._register(seq, None if text_sent is None else base + text_sent)
        self.kv.commit(seq)
        self.scheduler.add_running(seq)

    # ---- disaggregation: the prefill side ----------------------------------------------------
    def release(self, request_id: str) -> bool:
        """Free the blocks of a request held after its handoff."""
        seq = self.held.pop(request_id, None)
        if seq is None:
            return False
        self.kv.free(seq)
        return True

    def check_prompt(self, ids: Sequence[int], params: SamplingParams) -> None:
        """Raise InvalidRequest for an empty, too long or out-of-vocabulary prompt."""
        vocab = self.model.cfg.vocab_size
        if not ids:
            raise InvalidRequest("prompt is empty", "prompt")
        if any(t < 0 or t >= vocab for t in ids):
            raise InvalidRequest(f"prompt has token ids outside the vocabulary [0, {vocab})", "prompt")
        if any(t >= vocab for t, _ in params.logit_bias):
            raise InvalidRequest(f"logit_bias has token ids outside the vocabulary [0, {vocab})", "logit_bias")
        if len(ids) >= self.max_model_len:
            raise InvalidRequest(
                f"prompt has {len(ids)} tokens; this model's context is {self.max_model_len} tokens "
                "(the prompt must leave room for at least one generated token)", "prompt")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequest(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds this model's context "
                f"of {self.max_model_len} tokens", "max_tokens")
        capacity = self.pool.num_blocks * self.pool.block_size
        need = len(ids) + params.max_tokens
        if self.window:  # the prompt at most, then a window plus the block being filled
            need = min(need, max(len(ids), self.window) + 2 * self.pool.block_size)
        if need > capacity:
            raise InvalidRequest(f"prompt + max_tokens needs more KV slots than the cache has ({capacity})",
                                 "max_tokens")

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks (held or reserved ones too); False if unknown."""
        if self.release(request_id) or self.unreserve(request_id):
            return True
        seq = self.seqs.pop(request_id, None)
        self.texts.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self.ended)

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, and report what changed."""
        ended, self.ended = self.ended, []
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return ended
        self.current = batch.seqs
        logits, samplers = self.runner.run(batch)
        for seq, n in zip(batch.seqs, batch.num_new, strict=True):
            seq.num_computed += n
            self.kv.commit(seq)
        self.num_steps += 1
        if not samplers:
            return ended
        rows = [_row(s) for s in samplers]
        sampled = self.sampler(logits, rows)
        now = time.monotonic()
        return ended + [self._append(seq, smp, now) for seq, smp in zip(samplers, sampled, strict=True)]

    def _append(self, seq: Seq, smp: Sampled, now: float) -> RequestOutput:
        token = smp.token_id
        seq.token_ids.append(token)
        self.generation_tokens += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.prompt_tokens += seq.num_prompt
        p = seq.params
        state = self.texts[seq.request_id]
        delta = state.detok.add(token)
        state.text += delta
        reason: str | None = None
        stop_reason: str | int | None = None
        cut = _cut_at_stop(state.text, len(delta), p) if delta else None
        if cut is not None:
            (state.text, stop_reason), reason = cut, "stop"
        if seq.matcher is not None and reason is None:
            seq.matcher.consume_token(token)
            if seq.matcher.is_stopped():  # the output is complete (EOS taken), even under ignore_eos
                reason = "stop"
        if reason is None:
            if token in p.stop_token_ids:
                reason, stop_reason = "stop", token
            elif token in self.eos_token_ids and not p.ignore_eos:
                reason = "stop"
            elif seq.num_output >= p.max_tokens or seq.num_tokens >= self.max_model_len:
                reason = "length"
            elif seq.prefill_only:
                reason = "handoff"
        if reason is not None and reason != "handoff":
            end = len(state.text)
        else:  # withhold what could begin a stop string (a handoff's decode worker carries on from `sent`)
            end = max(state.sent, len(state.text) - (max(map(len, p.stop)) - 1 if p.stop else 0))
        new_text = state.text[state.sent:end]
        state.sent = end
        out = RequestOutput(
            seq.request_id, [token], new_text, reason is not None, reason, stop_reason, seq.num_prompt,
            seq.num_cached or 0, seq.num_output, [smp] if p.logprobs is not None else None,
            (seq.scheduled_time or seq.arrival) - seq.arrival)
        if reason is not None:
            hold = reason == "handoff"
            self.scheduler.finish(seq, reason, free=not hold)
            if hold:
                self.held[seq.request_id] = seq
            del self.seqs[seq.request_id]
            del self.texts[seq.request_id]
        return out

    # ---- offline --------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Run prompts to completion (continuous batching across them); results in prompt order."""
        plist = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        base = f"gen-{time.monotonic_ns()}-"
        results: dict[str, Completion] = {}
        for i, (prompt, p) in enumerate(zip(prompts, plist, strict=True)):
            rid = base + str(i)
            self.add_request(rid, prompt, p)
            results[rid] = Completion(rid, list(self.seqs[rid].token_ids))
        while self.has_unfinished():
            for out in self.step():
                c = results.get(out.request_id)
                if c is None:
                    continue
                c.token_ids.extend(out.new_token_ids)
                c.text += out.new_text
                if out.logprobs:
                    c.logprobs.extend(out.logprobs)
                if out.finished:
                    c.finish_reason = out.finish_reason
                    c.num_cached_tokens = out.num_cached_tokens
        return list(results.values())

    def stats(self) -> dict[str, float]:
        """Scheduler and KV counters (the worker exports them as metrics)."""
        s = self.pool.stats
        return {
            "num_requests_running": len(self.scheduler.running),
            "num_requests_waiting": len(self.scheduler.waiting),
            "kv_blocks_total": self.pool.num_blocks,
            "kv_blocks_used": self.pool.num_used,
            "kv_cache_usage": self.pool.num_used / self.pool.num_blocks,
            "prefix_cache_queries": s.prefix_queries,
            "prefix_cache_hits": s.prefix_hits,
            "num_preemptions": s.preemptions,
            "num_steps": self.num_steps,
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
        }


def _row(seq: Seq) -> SampleRow:
    """What the sampler needs of `seq`; the token lists are copied only for rows whose penalties or min_tokens
    read them (a copy of every context every step was measurable at large batches)."""
    p = seq.params
    if p.has_penalties or p.min_tokens:
        return SampleRow(p, seq.token_ids[:seq.num_prompt], seq.output_ids, _generator(seq), seq.matcher)
    return SampleRow(p, (), (), _generator(seq), seq.matcher)


def _generator(seq: Seq) -> torch.Generator | None:
    """A seeded request's noise for this step, derived from (seed, output position) alone.

    Stateless, so the same seed gives the same tokens after preemption, replay on another worker or
    a prefill-to-decode handoff: nothing about the generator has to travel with the request.
    """
    seed = seq.params.seed
    if seed is None:
        return None
    return torch.Generator().manual_seed((seed * 1_000_003 + seq.num_output) % (1 << 63))


def _cut_at_stop(text: str, delta_len: int, p: SamplingParams) -> tuple[str, str] | None:
    """(text up to the earliest stop string ending in the newest `delta_len` chars, that stop), or None; the
    stop itself is kept when include_stop_str_in_output asks for it."""
    hit = _find_stop(text, delta_len, p.stop) if p.stop else None
    if hit is None:
        return None
    return text[:hit[0] + (len(hit[1]) if p.include_stop_str_in_output else 0)], hit[1]


def _find_stop(text: str, delta_len: int, stops: Sequence[str]) -> tuple[int, str] | None:
    """Earliest stop string that ends inside the newest delta: (index, stop)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        i = text.find(stop, max(0, len(text) - delta_len - len(stop) + 1))
        if i != -1 and (best is None or i < best[0]):
            best = (i, stop)
    return best
