"""The planner in the loop of the fleet simulator: a trace replayed while a policy resizes the
fleet every interval through the virtual connector. What it answers: how many requests met the
SLA and how many GPU-hours that took, for the SLA planner, the reactive baseline, or a static
fleet (no policy), on the same requests.

Each interval the policy sees what a frontend would have measured (`SimObserver`, the same
quantities `observe.py` reads from /metrics): the arrival rate; ISL, OSL, mean TTFT and mean ITL
(per token) of the requests that ended in the interval; concurrency by Little's law.
"""
from __future__ import annotations

import bisect
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from turbine.bench.report import mean_itl_s
from turbine.bench.stats import RequestResult, percentile
from turbine.bench.trace import TraceRequest
from turbine.planner.connectors.virtual import VirtualConnector
from turbine.planner.plan import within_sla
from turbine.planner.sla_planner import Decision, Observation
from turbine.planner.steady_state import Sla
from turbine.sim.simulator import SimConfig, Simulator


class Policy(Protocol):
    def decide(self, obs: Observation, current: dict[str, int], now: float) -> Decision: ...


class SimObserver:
    """Collects every request's end; `read` gives the interval before ``now`` as an Observation."""

    def __init__(self, arrivals_s: Sequence[float] = ()) -> None:
        self.arrivals = list(arrivals_s)  # sorted (the simulator replays in trace order)
        self._ended: list[tuple[float, RequestResult]] = []
        self._read_to = 0  # ends before this index were read

    def on_complete(self, r: RequestResult, t: float) -> None:
        self._ended.append((t, r))

    def read(self, start: float, now: float) -> Observation:
        dt = max(1e-9, now - start)
        arrived = bisect.bisect_left(self.arrivals, now) - bisect.bisect_left(self.arrivals, start)
        ended = [r for _, r in self._ended[self._read_to:]]
        self._read_to = len(self._ended)
        ok = [r for r in ended if r.ok]
        if not ok:
            return Observation(interval_s=dt, rate=arrived / dt)
        ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
        gaps = sum(len(r.itl_s) for r in ok)
        return Observation(
            interval_s=dt, rate=arrived / dt,
            isl=statistics.fmean(r.prompt_tokens for r in ok), osl=statistics.fmean(r.output_tokens for r in ok),
            ttft_ms=statistics.fmean(ttfts) * 1e3 if ttfts else None,
            itl_ms=sum(sum(r.itl_s) for r in ok) / gaps * 1e3 if gaps else None,
            concurrency=sum(r.e2e_s or 0.0 for r in ok) / dt,
            prefix_hit=sum(r.cached_tokens or 0 for r in ok) / prompt if (prompt := sum(r.prompt_tokens for r in ok)) else None,
        )


@dataclass
class Tick:
    """One interval: what the policy saw, what the fleet was, what it asked for."""

    t: float
    rate: float
    ttft_ms: float | None
    itl_ms: float | None
    current: dict[str, int]
    target: dict[str, int]


@dataclass
class ClosedLoopResult:
    label: str
    results: list[RequestResult]
    duration_s: float
    gpu_seconds: float
    attainment: float  # fraction of all requests within the SLA
    ticks: list[Tick] = field(default_factory=list)
    peak_workers: dict[str, int] = field(default_factory=dict)
    sim_wall_s: float = 0.0

    @property
    def gpu_hours(self) -> float:
        return self.gpu_seconds / 3600

    def row(self, sla: Sla) -> dict[str, Any]:
        ok = [r for r in self.results if r.ok]
        ttft = [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]
        itl = [v * 1e3 for r in ok if (v := mean_itl_s(r)) is not None]
        changes = sum(1 for k in self.ticks if k.target != k.current)
        return {"policy": self.label, "requests": len(self.results), "errors": len(self.results) - len(ok),
                "within_sla_pct": round(100 * self.attainment, 2), "ttft_p50_ms": round(percentile(ttft, 50), 1),
                "ttft_p99_ms": round(percentile(ttft, 99), 1), "itl_p50_ms": round(percentile(itl, 50), 2),
                "itl_p99_ms": round(percentile(itl, 99), 2), "gpu_hours": round(self.gpu_hours, 3),
                "peak_workers": dict(self.peak_workers), "scale_decisions": changes,
                "sim_wall_s": round(self.sim_wall_s, 2), "sla": f"TTFT<={sla.ttft_ms:g}ms ITL<={sla.itl_ms:g}ms"}


def run_closed_loop(requests: Sequence[TraceRequest], cfg: SimConfig, sla: Sla, *, policy: Policy | None = None,
                    interval_s: float = 60.0, startup_s: float = 30.0, gpus_per_worker: dict[str, int] | None = None,
                    label: str = "", score_from_s: float = 0.0) -> ClosedLoopResult:
    """Replay ``requests`` on the fleet of ``cfg`` (its initial size); with a ``policy``, it
    decides every ``interval_s`` and the virtual connector applies the decision. Requests that
    arrive from ``score_from_s`` on, and GPU time from then, are scored (earlier ones warm the
    policy up: a second day scored after a first)."""
    if interval_s <= 0:
        raise ValueError(f"interval_s must be positive, got {interval_s}")
    observer = SimObserver()
    sim = Simulator(requests, cfg, on_complete=observer.on_complete)
    observer.arrivals = sim.arrivals
    conn = VirtualConnector(sim, gpus_per_worker=gpus_per_worker, startup_s=startup_s)
    ticks: list[Tick] = []

    def tick(t: float) -> None:
        obs = observer.read(t - interval_s, t)
        current = conn.current_now()
        target = dict(current)
        if policy is not None:
            target = policy.decide(obs, current, t).target
            for pool, n in target.items():
                if n != current.get(pool, 0):
                    conn.scale_now(pool, n)
        ticks.append(Tick(t, obs.rate, obs.ttft_ms, obs.itl_ms, current, dict(target)))
        sim.at(t + interval_s, tick)

    sim.at(interval_s, tick)
    before: list[float] = []
    if score_from_s > 0:
        sim.at(score_from_s, lambda t: before.append(conn.gpu_seconds(t)))
    res = sim.run()
    scored = [r for r, t in zip(res.results, res.arrivals_s) if t >= score_from_s]
    if not scored:
        raise ValueError(f"no request arrives after score_from_s={score_from_s}")
    return ClosedLoopResult(
        label=label or ("static" if policy is None else type(policy).__name__), results=scored,
        duration_s=res.duration_s - score_from_s, gpu_seconds=conn.gpu_seconds(res.duration_s) - sum(before),
        attainment=sum(1 for r in scored if within_sla(r, sla)) / len(scored),
        ticks=(kept := [k for k in ticks if k.t > score_from_s]),
        peak_workers={p: max([n, *(max(k.current[p], k.target[p]) for k in kept)]) for p, n in conn.current_now().items()},
        sim_wall_s=res.stats.wall_s)


__all__ = ["ClosedLoopResult", "SimObserver", "Tick", "run_closed_loop"]
