"""The router's view of the workers: heartbeats, liveness, load booked at decision time."""

from __future__ import annotations

from dataclasses import dataclass

from brigade.protocol import WorkerStatus


@dataclass
class WorkerState:
    """A worker's last reported status plus what this router sent it since."""

    status: WorkerStatus
    last_seen: float
    booked_requests: int = 0
    booked_tokens: int = 0  # uncached prompt tokens sent since the last report
    booked_blocks: int = 0  # KV blocks those requests will take

    @property
    def id(self) -> str:
        return self.status.worker_id

    @property
    def role(self) -> str:
        return self.status.role

    def load(self) -> tuple[float, float, int]:
        """Lower is better: queued work first, then KV pressure, then prompt tokens waiting."""
        s = self.status
        requests = s.running + s.waiting + self.booked_requests
        kv = s.kv_used / s.kv_total if s.kv_total else 0.0
        return (requests, kv, s.prefill_queued + self.booked_tokens)


class Fleet:
    """Live workers by id; a worker whose heartbeat lapses (or that says it is stopping) is dropped."""

    def __init__(self, heartbeat_timeout: float) -> None:
        self.heartbeat_timeout = heartbeat_timeout
        self.workers: dict[str, WorkerState] = {}

    def update(self, status: WorkerStatus, now: float) -> None:
        """A fresh report replaces the snapshot and clears the bookings it now accounts for."""
        if status.stopping:
            self.workers.pop(status.worker_id, None)
            return
        self.workers[status.worker_id] = WorkerState(status, now)

    def purge(self, now: float) -> list[str]:
        """Drop workers not heard from within the timeout; return their ids."""
        dead = [w for w, st in self.workers.items() if now - st.last_seen > self.heartbeat_timeout]
        for w in dead:
            del self.workers[w]
        return dead

    def remove(self, worker_id: str) -> None:
        self.workers.pop(worker_id, None)

    def live(self, roles: tuple[str, ...], now: float) -> list[WorkerState]:
        return sorted((st for st in self.workers.values()
                       if st.role in roles and now - st.last_seen <= self.heartbeat_timeout), key=lambda s: s.id)

    def book(self, worker_id: str, prompt_tokens: int, blocks: int = 0) -> None:
        """Count a routed request against the worker at once, before its next report (no herding)."""
        st = self.workers.get(worker_id)
        if st is not None:
            st.booked_requests += 1
            st.booked_tokens += prompt_tokens
            st.booked_blocks += blocks
