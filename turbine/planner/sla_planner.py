"""The live SLA planner: each interval, from what the frontend observed, how many workers each
pool should have for the next one.

    observe      request rate, ISL, OSL, mean TTFT and ITL, concurrency (Little's law) over the interval
    predict      next interval's rate (predictors.py, the configured one); with a worker start-up
                 time, also the rate when a worker asked for now will serve; the largest of those
                 and the rate just observed is planned for. ISL and OSL: moving averages
    prefix hit   the observed fraction of prompt tokens found cached (smoothed): the model prices
                 only the uncached part of a prompt
    correct      observed / expected latency, where expected is the performance model at the
                 observed concurrency per worker; smoothed, clamped to [0.3, 5]. The SLA targets
                 the replica math uses are divided by it: a fleet slower than modelled gets more
                 workers, a faster one fewer.
    replicas     a decode or aggregated worker: the largest batch whose corrected latency meets
                 the SLA gives its requests/s (steady_state.py), times ``max_utilization`` (the
                 steady-state model has no queueing: headroom keeps queues short). A prefill
                 worker: its service rate 1/s times the utilization rho at which the queue keeps
                 the corrected TTFT target, s / (1 - rho) <= T. replicas = ceil(rate / usable rate).
    bound        min/max per pool, then the GPU budget (pools shrunk in proportion)
    cooldown     up at most every ``scale_up_cooldown_s``, down at most every
                 ``scale_down_cooldown_s`` after any change of that pool, and by at most
                 ``max_scale_down_fraction`` of it at once; a pool shrinks only to the largest
                 size wanted within the last ``scale_down_window_s`` (a stabilization window:
                 one interval of short prompts or high prefix hits does not empty a pool the
                 next burst needs)

Pools: ``agg`` (aggregated workers), or ``prefill`` and ``decode``. Every decision is a
`Decision` (logged as one JSON line, exported as gauges and counters).
"""
from __future__ import annotations

import json
import logging
import math
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from turbine.planner.perf_model import Parallel, PerfModel, Step
from turbine.planner.plan import BATCHES
from turbine.planner.predictors import MovingAverage, make_predictor
from turbine.planner.steady_state import Sla, Workload, agg_point, decode_itl_ms

log = logging.getLogger("turbine.planner")

CORRECTION_BOUNDS = (0.75, 5.0)


@dataclass(frozen=True)
class Observation:
    """What the frontend saw over one interval (means; None when nothing finished)."""

    interval_s: float
    rate: float  # requests/s that started (got a first token or failed) in the interval
    isl: float | None = None
    osl: float | None = None
    ttft_ms: float | None = None
    itl_ms: float | None = None
    concurrency: float | None = None  # mean requests in flight
    prefix_hit: float | None = None  # fraction of the finished requests' prompt tokens found cached


