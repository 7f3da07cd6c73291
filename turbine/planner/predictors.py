"""Next-interval load predictors: request rate, prompt and output lengths.

Each sees one value per planner interval and predicts the next:

- ``constant``: the last value (a purely reactive planner).
- ``moving-average``: the mean of the last ``window`` values (smooths noise, lags ramps).
- ``holt-winters``: additive exponential smoothing of level, trend and (with ``season`` > 0)
  a seasonal cycle of that many intervals: follows a ramp instead of lagging it, and once a
  whole cycle has been seen, anticipates the daily peak. Without a full season it is Holt's
  linear trend. Its forecast is never below zero.

Small enough to keep here instead of pulling a statistics library into the planner's process;
the smoothing constants are the usual defaults for interval-level traffic.
"""
from __future__ import annotations

from collections import deque
from typing import Protocol


class Predictor(Protocol):
    def observe(self, value: float) -> None: ...

    def predict(self, steps: int = 1) -> float | None:
        """The value ``steps`` intervals ahead (1: the next); None before any observation."""
        ...


class Constant:
    def __init__(self) -> None:
        self._last: float | None = None

    def observe(self, value: float) -> None:
        self._last = value

    def predict(self, steps: int = 1) -> float | None:
        return self._last


class MovingAverage:
    def __init__(self, window: int = 5) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._values: deque[float] = deque(maxlen=window)

    def observe(self, value: float) -> None:
        self._values.append(value)

    def predict(self, steps: int = 1) -> float | None:
        return sum(self._values) / len(self._values) if self._values else None


class HoltWinters:
    def __init__(self, *, alpha: float = 0.5, beta: float = 0.3, gamma: float = 0.3, season: int = 0) -> None:
        for name, v in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            if not 0 < v <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {v}")
        if season < 0:
            raise ValueError(f"season must be >= 0, got {season}")
        self.alpha, self.beta, self.gamma, self.season = alpha, beta, gamma, season
        self._level: float | None = None
        self._trend = 0.0
        self._seasonal: list[float] = [0.0] * season
        self._n = 0
        self._first_cycle: list[float] = []

    def observe(self, value: float) -> None:
        s = self.season
        if s and self._n < s:  # the first cycle: collect it, then seed level and seasonal offsets
            self._first_cycle.append(value)
            self._n += 1
            if self._n == s:
                mean = sum(self._first_cycle) / s
                self._seasonal = [v - mean for v in self._first_cycle]
                self._level = self._first_cycle[-1] - self._seasonal[-1]
                self._trend = 0.0
            return
        idx = self._n % s if s else 0
        season_v = self._seasonal[idx] if s else 0.0
        if self._level is None:
            self._level = value
        else:
            prev = self._level
            self._level = self.alpha * (value - season_v) + (1 - self.alpha) * (prev + self._trend)
            self._trend = self.beta * (self._level - prev) + (1 - self.beta) * self._trend
        if s:
            self._seasonal[idx] = self.gamma * (value - self._level) + (1 - self.gamma) * season_v
        self._n += 1

    def predict(self, steps: int = 1) -> float | None:
        if self._level is None:
            if self._first_cycle:  # still inside the first cycle: follow it like Holt's trend would
                return self._first_cycle[-1]
            return None
        season_v = self._seasonal[(self._n + steps - 1) % self.season] if self.season else 0.0
        return max(0.0, self._level + steps * self._trend + season_v)


PREDICTORS = ("constant", "moving-average", "holt-winters")


def make_predictor(name: str, *, window: int = 5, season: int = 0) -> Predictor:
    if name == "constant":
        return Constant()
    if name == "moving-average":
        return MovingAverage(window)
    if name == "holt-winters":
        return HoltWinters(season=season)
    raise ValueError(f"unknown predictor {name!r}; choose one of {', '.join(PREDICTORS)}")


__all__ = ["PREDICTORS", "Constant", "HoltWinters", "MovingAverage", "Predictor", "make_predictor"]
