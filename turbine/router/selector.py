"""Choose a worker for one request: a pure cost function over a snapshot of overlaps and loads.

    cost(w) = overlap_weight * (request_blocks - overlap(w) + prefill_tokens(w) / block_size)
              + decode_blocks(w)

The first term is the prefill work the request would wait behind on ``w`` (its own uncached
blocks plus the prompts already queued there), the second the memory ``w`` already has in use.
The lowest cost wins and ties go to a seeded random choice, so equal workers share the load. With
``temperature`` T > 0 the choice is sampled from softmax(-normalised cost / T) instead, costs
normalised to [0, 1] so T means the same whatever the prompt length. Nothing here mutates state;
reserving the chosen worker's load is the router's job.
"""
from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from turbine.router.load_tracker import LoadEstimate


class Selection(NamedTuple):
    worker_id: str
    overlap_blocks: int
    cost: float


def worker_costs(candidates: Sequence[str], overlaps: Mapping[str, int], loads: Mapping[str, LoadEstimate],
                 request_blocks: int, *, block_size: int, overlap_weight: float = 1.0) -> list[float]:
    """The cost of each candidate, in order (see the module docstring)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    inv_bs = 1.0 / block_size
    ow = overlap_weight
    oget, lget = overlaps.get, loads.get
    out = []
    for w in candidates:
        ld = lget(w)
        if ld is None:
            out.append(ow * (request_blocks - oget(w, 0)))
        else:
            out.append(ow * (request_blocks - oget(w, 0) + ld.prefill_tokens * inv_bs) + ld.decode_blocks)
    return out


def softmax_pick(costs: Sequence[float], temperature: float, rng: random.Random) -> int:
    """Index sampled from softmax(-normalised cost / temperature); uniform when costs are equal."""
    lo, hi = min(costs), max(costs)
    if hi <= lo:
        return rng.randrange(len(costs))
    scale = 1.0 / ((hi - lo) * temperature)
    weights = [math.exp(-(c - lo) * scale) for c in costs]  # the cheapest gets weight 1
    r = rng.random() * sum(weights)
    acc = 0.0
    for i, wt in enumerate(weights):
        acc += wt
        if r < acc:
            return i
    return len(costs) - 1  # rounding left r at the very end


def select_worker(candidates: Sequence[str], overlaps: Mapping[str, int], loads: Mapping[str, LoadEstimate],
                  request_blocks: int, *, block_size: int, rng: random.Random, overlap_weight: float = 1.0,
                  temperature: float = 0.0) -> Selection:
    """The worker to send the request to, with its predicted overlap (blocks) and cost."""
    if not candidates:
        raise ValueError("no candidate workers")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0:
        costs = worker_costs(candidates, overlaps, loads, request_blocks, block_size=block_size,
                             overlap_weight=overlap_weight)
        i = softmax_pick(costs, temperature, rng)
        w = candidates[i]
        return Selection(w, overlaps.get(w, 0), costs[i])
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    # One pass, the same arithmetic as worker_costs (this runs for every request).
    inv_bs = 1.0 / block_size
    ow = overlap_weight
    oget, lget = overlaps.get, loads.get
    best = math.inf
    ties: list[str] = []
    for w in candidates:
        ld = lget(w)
        if ld is None:
            c = ow * (request_blocks - oget(w, 0))
        else:
            c = ow * (request_blocks - oget(w, 0) + ld.prefill_tokens * inv_bs) + ld.decode_blocks
        if c < best:
            best = c
            ties = [w]
        elif c == best:
            ties.append(w)
    w = ties[0] if len(ties) == 1 else ties[rng.randrange(len(ties))]
    return Selection(w, overlaps.get(w, 0), best)