@dataclass(frozen=True)
class PlannerConfig:
    sla: Sla
    mode: str = "agg"  # "agg" or "disagg"
    interval_s: float = 60.0
    predictor: str = "holt-winters"
    predictor_window: int = 5  # moving-average
    season: int = 0  # holt-winters: intervals per cycle (0: trend only)
    agg_layout: Parallel = Parallel()
    prefill_layout: Parallel = Parallel()
    decode_layout: Parallel = Parallel()
    min_workers: int = 1  # per pool
    max_workers: int = 64  # per pool
    gpu_budget: int = 64
    scale_up_cooldown_s: float = 0.0
    scale_down_cooldown_s: float = 180.0
    scale_down_window_s: float = 180.0
    max_scale_down_fraction: float = 0.5
    max_utilization: float = 0.8
    startup_s: float = 0.0  # a new worker serves this long after it is asked for: plan for the load then
    token_budget: int = 8192
    max_batch: int = 256  # the workers' max_num_seqs
    speedup_ratio: float = 1.0  # workers run this much faster than the model's GPU (mock workers)
    correct: bool = True
    correction_smoothing: float = 0.5  # weight of the newest observed/expected ratio

    def __post_init__(self) -> None:
        if self.mode not in ("agg", "disagg"):
            raise ValueError(f"mode must be agg or disagg, got {self.mode!r}")
        if not self.interval_s > 0:
            raise ValueError("the planner interval must be positive")
        if not 1 <= self.min_workers <= self.max_workers:
            raise ValueError(f"need 1 <= min_workers <= max_workers, got {self.min_workers}, {self.max_workers}")
        if self.gpu_budget < self.min_gpus:
            raise ValueError(f"the GPU budget ({self.gpu_budget}) is below what the minimum pools need ({self.min_gpus})")
        if not 0 < self.max_utilization <= 1 or not 0 < self.max_scale_down_fraction <= 1:
            raise ValueError("max_utilization and max_scale_down_fraction must be in (0, 1]")
        if min(self.scale_up_cooldown_s, self.scale_down_cooldown_s, self.scale_down_window_s, self.startup_s) < 0:
            raise ValueError("cooldowns, the scale-down window and startup_s must be >= 0")
        if self.max_batch < 1 or self.token_budget < 1:
            raise ValueError("max_batch and token_budget must be >= 1")
        if not self.speedup_ratio > 0 or not 0 < self.correction_smoothing <= 1:
            raise ValueError("speedup_ratio must be positive, correction_smoothing in (0, 1]")
        make_predictor(self.predictor, window=self.predictor_window, season=self.season)  # validates

    @property
    def pools(self) -> tuple[str, ...]:
        return ("agg",) if self.mode == "agg" else ("prefill", "decode")

    def layout(self, pool: str) -> Parallel:
        return {"agg": self.agg_layout, "prefill": self.prefill_layout, "decode": self.decode_layout}[pool]

    @property
    def horizon(self) -> int:
        """Intervals ahead the rate is predicted for: until the end of the first interval in
        which a worker asked for now serves."""
        return max(1, math.ceil((self.startup_s + self.interval_s) / self.interval_s - 1e-9))

    @property
    def min_gpus(self) -> int:
        return sum(self.min_workers * self.layout(p).gpus for p in self.pools)


@dataclass
class Decision:
    time: float
    observed: dict[str, Any]
    predicted: dict[str, float | None]
    correction: dict[str, float]
    per_worker_rps: dict[str, float]
    needed: dict[str, int]  # by the replica math, before bounds
    current: dict[str, int]
    target: dict[str, int]  # what the connector is asked for
    reasons: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), default=float)


