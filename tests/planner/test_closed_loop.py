"""The virtual connector and the planner in the simulator's loop: workers start late, drain
without losing a request, GPU time is counted, and a static run equals a plain simulation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from turbine.mocker.core import MockerConfig
from turbine.planner.closed_loop import SimObserver, run_closed_loop
from turbine.planner.connectors.virtual import VirtualConnector
from turbine.planner.model_shape import get_shape
from turbine.planner.perf_model import PerfModel
from turbine.planner.sla_planner import PlannerConfig, SlaPlanner
from turbine.planner.steady_state import Sla
from turbine.planner.workloads import LengthDist, day_shaped_trace, synthetic_requests
from turbine.sim.simulator import SimConfig, Simulator, simulate

PROFILE = Path(__file__).resolve().parents[2] / "bench" / "profiles" / "h200_llama3-8b_bf16.json"
MOCKER = MockerConfig(profile=str(PROFILE), num_gpu_blocks=4096, max_num_seqs=64, context_length=16384)
SLA = Sla(ttft_ms=500, itl_ms=15)


def _requests(n: int = 300, rate: float = 4.0):  # type: ignore[no-untyped-def]
    return synthetic_requests(n, LengthDist(2000, 0.5), LengthDist(150, 0.5), rate, seed=1)


def test_a_static_closed_loop_is_the_plain_simulation() -> None:
    reqs = _requests(200)
    cfg = SimConfig(workers=2, mocker=MOCKER)
    plain = simulate(reqs, cfg)
    looped = run_closed_loop(reqs, cfg, SLA, interval_s=5.0)
    assert [r.ttft_s for r in looped.results] == [r.ttft_s for r in plain.results]
    assert [r.itl_s for r in looped.results] == [r.itl_s for r in plain.results]
    assert looped.gpu_seconds == pytest.approx(2 * plain.duration_s)
    assert len(looped.ticks) == int(plain.duration_s // 5.0)


def test_a_started_worker_serves_only_after_its_startup() -> None:
    reqs = _requests(300, rate=6.0)
    sim = Simulator(reqs, SimConfig(workers=1, mocker=MOCKER))
    conn = VirtualConnector(sim, startup_s=10.0)
    sim.at(5.0, lambda t: conn.scale_now("agg", 3))
    res = sim.run()
    assert all(r.ok for r in res.results)
    assert conn.current_now() == {"agg": 3} and conn.ready_at["worker-1"] == pytest.approx(15.0)
    routed_before = sum(1 for a in res.arrivals_s if a < 15.0)
    assert sim.stats.requests_per_worker[0] >= routed_before  # nothing reached the new ones while they loaded
    assert min(sim.stats.requests_per_worker[1:]) > 0
    # GPU time: worker-0 for the whole run, the new ones from the moment they were asked for
    assert conn.gpu_seconds() == pytest.approx(res.duration_s + 2 * (res.duration_s - 5.0))


def test_a_drained_worker_finishes_its_requests_then_leaves() -> None:
    reqs = _requests(300, rate=6.0)
    done_at: dict[str, float] = {}
    sim = Simulator(reqs, SimConfig(workers=3, mocker=MOCKER))
    conn = VirtualConnector(sim, startup_s=0.0)
    sim.at(10.0, lambda t: conn.scale_now("agg", 1))
    routed: dict[int, int] = {}
    sim.at(10.0 + 1e-9, lambda t: routed.update(enumerate(sim.stats.requests_per_worker)))
    res = sim.run()
    assert all(r.ok for r in res.results), [r.error for r in res.results if not r.ok][:3]
    assert conn.current_now() == {"agg": 1}
    gone = sorted(sim.retired)
    assert len(gone) == 2 and all(10.0 <= sim.retired[w] < res.duration_s for w in gone)
    for w in gone:  # no request reached a draining worker
        assert sim.stats.requests_per_worker[sim._index[w]] == routed[sim._index[w]]
        done_at[w] = sim.retired[w]
    full = res.duration_s
    assert conn.gpu_seconds() == pytest.approx(full + sum(done_at.values()))
    with pytest.raises(ValueError, match="no 'decode' pool"):
        sim.add_worker("decode")


def test_a_starting_worker_is_cancelled_before_a_serving_one() -> None:
    sim = Simulator(_requests(50), SimConfig(workers=1, mocker=MOCKER))
    conn = VirtualConnector(sim, startup_s=30.0)
    conn.scale_now("agg", 2)
    conn.scale_now("agg", 1)
    assert sim.retired == {"worker-1": 0.0} and conn.members("agg") == ["worker-0"]


def test_the_observer_reports_the_interval() -> None:
    obs = SimObserver([0.5, 1.5, 2.5, 3.5])
    from turbine.bench.stats import RequestResult

    obs.on_complete(RequestResult(ok=True, ttft_s=0.2, itl_s=[0.01, 0.03], e2e_s=1.0, prompt_tokens=100,
                                  output_tokens=3), 1.8)
    o = obs.read(0.0, 2.0)
    assert o.rate == 1.0 and o.isl == 100 and o.osl == 3
    assert o.ttft_ms == pytest.approx(200) and o.itl_ms == pytest.approx(20) and o.concurrency == pytest.approx(0.5)
    o2 = obs.read(2.0, 4.0)
    assert o2.rate == 1.0 and o2.isl is None  # nothing ended in the second interval


def test_the_planner_follows_a_day_and_spends_fewer_gpu_hours_than_static_peak() -> None:
    trace = day_shaped_trace(_requests(400), duration_s=160, peak_rate=30.0, swing=8.0, seed=3)
    model = PerfModel(get_shape("llama3.1-8b"), "h200", profile=json.loads(PROFILE.read_text()))
    pcfg = PlannerConfig(sla=SLA, interval_s=10.0, max_workers=8, gpu_budget=8, max_batch=64,
                         scale_down_cooldown_s=20.0, scale_down_window_s=20.0, max_utilization=0.6)
    planned = run_closed_loop(trace, SimConfig(workers=1, mocker=MOCKER), SLA, policy=SlaPlanner(model, pcfg),
                              interval_s=10.0, startup_s=5.0)
    static = run_closed_loop(trace, SimConfig(workers=planned.peak_workers["agg"], mocker=MOCKER), SLA, interval_s=10.0)
    assert all(x.ok for x in static.results) and all(x.ok for x in planned.results)
    sizes = [k.current["agg"] for k in planned.ticks]
    peak_at = max(range(len(sizes)), key=sizes.__getitem__)
    assert 3 <= max(sizes) <= 8 and sizes[-1] < max(sizes), sizes  # grew for the peak, shrank after it
    assert 0.25 * len(sizes) < peak_at < 0.9 * len(sizes), sizes
    assert planned.gpu_seconds < 0.8 * static.gpu_seconds  # static for the planner's own peak
    assert static.attainment >= 0.95 and planned.attainment >= 0.9


def test_disaggregated_pools_grow_and_drain_in_the_simulator() -> None:
    reqs = _requests(200, rate=5.0)
    sim = Simulator(reqs, SimConfig(prefill_workers=1, decode_workers=1, mocker=MOCKER))
    conn = VirtualConnector(sim, gpus_per_worker={"decode": 2}, startup_s=2.0)
    assert conn.current_now() == {"prefill": 1, "decode": 1}
    sim.at(5.0, lambda t: (conn.scale_now("prefill", 2), conn.scale_now("decode", 2)))
    sim.at(20.0, lambda t: conn.scale_now("prefill", 1))  # a prefill worker drains: its held KV is pulled first
    res = sim.run()
    assert all(r.ok for r in res.results), [r.error for r in res.results if not r.ok][:3]
    assert conn.current_now() == {"prefill": 1, "decode": 2}
    assert sim.stats.requests_per_worker[sim._index["decode-1"]] > 0
    (gone,) = sim.retired  # the least loaded prefill worker, after its last transfer
    assert gone.startswith("prefill-") and 20.0 <= sim.retired[gone] <= res.duration_s
    assert all(not core.scheduler.held for core in sim.cores)  # no KV left held anywhere
    # GPU time: each prefill worker from its request to its exit, decode workers two GPUs each
    started = {"prefill-0": 0.0, "prefill-1": 5.0}
    kept = "prefill-1" if gone == "prefill-0" else "prefill-0"
    d = res.duration_s
    expected = (d - started[kept]) + (sim.retired[gone] - started[gone]) + 2 * d + 2 * (d - 5.0)
    assert conn.gpu_seconds() == pytest.approx(expected)
