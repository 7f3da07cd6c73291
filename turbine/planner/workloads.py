"""Workloads the planner reasons about and replays: synthetic requests from length distributions,
and a day-shaped trace built from a real trace's request shapes.

Both produce `TraceRequest`s (Mooncake format: 512-token hash-id blocks), so the simulator and
`turbine bench --trace` replay them like any recorded trace.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from turbine.bench.trace import MOONCAKE_BLOCK_TOKENS, TraceRequest

_UNIQUE_BASE = 1 << 40  # hash ids of unshared blocks start here, clear of any trace's own ids


@dataclass(frozen=True)
class LengthDist:
    """A length distribution: ``mean`` with a coefficient of variation ``cv`` (log-normal; 0: fixed)."""

    mean: float
    cv: float = 0.0

    def __post_init__(self) -> None:
        if not (self.mean >= 1 and self.cv >= 0):
            raise ValueError(f"a length distribution needs mean >= 1 and cv >= 0, got {self.mean}, {self.cv}")

    def sample(self, rng: random.Random) -> int:
        if self.cv == 0:
            return max(1, round(self.mean))
        sigma = math.sqrt(math.log1p(self.cv * self.cv))
        return max(1, round(rng.lognormvariate(math.log(self.mean) - sigma * sigma / 2, sigma)))

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        """'4000' or '4000:0.5' (mean:cv)."""
        mean, _, cv = text.partition(":")
        try:
            return cls(float(mean), float(cv) if cv else 0.0)
        except ValueError as e:
            raise ValueError(f"cannot read a length distribution from {text!r} (e.g. 4000 or 4000:0.5): {e}") from None


def synthetic_requests(n: int, isl: LengthDist, osl: LengthDist, rate: float, *, shared_prefix_tokens: int = 0,
                       seed: int = 0) -> list[TraceRequest]:
    """``n`` requests with Poisson arrivals at ``rate`` per second. Every prompt starts with the
    same ``shared_prefix_tokens`` (whole 512-token blocks: a system prompt); the rest is unique."""
    if n < 1 or not rate > 0:
        raise ValueError(f"need n >= 1 and rate > 0, got {n}, {rate}")
    rng = random.Random(seed)
    shared = shared_prefix_tokens // MOONCAKE_BLOCK_TOKENS
    t, out, next_id = 0.0, [], _UNIQUE_BASE
    for _ in range(n):
        length = isl.sample(rng)
        blocks = -(-length // MOONCAKE_BLOCK_TOKENS)
        own = max(0, blocks - shared)
        ids = tuple(range(min(shared, blocks))) + tuple(range(next_id, next_id + own))
        next_id += own
        out.append(TraceRequest(timestamp_ms=round(t * 1e3, 3), input_length=length, output_length=osl.sample(rng),
                                hash_ids=ids))
        t += rng.expovariate(rate)
    return out


def day_rate(t: float, *, period_s: float, peak: float, swing: float, bursts: Sequence[tuple[float, float, float]] = ()) -> float:
    """Arrival rate at ``t``: a daily cosine from ``peak / swing`` (at 0) to ``peak`` (mid-period),
    times each burst ``(start_s, length_s, factor)`` covering ``t``."""
    trough = peak / swing
    rate = trough + (peak - trough) * (1 - math.cos(2 * math.pi * (t % period_s) / period_s)) / 2
    for start, length, factor in bursts:
        if start <= t < start + length:
            rate *= factor
    return rate


def day_shaped_trace(shapes: Sequence[TraceRequest], *, duration_s: float, peak_rate: float, swing: float = 10.0,
                     bursts: Sequence[tuple[float, float, float]] = (), seed: int = 0,
                     days: int = 1) -> list[TraceRequest]:
    """Arrivals following `day_rate` for ``days`` periods of ``duration_s`` (the bursts recur each
    day), each taking the next request
    shape of ``shapes`` in order (lengths and hash ids, so multi-turn reuse survives); a second pass
    over ``shapes`` gets fresh hash ids, so it never hits the first pass's prefixes."""
    if not shapes:
        raise ValueError("no request shapes")
    if not (duration_s > 0 and peak_rate > 0 and swing >= 1 and days >= 1):
        raise ValueError("duration_s and peak_rate must be positive, swing >= 1, days >= 1")
    bursts = [(start + d * duration_s, length, f) for d in range(days) for start, length, f in bursts]
    rng = random.Random(seed)
    bound = peak_rate * max([1.0] + [f for _, _, f in bursts])
    offset = max(h for r in shapes for h in r.hash_ids) + 1 if any(r.hash_ids for r in shapes) else 1
    out: list[TraceRequest] = []
    t, i = 0.0, 0
    while True:  # thinning: candidates at the bound rate, kept with probability rate / bound
        t += rng.expovariate(bound)
        if t >= duration_s * days:
            break
        if rng.random() * bound > day_rate(t, period_s=duration_s, peak=peak_rate, swing=swing, bursts=bursts):
            continue
        base = shapes[i % len(shapes)]
        lap = i // len(shapes)
        ids = base.hash_ids if lap == 0 else tuple(h + lap * offset for h in base.hash_ids)
        out.append(TraceRequest(timestamp_ms=round(t * 1e3, 3), input_length=base.input_length,
                                output_length=base.output_length, hash_ids=ids))
        i += 1
    return out


__all__ = ["LengthDist", "day_rate", "day_shaped_trace", "synthetic_requests"]