class ReplicaMath:
    """Per-worker capacity within the SLA, from the performance model (see the module docstring)."""

    def __init__(self, model: PerfModel, cfg: PlannerConfig) -> None:
        self.model = model
        self.cfg = cfg
        self.scale = 1.0 / cfg.speedup_ratio

    def _cap(self, par: Parallel, wl: Workload) -> int:
        """The largest batch a worker runs: its max_num_seqs, or fewer when KV runs out."""
        return min(self.cfg.max_batch, self.model.kv_capacity_tokens(par) // max(1, math.ceil(wl.isl + wl.osl)))

    def agg_rps(self, wl: Workload, ttft_ms: float, itl_ms: float) -> float:
        """Requests/s of one aggregated worker at the largest batch meeting both targets."""
        par, best = self.cfg.agg_layout, 0.0
        for b in BATCHES:
            if b > self._cap(par, wl):
                break
            pt = agg_point(self.model, par, wl, b, token_budget=self.cfg.token_budget)
            if pt.itl_ms * self.scale <= itl_ms and pt.ttft_ms * self.scale <= ttft_ms:
                best = max(best, pt.requests_per_s / self.scale)
        return best * self.cfg.max_utilization

    def decode_rps(self, wl: Workload, itl_ms: float) -> float:
        par, best = self.cfg.decode_layout, 0.0
        for b in BATCHES:
            if b > self._cap(par, wl):
                break
            itl = decode_itl_ms(self.model, par, wl, b) * self.scale
            if itl <= itl_ms:
                best = max(best, b / (wl.osl * itl / 1e3))
        return best * self.cfg.max_utilization

    def prefill_rps(self, wl: Workload, ttft_ms: float) -> float:
        """Usable requests/s of one prefill worker (prompts one at a time): its service rate times
        the utilization at which queueing keeps the mean TTFT within target, s / (1 - rho) <= T,
        capped by ``max_utilization``. ``ttft_ms`` is the corrected target."""
        s = self.model.step_ms(Step(prefill_tokens=round(wl.new_prompt_tokens), prefill_seqs=1),
                               self.cfg.prefill_layout) * self.scale
        rho = min(self.cfg.max_utilization, max(0.05, 1 - s / ttft_ms))
        return rho * 1e3 / s

    def expected(self, wl: Workload, concurrency_per_worker: float) -> tuple[float, float]:
        """(TTFT, ITL) in ms the model expects at this concurrency per (decode/agg) worker."""
        b = max(1, round(concurrency_per_worker))
        if self.cfg.mode == "agg":
            pt = agg_point(self.model, self.cfg.agg_layout, wl, b, token_budget=self.cfg.token_budget)
            return pt.ttft_ms * self.scale, pt.itl_ms * self.scale
        itl = decode_itl_ms(self.model, self.cfg.decode_layout, wl, b)
        ttft = self.model.step_ms(Step(prefill_tokens=round(wl.new_prompt_tokens), prefill_seqs=1), self.cfg.prefill_layout)
        return (ttft + itl) * self.scale, itl * self.scale


class SlaPlanner:
    """Decides pool sizes; `decide` is pure given its inputs and the planner's own history."""

    def __init__(self, model: PerfModel, cfg: PlannerConfig) -> None:
        self.cfg = cfg
        self.math = ReplicaMath(model, cfg)
        mk = lambda: make_predictor(cfg.predictor, window=cfg.predictor_window, season=cfg.season)  # noqa: E731
        self.rate_p = mk()
        # lengths are heavy-tailed and do not trend with the load: a trend model would extrapolate
        # their noise into pool sizes, so they are averaged
        self.isl_p, self.osl_p = MovingAverage(cfg.predictor_window), MovingAverage(cfg.predictor_window)
        self.correction = {"ttft": 1.0, "itl": 1.0}
        self._last_up: dict[str, float] = {}
        self._last_change: dict[str, float] = {}
        self._wanted: dict[str, deque[tuple[float, int]]] = {p: deque() for p in cfg.pools}  # (time, size wanted)
        self._isl = self._osl = None  # the last seen lengths, kept through idle intervals
        self._hit = 0.0  # the prefix-cache hit fraction, smoothed

    def _update_corrections(self, obs: Observation, wl: Workload, current: dict[str, int]) -> None:
        if not self.cfg.correct or obs.concurrency is None:
            return
        workers = current.get("agg" if self.cfg.mode == "agg" else "decode", 0)
        if workers <= 0 or obs.concurrency <= 0:
            return
        exp_ttft, exp_itl = self.math.expected(wl, obs.concurrency / workers)
        lo, hi = CORRECTION_BOUNDS
        w = self.cfg.correction_smoothing
        for key, seen, exp in (("ttft", obs.ttft_ms, exp_ttft), ("itl", obs.itl_ms, exp_itl)):
            if seen is not None and exp > 0:
                ratio = min(hi, max(lo, seen / exp))
                self.correction[key] = (1 - w) * self.correction[key] + w * ratio

    def decide(self, obs: Observation, current: dict[str, int], now: float) -> Decision:
        cfg = self.cfg
        self.rate_p.observe(obs.rate)
        if obs.isl is not None and obs.osl is not None:
            self.isl_p.observe(obs.isl)
            self.osl_p.observe(obs.osl)
            self._isl, self._osl = obs.isl, obs.osl
        if obs.prefix_hit is not None:
            self._hit = 0.5 * self._hit + 0.5 * min(0.95, max(0.0, obs.prefix_hit))
        # the next interval, and the one in which a worker started now serves (a rising load)
        # never below the load just seen: a falling prediction shrinks pools only once the load
        # has fallen (a trend extrapolated to zero at the trough would empty them)
        rate = max(obs.rate, self.rate_p.predict() or 0.0, self.rate_p.predict(cfg.horizon) or 0.0)
        isl = self.isl_p.predict() or self._isl
        osl = self.osl_p.predict() or self._osl
        per: dict[str, float] = {}
        needed: dict[str, int] = {}
        reasons: dict[str, str] = {}
        if isl is None or osl is None:  # no request seen yet: keep the minimum
            needed = {p: cfg.min_workers for p in cfg.pools}
            reasons = {p: "no traffic seen yet" for p in cfg.pools}
        else:
            wl = Workload(isl=max(1.0, isl), osl=max(1.0, osl), prefix_hit=self._hit)
            if obs.isl is not None:
                self._update_corrections(obs, Workload(isl=max(1.0, obs.isl), osl=max(1.0, obs.osl or osl),
                                                       prefix_hit=self._hit), current)
            ttft_t = cfg.sla.ttft_ms / self.correction["ttft"]
            itl_t = cfg.sla.itl_ms / self.correction["itl"]
            if cfg.mode == "agg":
                per["agg"] = self.math.agg_rps(wl, ttft_t, itl_t)
            else:
                per["decode"] = self.math.decode_rps(wl, itl_t)
                per["prefill"] = self.math.prefill_rps(wl, ttft_t)
            for p in cfg.pools:
                if per[p] <= 0:
                    needed[p] = cfg.max_workers
                    reasons[p] = "no batch meets the corrected SLA: as many as allowed"
                else:
                    needed[p] = math.ceil(rate / per[p]) if rate > 0 else 0
        target = self._bounded(needed, current, now, reasons)
        return Decision(time=now, observed=asdict(obs), predicted={"rate": rate, "isl": isl, "osl": osl,
                                                                     "prefix_hit": self._hit},
                        correction=dict(self.correction), per_worker_rps=per, needed=needed, current=dict(current),
                        target=target, reasons=reasons)

    def _bounded(self, needed: dict[str, int], current: dict[str, int], now: float, reasons: dict[str, str]) -> dict[str, int]:
        cfg = self.cfg
        want = {p: min(cfg.max_workers, max(cfg.min_workers, needed[p])) for p in cfg.pools}
        gpus = sum(want[p] * cfg.layout(p).gpus for p in cfg.pools)
        if gpus > cfg.gpu_budget:  # shrink every pool in proportion, then give back what rounding freed
            f = cfg.gpu_budget / gpus
            want = {p: max(cfg.min_workers, math.floor(want[p] * f)) for p in cfg.pools}
            for p in sorted(cfg.pools, key=lambda q: needed[q] - want[q], reverse=True):
                spare = cfg.gpu_budget - sum(want[q] * cfg.layout(q).gpus for q in cfg.pools)
                if spare >= cfg.layout(p).gpus and want[p] < min(cfg.max_workers, needed[p]):
                    want[p] += 1
            for p in cfg.pools:
                reasons.setdefault(p, f"capped by the GPU budget ({cfg.gpu_budget})")
        out = {}
        for p in cfg.pools:
            cur = current.get(p, 0)
            w = want[p]
            hist = self._wanted[p]
            hist.append((now, w))
            while hist and hist[0][0] < now - cfg.scale_down_window_s:
                hist.popleft()
            if w > cur and cur >= cfg.min_workers and now - self._last_up.get(p, -math.inf) < cfg.scale_up_cooldown_s:
                w = cur
                reasons.setdefault(p, "scale-up cooldown")
            elif w < cur:
                if now - self._last_change.get(p, -math.inf) < cfg.scale_down_cooldown_s:
                    w = cur
                    reasons.setdefault(p, "scale-down cooldown")
                else:
                    w = max(w, cur - max(1, math.floor(cur * cfg.max_scale_down_fraction)))
                    held = min(cur, max(n for _, n in hist))
                    if held > w:
                        w = held
                        reasons.setdefault(p, f"held at the largest size wanted in the last {cfg.scale_down_window_s:g} s")
            if w > cur:
                self._last_up[p] = now
            if w != cur:
                self._last_change[p] = now
            out[p] = w
        return out


__all__ = ["Decision", "Observation", "PlannerConfig", "ReplicaMath", "SlaPlanner"]
