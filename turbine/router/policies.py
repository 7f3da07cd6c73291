"""Load-only routing policies: pure choices over a snapshot of candidate loads.

``kv`` (prefix-aware, overlap-first cost) is chosen in ``selector.py``, ``predicted`` (prefix- and
load-aware, predicted TTFT) in ``latency_selector.py``; the policy names all live here.
"""
from __future__ import annotations

import random
from collections.abc import Sequence

from turbine.router.load_tracker import LoadEstimate

LOAD_POLICIES = ("round-robin", "random", "least-loaded", "power-of-two")
POLICIES = ("kv", "predicted", *LOAD_POLICIES)


def _cost(load: LoadEstimate | None) -> tuple[int, int]:
    if load is None:
        return (0, 0)
    return (load.prefill_tokens + load.decode_blocks, load.active_requests)


def least_loaded(candidates: Sequence[str], loads: dict[str, LoadEstimate], rng: random.Random) -> str:
    best = min(_cost(loads.get(w)) for w in candidates)
    ties = [w for w in candidates if _cost(loads.get(w)) == best]
    return ties[0] if len(ties) == 1 else rng.choice(ties)


def power_of_two(candidates: Sequence[str], loads: dict[str, LoadEstimate], rng: random.Random) -> str:
    if len(candidates) == 1:
        return candidates[0]
    a, b = rng.sample(list(candidates), 2)
    return a if _cost(loads.get(a)) <= _cost(loads.get(b)) else b


class LoadPolicy:
    """Picks a worker by policy name; round-robin keeps its cursor here."""

    def __init__(self, name: str, seed: int | None = None):
        if name not in LOAD_POLICIES:
            raise ValueError(f"unknown load policy {name!r}; choose one of {', '.join(LOAD_POLICIES)}")
        self.name = name
        self.rng = random.Random(seed)
        self._cursor = 0

    def choose(self, candidates: Sequence[str], loads: dict[str, LoadEstimate]) -> str:
        if not candidates:
            raise ValueError("no candidate workers")
        if self.name == "round-robin":
            self._cursor = (self._cursor + 1) % (1 << 30)
            return candidates[self._cursor % len(candidates)]
        if self.name == "random":
            return self.rng.choice(list(candidates))
        if self.name == "least-loaded":
            return least_loaded(candidates, loads, self.rng)
        return power_of_two(candidates, loads, self.rng)
