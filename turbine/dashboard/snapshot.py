"""Builds the dashboard's views from the frontend's own state (registry, routers, counters).

    Snapshots.workers()     every worker: role, host, health, its last load report, the router's view
    Snapshots.decisions()   the routers' decision logs, all or since the last call (per log)
    Snapshots.planner()     the planner's decisions, one action per pool, all or the new ones
    Sampler.sample(dt)      one history point: rates, TTFT/ITL of the interval, fleet totals

Everything here reads; nothing changes serving state. It runs on the frontend's event loop (the
routers and registry are that loop's), once a second and once per connecting page.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from turbine.dashboard.history import Rate, Window, read_counter, read_histogram
from turbine.dashboard.views import (
    AlternativeView,
    DecisionView,
    DisaggView,
    HistoryPoint,
    ModelView,
    PlannerAction,
    TierView,
    WorkerView,
)
from turbine.router.decision_log import DecisionLog
from turbine.router.load_tracker import DEFAULT_STALE_S

if TYPE_CHECKING:
    from turbine.frontend.model_registry import ServedModel
    from turbine.frontend.service import Frontend
    from turbine.router.router import Router


def host_of(address: str) -> str:
    scheme, _, rest = address.partition("://")
    if scheme == "inproc":
        return "in-process"
    host, sep, _ = rest.rpartition(":")
    return (host if sep else rest).strip("[]") or address


def _ms(s: float | None) -> float | None:
    return None if s is None else s * 1e3


class Snapshots:
    def __init__(self, frontend: Frontend, *, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.frontend = frontend
        self.clock = clock
        self.wall_clock = wall_clock
        self.planner: Any = None  # a PlannerRunner reporting here (serve --planner), if any
        self._sent: dict[int, int] = {}  # id(decision log) -> its seq at the last delta
        self._planner_sent = -float("inf")  # the planner clock of the newest decision sent

    # --- the fleet ---------------------------------------------------------------------------------
    def models(self) -> list[ModelView]:
        return [ModelView(name=m.name, policy=m.router.policy_name, block_size=m.card.block_size,
                          workers=len(m.workers), queued=len(m.queue),
                          decisions=m.router.decisions + m.prefill_router.decisions)
                for m in self.frontend.registry.models.values()]

    def workers(self) -> list[WorkerView]:
        registry = self.frontend.registry
        now = self.clock()
        out = []
        for m in registry.models.values():
            for wid, inst in m.workers.items():
                out.append(self._worker(m, wid, inst, registry.suspect_s(wid, now), now))
        out.sort(key=lambda w: (w.host, w.model, w.role, w.id))
        return out

    def _worker(self, m: ServedModel, wid: str, inst: Any, suspect_s: float, now: float) -> WorkerView:
        card = inst.model_card
        rep = m.reports.get(wid)
        est = m.router_for(inst).loads.workers.get(wid)
        age = None if rep is None else max(0.0, now - rep.at)
        state = ("suspect" if suspect_s > 0 else "new" if age is None
                 else "silent" if age > DEFAULT_STALE_S else "ok")
        kw: dict[str, Any] = {}
        if rep is not None:
            ld = rep.load
            kw = dict(running=ld.num_running, waiting=ld.num_waiting, prefill_tokens=ld.prefill_tokens,
                      kv_active_blocks=ld.kv_active_blocks, kv_total_blocks=ld.kv_total_blocks,
                      tiers=[TierView(tier=t.tier, blocks=t.blocks, capacity_blocks=t.capacity_blocks,
                                      hit_blocks=t.hit_blocks, onboarded_bytes=t.onboarded_bytes,
                                      offloaded_bytes=t.offloaded_bytes) for t in ld.tiers])
        elif card is not None:
            kw = dict(kv_total_blocks=card.total_kv_blocks)
        if est is not None:
            kw.update(router_active=est.active_requests, router_queued=est.queued,
                      router_prefill_tokens=est.prefill_tokens, router_foreign=est.foreign_requests)
        return WorkerView(id=wid, model=m.name, role=card.role if card is not None else "aggregated",
                          engine=card.engine if card is not None else "", host=host_of(inst.address),
                          pid=inst.metadata.get("pid"), state=state, suspect_s=round(suspect_s, 2),
                          report_age_s=None if age is None else round(age, 2), **kw)

    # --- routing decisions -------------------------------------------------------------------------
    def routers(self) -> Iterator[tuple[ServedModel, str, Router]]:
        for m in self.frontend.registry.models.values():
            yield m, "generate", m.router
            yield m, "prefill", m.prefill_router

    def logs(self) -> Iterator[tuple[str, str, DecisionLog]]:
        for m, pool, r in self.routers():
            if r.decision_log is not None:
                yield m.name, pool, r.decision_log

    def decisions(self, delta: bool) -> list[DecisionView]:
        """Every logged decision (``delta=False``: a page's first event), or those recorded or
        completed since the previous delta; oldest first."""
        out = []
        for model, pool, log in self.logs():
            since = self._sent.get(id(log), 0) if delta else 0
            if delta:
                self._sent[id(log)] = log.seq
            out += [self._decision(model, pool, d) for d in log.since(since)]
        out.sort(key=lambda d: d.at)
        return out

    @staticmethod
    def _decision(model: str, pool: str, d: Any) -> DecisionView:
        alts = None if d.alternatives is None else [
            AlternativeView(worker=a.worker_id, overlap_blocks=round(a.overlap_blocks, 2), cost=a.cost,
                            ttft_ms=_ms(a.ttft_s), itl_ms=_ms(a.itl_s)) for a in d.alternatives]
        return DecisionView(key=f"{model}/{pool}/{d.request_id}", request_id=d.request_id, model=model, pool=pool,
                            at=d.at, worker=d.worker_id, policy=d.policy, prompt_tokens=d.prompt_tokens,
                            overlap_blocks=d.overlap_blocks, actual_cached_blocks=d.actual_cached_blocks,
                            predicted_ttft_ms=_ms(d.predicted_ttft_s), actual_ttft_ms=_ms(d.actual_ttft_s),
                            remote_kv=d.remote_kv, alternatives=alts)

    # --- disaggregation and the planner ------------------------------------------------------------
    def disagg(self) -> DisaggView:
        s = self.frontend.generation.prefill.stats
        return DisaggView(decisions=dict(s.decisions), prefill_failures=s.prefill_failures,
                          transfer_errors=s.transfer_errors, pulled_blocks=s.pulled_blocks, releases=s.releases)

    def planner_actions(self, delta: bool) -> list[PlannerAction]:
        runner = self.planner
        if runner is None:
            return []
        since = self._planner_sent if delta else -float("inf")
        fresh = [d for d in list(runner.decisions) if d.time > since]
        if delta and fresh:
            self._planner_sent = fresh[-1].time
        offset = self.wall_clock() - runner.clock()  # the planner's clock to wall-clock time
        out = []
        for d in fresh:
            obs, pred, corr = d.observed, d.predicted, d.correction
            for pool, target in d.target.items():
                cur = d.current.get(pool, 0)
                out.append(PlannerAction(
                    key=f"{pool}@{d.time:.3f}", at=d.time + offset, pool=pool,
                    action="up" if target > cur else "down" if target < cur else "hold",
                    current=cur, needed=d.needed.get(pool, 0), target=target, reason=d.reasons.get(pool, ""),
                    rate=obs.get("rate"), predicted_rate=pred.get("rate"), ttft_ms=obs.get("ttft_ms"),
                    itl_ms=obs.get("itl_ms"), correction_ttft=corr.get("ttft"), correction_itl=corr.get("itl")))
        return out


class Sampler:
    """One history point per call, from the frontend's counters, histograms and load reports."""

    def __init__(self, frontend: Frontend, *, wall_clock: Callable[[], float] = time.time) -> None:
        self.frontend = frontend
        self.wall_clock = wall_clock
        self._rates = {k: Rate() for k in ("requests", "errors", "output", "prompt", "cached", "remote", "local",
                                           "pulled", "onboard", "offload")}
        self._ttft = Window()
        self._itl = Window()

    def sample(self, dt: float) -> HistoryPoint:
        fe = self.frontend
        mx = fe.metrics
        r = self._rates
        e2e = read_histogram(mx.e2e)
        errors = read_counter(mx.requests, where=lambda labels: labels.get("status", "")[:1] in ("4", "5"))
        ttft = self._ttft.step(read_histogram(mx.ttft))
        itl = self._itl.step(read_histogram(mx.itl))
        workers = running = waiting = active = total = 0
        onboard = offload = 0
        for m in fe.registry.models.values():
            workers += len(m.workers)
            for rep in m.reports.values():
                ld = rep.load
                running += ld.num_running
                waiting += ld.num_waiting
                active += ld.kv_active_blocks
                total += ld.kv_total_blocks
                for t in ld.tiers:
                    onboard += t.onboarded_bytes
                    offload += t.offloaded_bytes
        ds = fe.generation.prefill.stats
        remote = ds.decisions.get("remote", 0)
        local = sum(ds.decisions.values()) - remote
        return HistoryPoint(
            t=round(self.wall_clock(), 3), requests_ps=r["requests"].step(e2e.count, dt),
            errors_ps=r["errors"].step(errors, dt), output_tps=r["output"].step(read_counter(mx.output_tokens), dt),
            prompt_tps=r["prompt"].step(read_counter(mx.prompt_tokens), dt),
            cached_tps=r["cached"].step(read_counter(mx.cached_tokens), dt),
            ttft_ms_mean=_ms(ttft.mean), ttft_ms_p50=_ms(ttft.quantile(0.5)), ttft_ms_p90=_ms(ttft.quantile(0.9)),
            itl_ms_mean=_ms(itl.mean), itl_ms_p50=_ms(itl.quantile(0.5)), itl_ms_p90=_ms(itl.quantile(0.9)),
            inflight=fe.api.inflight, workers=workers, running=running, waiting=waiting,
            kv_used=active / total if total else None,
            disagg_remote_ps=r["remote"].step(remote, dt), disagg_local_ps=r["local"].step(local, dt),
            pulled_blocks_ps=r["pulled"].step(ds.pulled_blocks, dt), onboard_bps=r["onboard"].step(onboard, dt),
            offload_bps=r["offload"].step(offload, dt))


__all__ = ["Sampler", "Snapshots", "host_of"]
