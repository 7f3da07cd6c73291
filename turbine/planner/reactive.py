"""The baseline a model-based planner must beat: react to what was observed, one worker at a time.

Each interval, per pool: one more worker when the interval's mean TTFT or ITL missed the SLA;
one fewer when both were under ``low_water`` of it (and the pool's last change is older than the
cooldown); otherwise hold. No prediction, no performance model. The same `decide` signature as
`SlaPlanner`, so the runner, the simulator and the benchmarks drive either.
"""
from __future__ import annotations

import math

from turbine.planner.sla_planner import Decision, Observation, PlannerConfig


class ReactivePlanner:
    def __init__(self, cfg: PlannerConfig, *, low_water: float = 0.5) -> None:
        if not 0 < low_water < 1:
            raise ValueError(f"low_water must be in (0, 1), got {low_water}")
        self.cfg = cfg
        self.low_water = low_water
        self._last_change: dict[str, float] = {}

    def decide(self, obs: Observation, current: dict[str, int], now: float) -> Decision:
        cfg, sla = self.cfg, self.cfg.sla
        missed = (obs.ttft_ms is not None and obs.ttft_ms > sla.ttft_ms) or (obs.itl_ms is not None and obs.itl_ms > sla.itl_ms)
        idle = obs.rate == 0 or ((obs.ttft_ms or 0) < self.low_water * sla.ttft_ms
                                 and (obs.itl_ms or 0) < self.low_water * sla.itl_ms)
        target, reasons = {}, {}
        for pool in cfg.pools:
            cur = current.get(pool, 0)
            want = cur
            if cur < cfg.min_workers:
                want, reasons[pool] = cfg.min_workers, "below the minimum"
            elif missed:
                want, reasons[pool] = cur + 1, "SLA missed: +1"
            elif idle and now - self._last_change.get(pool, -math.inf) >= cfg.scale_down_cooldown_s:
                want, reasons[pool] = cur - 1, "well under the SLA: -1"
            want = min(cfg.max_workers, max(cfg.min_workers, want))
            gpus_other = sum(target.get(p, current.get(p, 0)) * cfg.layout(p).gpus for p in cfg.pools if p != pool)
            if gpus_other + want * cfg.layout(pool).gpus > cfg.gpu_budget:
                want = cur
            if want != cur:
                self._last_change[pool] = now
            target[pool] = want
        return Decision(time=now, observed=dict(vars(obs)), predicted={"rate": obs.rate, "isl": obs.isl, "osl": obs.osl},
                        correction={}, per_worker_rps={}, needed=dict(target), current=dict(current), target=target,
                        reasons=reasons)


__all__ = ["ReactivePlanner"]
