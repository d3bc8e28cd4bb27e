"""Continuous batching: every step re-forms the batch under one token budget.

Running sequences go first (a decode costs one token, an unfinished prefill a chunk of the rest),
then waiting ones are admitted FCFS while the budget, `max_num_seqs` and free blocks allow. When
blocks run out, the most recently admitted running sequence is preempted: its blocks are freed and
it goes back to the head of the queue to be recomputed later (cached blocks often survive).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from brigade.engine.sequence import Sequence, Status
from brigade.kv.manager import KvManager


@dataclass
class Batch:
    """What one step computes: `num_new[i]` tokens of `seqs[i]`, decode-like sequences first."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)


class Scheduler:
    """FCFS scheduler with chunked prefill and preemption by recompute."""

    def __init__(self, kv: KvManager, max_num_seqs: int, max_num_batched_tokens: int,
                 chunked_prefill: bool = True, long_prefill_tokens: int = 0) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        # One long prompt may take at most this much of a step (0: the whole budget), so short requests that
        # arrive behind it (e.g. a follow-up whose prefix is cached) still get admitted in the same step.
        self.long_prefill_tokens = long_prefill_tokens if chunked_prefill else 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        """Pick this step's sequences and token counts, allocating their blocks."""
        batch = Batch()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq.num_tokens - seq.num_computed, budget)
            while not self.kv.allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break
            batch.seqs.append(seq)
            batch.num_new.append(n)
            budget -= n
            i += 1
        if not batch.preempted:
            self._admit(batch, budget)
        # Decode-like sequences (one new token) first, shortest context first: attention batches them
        # in groups of similar length.
        order = sorted(range(len(batch.seqs)),
                       key=lambda j: (batch.num_new[j] != 1, batch.seqs[j].num_computed))
        batch.seqs = [batch.seqs[j] for j in order]
        batch.num_new = [batch.num_new[j] for j in order]
        return batch

    def _admit(self, batch: Batch, budget: int) -> None:
        pool = self.kv.pool
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[i]
            hits = self.kv.match_prefix(seq)
            if self.kv.waits_for(seq, len(hits)):
                i += 1  # its next prefix block is being computed by a sibling: admit it once cached
                continue
            cached = len(hits) * self.kv.block_size
            n = seq.num_tokens - cached
            if n > budget and not self.chunked_prefill:
                break
            n = self._chunk(n, budget)
            if not self.kv.allocate(seq, n, hits):
                break
            del self.waiting[i]
            self.kv.claim(seq, len(hits))
            pool.stats.prefix_queries += seq.num_tokens
            pool.stats.prefix_hits += cached
            if seq.num_cached is None:
                seq.num_cached = min(cached, seq.num_prompt)
                seq.scheduled_time = time.monotonic()
            seq.num_computed = cached
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new.append(n)
            budget -= n

    def _chunk(self, remaining: int, budget: int) -> int:
        n = min(remaining, budget)
        if self.long_prefill_tokens and n > 1:
            n = min(n, self.long_prefill_tokens)
        return n

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.kv.pool.stats.preemptions += 1

    def add_running(self, seq: Sequence) -> None:
        """Admit a sequence whose KV is already in its blocks (a disaggregated handoff)."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence, reason: str, free: bool = True) -> None:
        """Take a sequence out (finished or aborted) and free its blocks unless told to keep them."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        if free:
            self.kv.free(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
