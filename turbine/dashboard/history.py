"""The last minutes at one-second resolution: a bounded ring, and per-interval rates and latency
distributions differenced from the frontend's own cumulative counters and histograms.

    Ring(capacity)              the newest ``capacity`` points; the oldest drop off
    Rate.step(total, dt)        per-second rate since the previous total (a total that went down,
                                e.g. a worker that left took its share, counts as a restart: 0)
    Window.step(buckets)        a cumulative histogram's buckets since the previous call: mean and
                                quantiles of the interval, interpolated within buckets as
                                Prometheus' histogram_quantile does

The counters are read through prometheus_client's collectors (``read_counter``,
``read_histogram``): structured samples from the registry the frontend already keeps, never
the text exposition, and the serving path pays nothing.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, NamedTuple, TypeVar

T = TypeVar("T")


class Ring(Generic[T]):
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a ring holds at least one item, got {capacity}")
        self._items: deque[T] = deque(maxlen=capacity)

    @property
    def capacity(self) -> int:
        return self._items.maxlen or 0

    def append(self, item: T) -> None:
        self._items.append(item)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)

    def last(self) -> T | None:
        return self._items[-1] if self._items else None


class Rate:
    """Per-second rate of a cumulative total between calls."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: float | None = None

    def step(self, total: float, dt: float) -> float:
        last, self._last = self._last, total
        if last is None or dt <= 0 or total < last:
            return 0.0
        return (total - last) / dt


class Histogram(NamedTuple):
    """A cumulative histogram: upper bounds (the last is +Inf), cumulative counts, sum."""

    bounds: tuple[float, ...]
    cumulative: tuple[float, ...]
    total: float

    @property
    def count(self) -> float:
        return self.cumulative[-1] if self.cumulative else 0.0


class Interval(NamedTuple):
    """One interval's observations: per-bucket counts (not cumulative), their count and sum."""

    bounds: tuple[float, ...]
    counts: tuple[float, ...]
    count: float
    total: float

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count > 0 else None

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile, linear within its bucket; the +Inf bucket answers its lower bound."""
        if self.count <= 0:
            return None
        rank = q * self.count
        seen = 0.0
        lower = 0.0
        for bound, n in zip(self.bounds, self.counts, strict=True):
            if n > 0 and seen + n >= rank:
                if math.isinf(bound):
                    return lower
                return lower + (bound - lower) * max(0.0, rank - seen) / n
            seen += n
            if not math.isinf(bound):
                lower = bound
        return lower


class Window:
    """Differences successive readings of one cumulative histogram into intervals."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: Histogram | None = None

    def step(self, h: Histogram) -> Interval:
        last, self._last = self._last, h
        if last is None or not h.bounds or last.bounds != h.bounds or h.count < last.count:
            return Interval(h.bounds, (0.0,) * len(h.bounds), 0.0, 0.0)
        d = [max(0.0, now - before) for now, before in zip(h.cumulative, last.cumulative, strict=True)]
        counts = (d[0], *(max(0.0, b - a) for a, b in zip(d, d[1:])))
        return Interval(h.bounds, counts, d[-1], max(0.0, h.total - last.total))


def _samples(metric: Any) -> Iterable[Any]:
    for family in metric.collect():
        yield from family.samples


def read_counter(metric: Any, where: Callable[[dict[str, str]], bool] | None = None) -> float:
    """The sum of a counter's ``_total`` samples (every label set, or those ``where`` accepts)."""
    total = 0.0
    for s in _samples(metric):
        if s.name.endswith("_total") and (where is None or where(s.labels)):
            total += s.value
    return total


def read_histogram(metric: Any) -> Histogram:
    """A histogram's buckets summed over its label sets (every model's, which share bounds)."""
    buckets: dict[float, float] = {}
    total = 0.0
    for s in _samples(metric):
        if s.name.endswith("_bucket"):
            le = float(s.labels["le"])
            buckets[le] = buckets.get(le, 0.0) + s.value
        elif s.name.endswith("_sum"):
            total += s.value
    bounds = tuple(sorted(buckets))
    return Histogram(bounds, tuple(buckets[b] for b in bounds), total)


__all__ = ["Histogram", "Interval", "Rate", "Ring", "Window", "read_counter", "read_histogram"]
