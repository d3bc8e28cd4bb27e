"""One request's state inside the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from brigade.engine.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Prompt plus generated tokens, how many have KV computed, and the blocks that hold it."""

    request_id: str
    token_ids: list[int]
    num_prompt: int
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose KV is in the cache
    block_ids: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # chained hashes of the full blocks of token_ids
    num_committed: int = 0  # leading blocks registered in the pool's hash index
    num_cached: int | None = None  # prompt tokens served from the prefix cache at first admission
    finish_reason: str | None = None
    scheduled_time: float | None = None  # first admission into the running batch (monotonic)
    first_token_time: float | None = None
    prefill_only: bool = False  # disaggregated prefill: stop after the first token, keep the blocks
    matcher: Any = None  # llguidance matcher of a constrained request, advanced over every output token

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt
