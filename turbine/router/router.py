"""The router the frontend talks to: picks a worker per request and keeps its load view.

Selection is delegated to a policy (pure function over a load snapshot); reserving load for
a routed request happens here and nowhere else.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from turbine.router.load_tracker import LoadTracker
from turbine.router.policies import LoadPolicy


class RouteDecision(NamedTuple):
    worker_id: str
    overlap_blocks: int  # predicted prefix-cache hit in blocks (0 for load-only policies)


class Router:
    def __init__(self, policy: str = "round-robin", *, block_size: int = 16, seed: int | None = None):
        self.policy = LoadPolicy(policy, seed)
        self.loads = LoadTracker(block_size=block_size)
        self.decisions = 0

    def route(self, request_id: str, candidates: Sequence[str], token_ids: Sequence[int]) -> RouteDecision:
        worker = self.policy.choose(candidates, self.loads.workers)
        self.loads.routed(request_id, worker, len(token_ids))
        self.decisions += 1
        return RouteDecision(worker, 0)

    def first_token(self, request_id: str) -> None:
        self.loads.first_token(request_id)

    def finished(self, request_id: str) -> None:
        self.loads.finished(request_id)

    def worker_removed(self, worker_id: str) -> None:
        self.loads.remove_worker(worker_id)
