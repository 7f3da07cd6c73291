"""The live planner's loop: every interval, observe -> decide -> scale; logged and exported.

Each decision is one log line (``planner decision {json}``: the observation, predictions,
corrections, per-worker capacity, replicas needed, current and target) and a set of gauges:

    turbine_planner_observed_requests_per_second      arrival rate of the last interval
    turbine_planner_observed_{isl,osl}_tokens         mean prompt and output length
    turbine_planner_observed_{ttft,itl}_seconds       mean TTFT and ITL
    turbine_planner_observed_concurrent_requests      requests in flight (Little's law)
    turbine_planner_observed_prefix_hit_ratio         cached / prompt tokens
    turbine_planner_predicted_requests_per_second     rate, ISL and OSL for the next interval
    turbine_planner_predicted_{isl,osl}_tokens
    turbine_planner_latency_correction_ratio{kind}    ttft, itl: observed / expected latency (smoothed)
    turbine_planner_workers{pool,kind}                current, needed, target
    turbine_planner_decisions_total{pool,action}   up, down, hold
    turbine_planner_scale_errors_total{pool}
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from turbine.planner.connectors.base import Connector
from turbine.planner.sla_planner import Decision, Observation, SlaPlanner

log = logging.getLogger("turbine.planner")


class ObservationSource(Protocol):
    async def read(self) -> Observation | None: ...


class PlannerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, registry=registry)

        # Observation / prediction field -> its gauge, in base units (the planner thinks in ms)
        self.observed: dict[str, tuple[Gauge, float]] = {
            "rate": (gauge("turbine_planner_observed_requests_per_second",
                           "Requests that started per second over the planner's last interval"), 1.0),
            "isl": (gauge("turbine_planner_observed_isl_tokens", "Mean prompt length over the last interval"), 1.0),
            "osl": (gauge("turbine_planner_observed_osl_tokens", "Mean output length over the last interval"), 1.0),
            "ttft_ms": (gauge("turbine_planner_observed_ttft_seconds", "Mean TTFT over the last interval"), 1e-3),
            "itl_ms": (gauge("turbine_planner_observed_itl_seconds", "Mean ITL over the last interval"), 1e-3),
            "concurrency": (gauge("turbine_planner_observed_concurrent_requests",
                                  "Requests in flight over the last interval (Little's law)"), 1.0),
            "prefix_hit": (gauge("turbine_planner_observed_prefix_hit_ratio",
                                 "Cached over prompt tokens over the last interval"), 1.0),
        }
        self.predicted: dict[str, tuple[Gauge, float]] = {
            "rate": (gauge("turbine_planner_predicted_requests_per_second",
                           "The request rate the planner plans the next interval for"), 1.0),
            "isl": (gauge("turbine_planner_predicted_isl_tokens", "The prompt length planned for"), 1.0),
            "osl": (gauge("turbine_planner_predicted_osl_tokens", "The output length planned for"), 1.0),
        }
        self.correction = Gauge("turbine_planner_latency_correction_ratio",
                                "Observed over expected latency (smoothed)", ["kind"], registry=registry)
        self.workers = Gauge("turbine_planner_workers", "Workers per pool: current, needed by the replica math, "
                             "target after bounds and cooldowns", ["pool", "kind"], registry=registry)
        self.decisions = Counter("turbine_planner_decisions", "Planner decisions per pool", ["pool", "action"],
                                 registry=registry)
        self.errors = Counter("turbine_planner_scale_errors", "Scaling calls that failed", ["pool"], registry=registry)

    def record(self, d: Decision) -> None:
        for values, gauges in ((d.observed, self.observed), (d.predicted, self.predicted)):
            for k, v in values.items():
                if v is not None and k in gauges:
                    g, scale = gauges[k]
                    g.set(v * scale)
        for k, v in d.correction.items():
            self.correction.labels(k).set(v)
        for pool, target in d.target.items():
            cur = d.current.get(pool, 0)
            self.workers.labels(pool, "current").set(cur)
            self.workers.labels(pool, "needed").set(d.needed.get(pool, 0))
            self.workers.labels(pool, "target").set(target)
            self.decisions.labels(pool, "up" if target > cur else "down" if target < cur else "hold").inc()


class PlannerRunner:
    def __init__(self, planner: SlaPlanner, source: ObservationSource, connector: Connector, *,
                 registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.planner = planner
        self.source = source
        self.connector = connector
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=False)
        self.metrics = PlannerMetrics(self.registry)
        self.clock = clock
        self.decisions: list[Decision] = []  # the last few, newest last
        self._task: asyncio.Task[None] | None = None

    async def ensure_minimum(self) -> None:
        """Start the minimum of each pool (a planner takes over an empty or small fleet)."""
        cur = await self.connector.current()
        for pool in self.planner.cfg.pools:
            if cur.get(pool, 0) < self.planner.cfg.min_workers:
                await self.connector.scale(pool, self.planner.cfg.min_workers)

    async def step(self) -> Decision | None:
        obs = await self.source.read()
        if obs is None:
            return None
        current = await self.connector.current()
        d = self.planner.decide(obs, current, self.clock())
        for pool, target in d.target.items():
            if target != current.get(pool, 0):
                try:
                    await self.connector.scale(pool, target)
                except Exception as e:  # noqa: BLE001 - a failed scale is logged and counted; the next interval retries
                    self.metrics.errors.labels(pool).inc()
                    log.error("scaling %s to %d failed: %s", pool, target, e)
        self.metrics.record(d)
        log.info("planner decision %s", d.to_json())
        self.decisions = [*self.decisions[-99:], d]
        return d

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self.ensure_minimum()
        except Exception as e:  # noqa: BLE001 - e.g. the Kubernetes API unreachable at start: decisions retry it
            log.error("could not start the pools' minimum: %s", e)
        with contextlib.suppress(Exception):
            await self.source.read()  # prime the counters
        interval = self.planner.cfg.interval_s
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):  # not wait_for: see runtime/tasks.py
                    await stop.wait()
            if stop.is_set():
                break
            try:
                await self.step()
            except Exception as e:  # noqa: BLE001 - one bad interval (frontend unreachable) never stops the planner
                log.warning("planner interval skipped: %s", e)

    def start(self, stop: asyncio.Event) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(stop), name="turbine-planner")
        return self._task


__all__ = ["ObservationSource", "PlannerMetrics", "PlannerRunner"]
