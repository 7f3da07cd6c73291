"""Steady-state points, the Pareto front, sizing and ranking, and `turbine plan` end to end."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from turbine.planner.model_shape import get_shape
from turbine.planner.perf_model import Parallel, PerfModel, Step
from turbine.planner.plan import PlanInputs, Simulated, plan, rank, size, sweep
from turbine.planner.steady_state import Point, Sla, Workload, agg_point, disagg_point, pareto_front, prefill_rate
from turbine.planner.workloads import LengthDist, synthetic_requests

PROFILES = Path(__file__).resolve().parents[2] / "bench" / "profiles"


class FlatModel:
    """Every step costs ``ms`` plus ``per_token_ms`` per prompt token: hand-computable points."""

    def __init__(self, ms: float = 10.0, per_token_ms: float = 0.0) -> None:
        self.ms, self.per_token_ms = ms, per_token_ms
        self.shape = SimpleNamespace(kv_bytes_per_token=1000)

    def step_ms(self, step: Step, par: Parallel = Parallel()) -> float:
        return self.ms + self.per_token_ms * step.prefill_tokens


def test_agg_point_by_hand() -> None:
    m = FlatModel(10.0)
    wl = Workload(isl=1000, osl=101)
    p = agg_point(m, Parallel(), wl, 8, token_budget=2048)  # type: ignore[arg-type]
    assert p.itl_ms == 10.0
    assert p.ttft_ms == 5.0 + 10.0  # half a step waiting, one step for the whole prompt
    assert p.requests_per_s == pytest.approx(8 / ((15.0 + 100 * 10.0) / 1e3))
    assert p.tokens_per_s_user == 100.0 and p.tokens_per_s_gpu == pytest.approx(p.requests_per_s * 101)
    # A prompt over the token budget is chunked: each chunk is a step.
    q = agg_point(m, Parallel(), Workload(isl=5000, osl=101), 8, token_budget=2056)  # type: ignore[arg-type]
    assert q.ttft_ms == 5.0 + 3 * 10.0


def test_disagg_point_by_hand() -> None:
    m = FlatModel(10.0, per_token_ms=0.01)
    wl = Workload(isl=1000, osl=100)
    pr = prefill_rate(m, Parallel(), wl, 1, decode_step_ms=5.0, transfer_gbps=1.0, transfer_latency_ms=0.0)  # type: ignore[arg-type]
    assert pr.requests_per_s == pytest.approx(1 / 0.020)  # 10 ms + 1000 tokens * 0.01 ms
    assert pr.ttft_ms == pytest.approx(20 * 1.5 + 1000 * 1000 / 1e9 * 1e3 + 5.0)
    pt = disagg_point(m, pr, Parallel(tp=2), wl, 16, 5.0, 1, 3)  # type: ignore[arg-type]
    dec_rate = 16 / (100 * 0.005)
    assert pt.requests_per_s == pytest.approx(min(50.0, 3 * dec_rate)) and pt.gpus == 1 + 3 * 2
    assert pt.decode_rps == pytest.approx(dec_rate)


def _pt(user: float, gpu: float) -> Point:
    return Point(mode="agg", decode=Parallel(), batch=1, ttft_ms=1, itl_ms=1e3 / user, requests_per_s=gpu, gpus=1, osl=1)


def test_pareto_front_keeps_only_undominated_points() -> None:
    pts = [_pt(100, 10), _pt(90, 5), _pt(80, 20), _pt(50, 20), _pt(40, 30), _pt(95, 12)]
    front = pareto_front(pts)
    assert [(round(p.tokens_per_s_user), round(p.tokens_per_s_gpu)) for p in front] == [(100, 10), (95, 12), (80, 20), (40, 30)]


@pytest.fixture(scope="module")
def h100() -> PerfModel:
    return PerfModel(get_shape("llama3.1-8b"), "h100", profile=json.loads((PROFILES / "h100_llama3-8b_bf16.json").read_text()))


def test_sweep_and_rank_respect_budget_and_sla(h100: PerfModel) -> None:
    inp = PlanInputs(model=h100, sla=Sla(600, 20), workload=Workload(4000, 500), gpu_budget=8)
    points = sweep(inp)
    assert {p.mode for p in points} == {"agg", "disagg"} and all(p.gpus <= 8 for p in points)
    ranked = rank(inp, points)
    assert ranked and all(d.gpus <= 8 and inp.sla.met(d.point.ttft_ms, d.point.itl_ms) for d in ranked)
    caps = [d.capacity_rps for d in ranked]
    assert caps == sorted(caps, reverse=True)  # no rate asked: the most requests/s first
    # A rate asked: the fewest GPUs that serve it.
    small = PlanInputs(model=h100, sla=Sla(600, 20), workload=Workload(4000, 500), gpu_budget=8, rate=3.0)
    best = rank(small, sweep(small))[0]
    assert best.capacity_rps >= 3.0 and best.gpus == min(d.gpus for d in rank(small, sweep(small)))
    # Nothing fits a 1 ms ITL.
    assert rank(PlanInputs(model=h100, sla=Sla(600, 1), workload=Workload(4000, 500), gpu_budget=8), points) == []
    with pytest.raises(ValueError):
        PlanInputs(model=h100, sla=Sla(600, 20), workload=Workload(4000, 500), gpu_budget=0)


def test_size_grows_a_point_to_the_rate(h100: PerfModel) -> None:
    inp = PlanInputs(model=h100, sla=Sla(600, 20), workload=Workload(4000, 500), gpu_budget=64, rate=20.0)
    pt = agg_point(h100, Parallel(tp=2), inp.workload, 32)
    dep = size(pt, inp)
    assert dep is not None and dep.workers == -(-20.0 // pt.requests_per_s) and dep.capacity_rps >= 20.0
    assert size(pt, PlanInputs(model=h100, sla=Sla(600, 20), workload=Workload(4000, 500), gpu_budget=2, rate=20.0)) is None


def test_the_simulator_checks_a_deployment(h100: PerfModel) -> None:
    """The simulator, not the steady-state model, says whether a deployment holds its SLA: run
    at 1.5x its modelled capacity a queue builds up and TTFT leaves the target."""
    wl = Workload(2000, 100)
    inp = PlanInputs(model=h100, sla=Sla(500, 30), workload=wl, gpu_budget=2, modes=("agg",))
    dep = rank(inp, sweep(inp))[0]
    source = lambda rate: synthetic_requests(300, LengthDist(2000), LengthDist(100), rate, seed=1)  # noqa: E731
    sim = Simulated(inp, source)
    try:
        easy = sim.check(dep, dep.capacity_rps * 0.3)
        hard = sim.check(dep, dep.capacity_rps * 1.5)
    finally:
        sim.close()
    assert easy.errors == 0 and easy.meets(inp.sla) and easy.attainment > 0.9
    assert not hard.meets(inp.sla) and hard.ttft_ms > easy.ttft_ms


def test_plan_recommends_what_the_simulator_confirms(h100: PerfModel, tmp_path: Path) -> None:
    wl = Workload(2000, 100)
    inp = PlanInputs(model=h100, sla=Sla(500, 30), workload=wl, gpu_budget=2, rate=4.0)
    source = lambda rate: synthetic_requests(200, LengthDist(2000, 0.3), LengthDist(100), rate, seed=2)  # noqa: E731
    res = plan(inp, source, max_checks=2, search_max_rate=False, profile_dir=tmp_path)
    assert res.recommended is not None and res.recommended.at_rate.meets(inp.sla)
    assert res.recommended.deployment.gpus <= 2
    assert any(p.name.endswith(".json") for p in tmp_path.iterdir())  # the layouts' profiles, reusable


def _plan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "turbine", "plan", *args], capture_output=True, text=True, timeout=120)


def test_plan_cli(tmp_path: Path) -> None:
    prof = str(PROFILES / "h100_llama3-8b_bf16.json")
    r = _plan_cli("--profile", prof, "--gpus", "8", "--isl", "4000", "--osl", "500", "--ttft-ms", "600",
                  "--itl-ms", "20", "--no-simulate", "--out", str(tmp_path), "--model-path", "/m/llama")
    assert r.returncode == 0, r.stderr
    assert "Pareto front, agg" in r.stdout and "Pareto front, disagg" in r.stdout
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["front"]["agg"] and data["gpu_budget"] == 8
    bad = _plan_cli("--profile", prof, "--gpus", "8", "--ttft-ms", "600", "--itl-ms", "20")
    assert bad.returncode == 2 and "workload" in bad.stderr
    bad = _plan_cli("--model", "nope", "--gpu", "h100", "--gpus", "8", "--isl", "10", "--osl", "10",
                    "--ttft-ms", "1", "--itl-ms", "1")
    assert bad.returncode == 2 and "unknown model" in bad.stderr
    bad = _plan_cli("--profile", prof, "--gpus", "8", "--isl", "x", "--osl", "10", "--ttft-ms", "1", "--itl-ms", "1")
    assert bad.returncode == 2 and "length distribution" in bad.stderr
