"""`turbine plan`: what to deploy for a workload and an SLA, checked in the fleet simulator.

    sweep      every layout (TP/PP/EP within a worker's GPU limit, when the weights fit) x every
               batch size, aggregated and disaggregated (prefill layout x prompts per step x
               decode layout x batch x P:D counts within the GPU budget), scored by the
               steady-state model (steady_state.py)
    frontier   the Pareto front of tokens/s/GPU against tokens/s/user, of points meeting the SLA
    size       each SLA-meeting point as a deployment: enough workers for the rate asked, or as
               many as the budget allows
    confirm    the best deployments replayed through `turbine.sim` with the real request-length
               and prefix distribution, Poisson or recorded arrivals, queueing and prefix caching;
               the first one whose simulated percentiles meet the SLA is the recommendation.
               Each reports predicted against simulated TTFT/ITL, and the highest rate the
               simulator says it holds within the SLA (bisection).

The static model has no queueing, so it overrates any deployment run near its capacity: that is
why the simulator has the last word.
"""
from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from turbine.bench.report import mean_itl_s
from turbine.bench.stats import RequestResult, percentile
from turbine.bench.trace import TraceRequest
from turbine.mocker.core import MockerConfig
from turbine.planner.perf_model import Parallel, PerfModel
from turbine.planner.steady_state import (
    Point, Sla, Workload, agg_point, decode_itl_ms, disagg_point, pareto_front, prefill_rate,
)
from turbine.sim.simulator import SimConfig, simulate

BATCHES = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)
PREFILL_BATCHES = (1, 2, 4, 8)
SIM_BLOCK_SIZE = 64


