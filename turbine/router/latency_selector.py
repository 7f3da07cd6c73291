"""Choose the worker with the lowest predicted TTFT, under an ITL guard: the ``predicted`` policy.

    for each candidate w:  new(w) = prompt tokens - overlap(w) * block size
                           ttft(w), itl(w) = model(w).predict(state(w), new(w))
                           work(w)       = the prefill time of new(w) alone on w
    eligible: itl(w) <= max_itl (or w decodes nothing) and the request's blocks fit w's KV cache
    pick:     the eligible w of lowest ttft(w) + work_weight * work(w); none eligible: of all

Unlike the overlap-first cost (``selector.py``), where a queued prompt block and a block of a
running request's KV weigh the same, every term here is seconds on that worker's own timing
model: a cache hit is worth the prefill time it saves, a queue the time it takes to drain, and
a worker's decode batch only the few milliseconds it adds to each step. Ties (equal to the
nanosecond: idle workers with no overlap) go to a seeded random choice. Pure: nothing here
changes state.

``work_weight`` is what greed alone misses: the time a request's uncached tokens take from its
worker is time every later request there queues behind, and a prompt computed away from the
worker holding its prefix also leaves that prefix in one cache fewer. On the Mooncake trace
(bench/RESULTS.md, routing_sim) 0.5 raised the prefix hit rate from 51% to 53% at 2x load and
from 45% to 49% at 6x, and cut TTFT p50 at 6x from 56 to 50 ms; TTFT-only greed (0) was no
better at any load.
"""
from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from turbine.router.latency_model import LatencyModel, WorkerState


DEFAULT_WORK_WEIGHT = 0.5


class LatencySelection(NamedTuple):
    worker_id: str
    overlap_blocks: int
    ttft_s: float  # predicted
    itl_s: float  # the step time its prefill would impose on the worker's running requests
    guarded: bool  # False: no worker passed the guard, the lowest TTFT of all was taken


def predictions(candidates: Sequence[str], overlaps: Mapping[str, int], states: Mapping[str, WorkerState],
                models: Mapping[str, LatencyModel], prompt_tokens: int) -> list[tuple[float, float]]:
    """(TTFT, imposed ITL) of each candidate, in order (for tests and the dashboard)."""
    out = []
    for w in candidates:
        m = models[w]
        p = m.predict(states[w], prompt_tokens - int(overlaps.get(w, 0) * m.block_size))
        out.append((p.ttft_s, p.itl_s))
    return out


def select_by_latency(candidates: Sequence[str], overlaps: Mapping[str, int], states: Mapping[str, WorkerState],
                      models: Mapping[str, LatencyModel], prompt_tokens: int, *, rng: random.Random,
                      max_itl_s: float = math.inf, work_weight: float = DEFAULT_WORK_WEIGHT) -> LatencySelection:
    """The worker to send a ``prompt_tokens``-token prompt to (see the module docstring)."""
    if not candidates:
        raise ValueError("no candidate workers")
    best = best_any = math.inf
    ties: list[str] = []
    ties_any: list[str] = []
    oget = overlaps.get
    for w in candidates:
        m = models[w]
        st = states[w]
        bs = m.block_size
        # LatencyModel.predict, inlined (this runs for every candidate of every request)
        new = prompt_tokens - int(oget(w, 0) * bs)  # tier-discounted overlaps are fractional
        if new < 1:
            new = 1  # an engine always computes the last token
        chunk = max(bs, m.budget - st.decoding)
        table = m.prefill_s
        last = len(table) - 1
        k = -(-chunk // bs)
        step_full = table[k] if k < last else table[last]
        d = st.decode_s
        full, rem = divmod(st.queued + new, chunk)
        cost = full * (step_full + d)
        if rem:
            k = -(-rem // bs)
            cost += (table[k] if k < last else table[last]) + d
        if work_weight:  # plus the prefill time of its own tokens alone
            full, rem = divmod(new, chunk)
            work = full * step_full
            if rem:
                k = -(-rem // bs)
                work += table[k] if k < last else table[last]
            cost += work_weight * work
        if cost < best_any:
            best_any, ties_any = cost, [w]
        elif cost == best_any:
            ties_any.append(w)
        if st.decoding:
            if max_itl_s != math.inf:
                k = -(-min(chunk, st.queued + new) // bs)
                if (table[k] if k < last else table[last]) + st.imposed_decode_s > max_itl_s:
                    continue
            if st.kv_blocks + -(-prompt_tokens // bs) > m.total_blocks:
                continue  # it would wait for blocks (or preempt): eligible only if nobody else is
        if cost < best:
            best, ties = cost, [w]
        elif cost == best:
            ties.append(w)
    guarded = bool(ties)
    if not guarded:
        ties = ties_any
    w = ties[0] if len(ties) == 1 else ties[rng.randrange(len(ties))]
    ov = oget(w, 0)
    p = models[w].predict(states[w], prompt_tokens - int(ov * models[w].block_size))
    return LatencySelection(w, ov, p.ttft_s, p.itl_s, guarded)
