"""The router's recent decisions, for the dashboard: bounded, and free when nobody looks.

A ``Router`` has no log by default (``decision_log = None``): ``route`` then does exactly what
it did before. With one attached (the frontend attaches one when its dashboard is on), every
decision is kept, and completed as its request goes on:

    route ─▶ record()       chosen worker, predicted overlap (blocks) and TTFT, prompt tokens;
                            the alternatives' costs when the detail budget allows (below)
    first token ─▶ first_token()   the TTFT the router saw (route to first token, router clock)
    usage ─▶ observe()             the worker's actual prefix-cache hit (blocks)
    dashboard ─▶ since(seq)        decisions recorded or completed after ``seq``

Bounded in every direction: ``capacity`` decisions (the oldest go first), ``max_alternatives``
alternatives each (the cheapest, and the chosen worker), and at most ``detail_per_s`` decisions
a second (a token bucket, bursts of ``detail_burst``) pay for computing the alternatives; the
rest keep only the chosen worker, so a fleet routing thousands of requests a second spends on
the log a few hundred cost evaluations a second, not one per candidate per request.
Pure: no I/O, clocks passed in; one thread (the frontend's event loop) calls it.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

DEFAULT_CAPACITY = 200
DEFAULT_MAX_ALTERNATIVES = 8
DEFAULT_DETAIL_PER_S = 50.0


class Alternative(NamedTuple):
    """One candidate as the policy weighed it."""

    worker_id: str
    overlap_blocks: float  # its cached prefix of the prompt (tier-discounted where tiers count less)
    cost: float | None  # kv: the selector's cost (blocks); load policies: queued prompt tokens + blocks
    ttft_s: float | None  # predicted: its predicted TTFT
    itl_s: float | None  # predicted: the step time the prompt would impose on its running requests


@dataclass(slots=True)
class LoggedDecision:
    seq: int  # the log's sequence number when it was recorded or last completed
    request_id: str
    at: float  # wall-clock time of the decision
    routed_at: float  # router clock, for the TTFT
    worker_id: str
    policy: str
    prompt_tokens: int
    overlap_blocks: int  # predicted prefix-cache hit
    predicted_ttft_s: float | None  # the predicted policy's estimate
    remote_kv: bool  # the prompt's KV came from a prefill worker
    alternatives: list[Alternative] | None  # None: beyond the detail budget
    actual_cached_blocks: int | None = None
    actual_ttft_s: float | None = None


class DecisionLog:
    def __init__(self, capacity: int = DEFAULT_CAPACITY, *, max_alternatives: int = DEFAULT_MAX_ALTERNATIVES,
                 detail_per_s: float = DEFAULT_DETAIL_PER_S, detail_burst: int = 20,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time) -> None:
        if capacity < 1 or max_alternatives < 1 or detail_burst < 1:
            raise ValueError("capacity, max_alternatives and detail_burst must be >= 1")
        if detail_per_s < 0:
            raise ValueError("detail_per_s must be >= 0")
        self.capacity = capacity
        self.max_alternatives = max_alternatives
        self.detail_per_s = detail_per_s
        self.detail_burst = detail_burst
        self.clock = clock
        self.wall_clock = wall_clock
        self.seq = 0  # bumped by every record and completion
        self.recorded = 0  # decisions ever recorded
        self.without_detail = 0  # of which over the detail budget
        self._ring: deque[LoggedDecision] = deque()
        self._by_id: dict[str, LoggedDecision] = {}
        # the detail budget as a virtual schedule (GCRA): one comparison a decision
        self._interval = 1.0 / detail_per_s if detail_per_s > 0 else 0.0
        self._slack = (detail_burst - 1) * self._interval + 1e-9
        self._tat = clock()  # when the budget is next fully spent

    def __len__(self) -> int:
        return len(self._ring)

    def __iter__(self) -> Iterator[LoggedDecision]:
        return iter(self._ring)

    def wants_detail(self) -> bool:
        """Whether the next decision may carry its alternatives (takes one from the budget)."""
        if not self._interval:
            return False
        now = self.clock()
        tat = self._tat
        if tat - now > self._slack:
            return False
        self._tat = (tat if tat > now else now) + self._interval
        return True

    def record(self, request_id: str, worker_id: str, policy: str, *, prompt_tokens: int, overlap_blocks: int,
               predicted_ttft_s: float | None = None, remote_kv: bool = False,
               alternatives: list[Alternative] | None = None) -> LoggedDecision:
        self.seq += 1
        self.recorded += 1
        if alternatives is None:
            self.without_detail += 1
        else:
            alternatives = self._trim(alternatives, worker_id)
        d = LoggedDecision(self.seq, request_id, self.wall_clock(), self.clock(), worker_id, policy, prompt_tokens,
                           overlap_blocks, predicted_ttft_s, remote_kv, alternatives)
        ring = self._ring
        if len(ring) >= self.capacity:
            old = ring.popleft()
            if self._by_id.get(old.request_id) is old:
                del self._by_id[old.request_id]
        ring.append(d)
        self._by_id[request_id] = d
        return d

    def _trim(self, alts: list[Alternative], chosen: str) -> list[Alternative]:
        """The cheapest ``max_alternatives`` (by TTFT where predicted, else cost), the chosen kept."""
        if len(alts) <= self.max_alternatives:
            return sorted(alts, key=_rank)
        best = sorted(alts, key=_rank)[: self.max_alternatives]
        if all(a.worker_id != chosen for a in best):
            best[-1] = next(a for a in alts if a.worker_id == chosen)
        return best

    def first_token(self, request_id: str) -> None:
        d = self._by_id.get(request_id)
        if d is not None and d.actual_ttft_s is None:
            self.seq += 1
            d.seq = self.seq
            d.actual_ttft_s = max(0.0, self.clock() - d.routed_at)

    def observe(self, request_id: str, actual_cached_blocks: int) -> None:
        d = self._by_id.get(request_id)
        if d is not None and d.actual_cached_blocks is None:
            self.seq += 1
            d.seq = self.seq
            d.actual_cached_blocks = actual_cached_blocks

    def since(self, seq: int) -> list[LoggedDecision]:
        """Decisions recorded or completed after ``seq``, oldest first."""
        return [d for d in self._ring if d.seq > seq]


def _rank(a: Alternative) -> float:
    if a.ttft_s is not None:
        return a.ttft_s
    return a.cost if a.cost is not None else 0.0


__all__ = ["Alternative", "DecisionLog", "LoggedDecision"]