@dataclass(frozen=True)
class PlanInputs:
    model: PerfModel
    sla: Sla
    workload: Workload
    gpu_budget: int
    rate: float | None = None  # req/s to serve; None: as much as the budget allows
    percentile: float = 90.0  # the SLA holds at this percentile of requests (simulated)
    max_gpus_per_worker: int = 8
    token_budget: int = 8192  # max_num_batched_tokens
    transfer_gbps: float = 25.0  # prefill -> decode KV link
    modes: tuple[str, ...] = ("agg", "disagg")
    memory_utilization: float = 0.9

    def __post_init__(self) -> None:
        if self.gpu_budget < 1:
            raise ValueError(f"the GPU budget must be >= 1, got {self.gpu_budget}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"the rate must be positive, got {self.rate}")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if not set(self.modes) <= {"agg", "disagg"} or not self.modes:
            raise ValueError(f"modes must be agg and/or disagg, got {self.modes}")


def layouts(model: PerfModel, max_gpus: int, min_tokens: int) -> list[Parallel]:
    """Every layout of at most ``max_gpus`` GPUs whose KV holds ``min_tokens``. Pipeline stages
    only where tensor parallelism alone cannot hold the model within a node; expert parallelism
    only for MoE shapes."""
    out = []
    node = model.gpu.gpus_per_node
    powers = [1 << i for i in range(max_gpus.bit_length()) if 1 << i <= max_gpus]
    for tp in powers:
        eps = [e for e in powers if e >= tp and e % tp == 0] if model.shape.is_moe else [1]
        for ep in eps:
            for pp in powers:
                par = Parallel(tp=tp, pp=pp, ep=ep)
                if par.gpus > max_gpus or not model.fits(par, min_tokens):
                    continue
                if pp > 1 and any(model.fits(Parallel(tp=t, ep=ep), min_tokens) for t in powers
                                  if t * max(1, ep // t) <= min(node, max_gpus) and (ep == 1 or ep % t == 0)):
                    continue  # a single-stage layout within a node holds it: PP would only add latency
                out.append(par)
    return out


def sweep(inp: PlanInputs) -> list[Point]:
    """Every configuration x batch size the budget allows, scored by the steady-state model."""
    wl, m = inp.workload, inp.model
    per_request = math.ceil(wl.isl + wl.osl)
    pars = layouts(m, min(inp.max_gpus_per_worker, inp.gpu_budget), per_request)
    points: list[Point] = []
    itl_cache: dict[tuple[Parallel, int], float] = {}
    for par in pars:
        cap = m.kv_capacity_tokens(par, inp.memory_utilization)
        for b in BATCHES:
            if b * per_request > cap:
                break
            if "agg" in inp.modes:
                points.append(agg_point(m, par, wl, b, token_budget=inp.token_budget))
            itl_cache[(par, b)] = decode_itl_ms(m, par, wl, b)
    if "disagg" not in inp.modes:
        return points
    for pre in pars:
        for k in PREFILL_BATCHES:
            if k * wl.new_prompt_tokens > max(inp.token_budget, wl.new_prompt_tokens):
                break
            for (dec, b), itl in itl_cache.items():
                pr = prefill_rate(m, pre, wl, k, decode_step_ms=itl, transfer_gbps=inp.transfer_gbps)
                dec_rate = b / (wl.osl * itl / 1e3)
                ratio = dec_rate / pr.requests_per_s  # prefill workers per decode worker
                for y in range(1, inp.gpu_budget // dec.gpus + 1):
                    for x in sorted({max(1, math.floor(y * ratio)), max(1, math.ceil(y * ratio))}):
                        if x * pre.gpus + y * dec.gpus <= inp.gpu_budget:
                            points.append(disagg_point(m, pr, dec, wl, b, itl, x, y))
    return points


@dataclass(frozen=True)
class Deployment:
    """A point grown to a whole deployment."""

    point: Point
    workers: int  # aggregated workers, or decode workers
    prefill_workers: int = 0

    @property
    def gpus(self) -> int:
        pre = self.prefill_workers * self.point.prefill.gpus if self.point.prefill is not None else 0
        return pre + self.workers * self.point.decode.gpus

    @property
    def capacity_rps(self) -> float:
        """Requests per second it sustains by the steady-state model."""
        p = self.point
        if p.mode == "agg":
            return self.workers * p.decode_rps
        return min(self.workers * p.decode_rps, self.prefill_workers * p.prefill_rps)

    @property
    def label(self) -> str:
        p = self.point
        if p.mode == "agg":
            return f"agg {self.workers} x {p.decode.label} (batch {p.batch}) = {self.gpus} GPUs"
        assert p.prefill is not None
        return (f"disagg {self.prefill_workers} x {p.prefill.label} prefill (k {p.prefill_batch}) + "
                f"{self.workers} x {p.decode.label} decode (batch {p.batch}) = {self.gpus} GPUs")


def size(point: Point, inp: PlanInputs) -> Deployment | None:
    """The deployment built of ``point``'s workers: the fewest that serve ``inp.rate``, or (no
    rate) the unit repeated as often as the budget allows. None if over budget."""
    if point.mode == "agg":
        n = math.ceil(inp.rate / point.decode_rps) if inp.rate else inp.gpu_budget // point.gpus
        dep = Deployment(point, workers=max(1, n))
    else:
        if inp.rate:
            dep = Deployment(point, workers=max(1, math.ceil(inp.rate / point.decode_rps)),
                             prefill_workers=max(1, math.ceil(inp.rate / point.prefill_rps)))
        else:
            units = inp.gpu_budget // point.gpus
            dep = Deployment(point, workers=point.decode_workers * max(1, units),
                             prefill_workers=point.prefill_workers * max(1, units))
    return dep if dep.gpus <= inp.gpu_budget else None


def rank(inp: PlanInputs, points: Sequence[Point]) -> list[Deployment]:
    """SLA-meeting deployments, best first: fewest GPUs for the rate asked (then fastest for the
    user), or the most requests/s from the budget (then fastest for the user)."""
    deps = [d for p in points if inp.sla.met(p.ttft_ms, p.itl_ms) and (d := size(p, inp)) is not None]
    if inp.rate:
        deps.sort(key=lambda d: (d.gpus, -d.point.tokens_per_s_user))
    else:
        deps.sort(key=lambda d: (-round(d.capacity_rps, 6), -d.point.tokens_per_s_user))
    seen, out = set(), []
    for d in deps:  # one deployment per distinct shape
        key = (d.label,)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


# -- the simulator's check ------------------------------------------------------------------------
@dataclass
class SimCheck:
    rate: float
    ttft_ms: float | None  # at the SLA's percentile
    itl_ms: float | None  # per-request mean ITL, at the SLA's percentile
    attainment: float  # fraction of requests meeting both targets
    errors: int
    ttft_p50_ms: float | None = None
    itl_p50_ms: float | None = None

    def meets(self, sla: Sla) -> bool:
        return (self.errors == 0 and self.ttft_ms is not None and self.ttft_ms <= sla.ttft_ms
                and (self.itl_ms is None or self.itl_ms <= sla.itl_ms))


RequestSource = Callable[[float], Sequence[TraceRequest]]  # rate -> requests arriving at that rate


def within_sla(r: RequestResult, sla: Sla) -> bool:
    """A request met the SLA: it succeeded, its TTFT and its mean inter-token latency in target."""
    if not r.ok or r.ttft_s is None or r.ttft_s * 1e3 > sla.ttft_ms:
        return False
    itl = mean_itl_s(r)
    return itl is None or itl * 1e3 <= sla.itl_ms


class Simulated:
    """Runs deployments through `turbine.sim`, each worker priced by the perf model's profile for
    its layout (written once per layout into ``profile_dir``)."""

    def __init__(self, inp: PlanInputs, source: RequestSource, *, profile_dir: str | Path | None = None,
                 block_size: int = SIM_BLOCK_SIZE, seed: int = 0) -> None:
        self.inp = inp
        self.source = source
        self._tmp = None
        if profile_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="turbine-plan-")
            profile_dir = self._tmp.name
        self.profile_dir = Path(profile_dir)
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        self.block_size = block_size
        self.seed = seed

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

    def profile_path(self, par: Parallel) -> Path:
        path = self.profile_dir / f"{self.inp.model.shape.name}_{self.inp.model.gpu.name}_{par.label}.json"
        if not path.exists():
            path.write_bytes(msgspec.json.encode(self.inp.model.profile_for(par)))
        return path

    def mocker(self, par: Parallel, batch: int, context: int) -> MockerConfig:
        m = self.inp.model
        blocks = m.kv_capacity_tokens(par, self.inp.memory_utilization) // self.block_size
        return MockerConfig(block_size=self.block_size, num_gpu_blocks=max(1, blocks), max_num_seqs=batch,
                            max_num_batched_tokens=self.inp.token_budget, context_length=max(2, context),
                            profile=str(self.profile_path(par)), kv_bytes_per_token=int(m.shape.kv_bytes_per_token),
                            transfer_bandwidth_gbps=self.inp.transfer_gbps)

    def sim_config(self, dep: Deployment, requests: Sequence[TraceRequest]) -> SimConfig:
        p = dep.point
        ctx = max(r.input_length + r.output_length for r in requests)
        mocker = self.mocker(p.decode, p.batch, ctx)
        if p.mode == "agg":
            return SimConfig(workers=dep.workers, mocker=mocker, seed=self.seed)
        assert p.prefill is not None
        prefill = self.mocker(p.prefill, max(1, p.prefill_batch), ctx)
        return SimConfig(prefill_workers=dep.prefill_workers, decode_workers=dep.workers, mocker=mocker,
                         prefill_mocker=prefill, seed=self.seed)

    def check(self, dep: Deployment, rate: float) -> SimCheck:
        requests = list(self.source(rate))
        res = simulate(requests, self.sim_config(dep, requests))
        ok = [r for r in res.results if r.ok]
        ttfts = [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]
        itls = [v * 1e3 for r in ok if (v := mean_itl_s(r)) is not None]
        sla = self.inp.sla
        good = sum(1 for r in ok if within_sla(r, sla))
        q = self.inp.percentile
        return SimCheck(rate=rate, ttft_ms=percentile(ttfts, q), itl_ms=percentile(itls, q),
                        attainment=good / len(res.results), errors=len(res.results) - len(ok),
                        ttft_p50_ms=percentile(ttfts, 50), itl_p50_ms=percentile(itls, 50))

    def max_rate(self, dep: Deployment, *, first: SimCheck | None = None, iterations: int = 4) -> tuple[float, SimCheck | None]:
        """The highest rate (req/s) at which the simulated deployment meets the SLA: bisection
        between a rate it meets and one it misses, starting from its steady-state capacity
        (``first``: that check, when already run)."""
        lo, hi = 0.0, dep.capacity_rps
        best: SimCheck | None = None
        for _ in range(3):  # find a rate it misses
            c = first if first is not None and first.rate == hi else self.check(dep, hi)
            if not c.meets(self.inp.sla):
                break
            lo, best, hi = hi, c, hi * 1.5
        else:
            return lo, best
        for _ in range(iterations):
            mid = (lo + hi) / 2 if lo > 0 else hi / 2
            c = self.check(dep, mid)
            if c.meets(self.inp.sla):
                lo, best = mid, c
            else:
                hi = mid
        return lo, best


@dataclass
class Candidate:
    deployment: Deployment
    at_rate: SimCheck  # simulated at the rate asked, or at the deployment's predicted capacity
    max_rate: float | None = None  # simulated highest rate within the SLA
    max_rate_check: SimCheck | None = None


@dataclass
class PlanResult:
    inputs: PlanInputs
    points: list[Point]
    front: dict[str, list[Point]]  # "agg", "disagg": Pareto fronts of SLA-meeting points
    ranked: list[Deployment]
    checked: list[Candidate] = field(default_factory=list)
    recommended: Candidate | None = None
    profile_dir: str | None = None


def plan(inp: PlanInputs, source: RequestSource | None = None, *, max_checks: int = 4,
         profile_dir: str | Path | None = None, search_max_rate: bool = True,
         progress: Callable[[str], None] | None = None) -> PlanResult:
    """Sweep, rank, and (with a request source) confirm in the simulator; see the module docstring."""
    say = progress or (lambda _msg: None)
    points = sweep(inp)
    met = [p for p in points if inp.sla.met(p.ttft_ms, p.itl_ms)]
    front = {mode: pareto_front([p for p in met if p.mode == mode]) for mode in inp.modes}
    ranked = rank(inp, points)
    result = PlanResult(inputs=inp, points=points, front=front, ranked=ranked)
    if source is None or not ranked:
        return result
    sim = Simulated(inp, source, profile_dir=profile_dir)
    result.profile_dir = str(sim.profile_dir) if profile_dir is not None else None
    try:
        # The best two of each mode first (the static model misjudges queueing differently for
        # each), then the rest in rank order.
        order: list[Deployment] = []
        for mode in inp.modes:
            order += [d for d in ranked if d.point.mode == mode][:2]
        order.sort(key=ranked.index)
        order += [d for d in ranked if d not in order]
        for dep in order[:max_checks]:
            rate = inp.rate or dep.capacity_rps
            say(f"simulating {dep.label} at {rate:.2f} req/s")
            cand = Candidate(dep, sim.check(dep, rate))
            if search_max_rate:
                say(f"searching the highest rate {dep.label} holds within the SLA")
                cand.max_rate, cand.max_rate_check = sim.max_rate(dep, first=cand.at_rate)
            result.checked.append(cand)
        result.recommended = _choose(inp, result.checked)
    finally:
        sim.close()
    return result


def _choose(inp: PlanInputs, checked: list[Candidate]) -> Candidate | None:
    """Asked for a rate: the fewest GPUs whose simulation meets the SLA at it. Otherwise: the most
    simulated requests/s within the SLA (per GPU, since budgets may differ)."""
    if inp.rate:
        ok = [c for c in checked if c.at_rate.meets(inp.sla)]
        return min(ok, key=lambda c: (c.deployment.gpus, -(c.max_rate or 0))) if ok else None
    scored = [c for c in checked if c.max_rate]
    return max(scored, key=lambda c: (c.max_rate or 0) / c.deployment.gpus) if scored else None


def summary(res: PlanResult) -> dict[str, Any]:
    """The plan as JSON-ready data."""
    def pt(p: Point) -> dict[str, Any]:
        return {"label": p.label, "mode": p.mode, "ttft_ms": round(p.ttft_ms, 2), "itl_ms": round(p.itl_ms, 3),
                "tokens_per_s_user": round(p.tokens_per_s_user, 2), "tokens_per_s_gpu": round(p.tokens_per_s_gpu, 1),
                "gpus": p.gpus, "batch": p.batch}

    def cand(c: Candidate) -> dict[str, Any]:
        d = c.deployment
        return {"deployment": d.label, "gpus": d.gpus, "predicted": {**pt(d.point), "capacity_rps": round(d.capacity_rps, 3)},
                "simulated_at_rate": vars(c.at_rate), "simulated_max_rate_rps": c.max_rate,
                "simulated_at_max_rate": vars(c.max_rate_check) if c.max_rate_check else None}

    inp = res.inputs
    return {
        "model": inp.model.shape.name, "gpu": inp.model.gpu.name, "gpu_budget": inp.gpu_budget, "rate": inp.rate,
        "sla": {"ttft_ms": inp.sla.ttft_ms, "itl_ms": inp.sla.itl_ms, "percentile": inp.percentile},
        "workload": vars(inp.workload), "points": len(res.points),
        "front": {k: [pt(p) for p in v] for k, v in res.front.items()},
        "checked": [cand(c) for c in res.checked],
        "recommended": cand(res.recommended) if res.recommended else None,
    }


__all__ = ["BATCHES", "Candidate", "Deployment", "PlanInputs", "PlanResult", "SimCheck", "Simulated", "layouts", "within_sla",
           "plan", "rank", "size", "summary", "sweep"]
