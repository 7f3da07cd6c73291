"""The dashboard's history: the ring, rates and interval quantiles from cumulative counters, and
one sampled point from a frontend's own metrics."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram as PromHistogram

from turbine.dashboard.history import Histogram, Rate, Ring, Window, read_counter, read_histogram
from turbine.dashboard.snapshot import Sampler, host_of
from turbine.disagg.prefill import DisaggStats
from turbine.frontend.metrics import FrontendMetrics
from turbine.frontend.model_registry import ReportedLoad
from turbine.protocols.load import TierLoad, WorkerLoad


def test_ring_keeps_the_newest() -> None:
    r: Ring[int] = Ring(3)
    assert r.last() is None and len(r) == 0
    for i in range(10):
        r.append(i)
    assert list(r) == [7, 8, 9] and r.last() == 9 and r.capacity == 3
    with pytest.raises(ValueError):
        Ring(0)


def test_rate_of_a_cumulative_total() -> None:
    r = Rate()
    assert r.step(100, 1.0) == 0.0  # the first reading only sets the base
    assert r.step(150, 0.5) == 100.0
    assert r.step(120, 1.0) == 0.0  # went down (a worker left with its share): a restart, not negative
    assert r.step(130, 1.0) == 10.0
    assert r.step(140, 0.0) == 0.0


def test_window_quantiles_within_buckets() -> None:
    bounds = (0.01, 0.1, 1.0, math.inf)
    w = Window()
    first = w.step(Histogram(bounds, (5, 5, 5, 5), 1.0))
    assert first.count == 0 and first.mean is None and first.quantile(0.5) is None
    # this interval: 10 in (0, 0.01], 10 in (0.01, 0.1], nothing above; sum 0.6
    iv = w.step(Histogram(bounds, (15, 25, 25, 25), 1.6))
    assert iv.counts == (10, 10, 0, 0) and iv.count == 20
    assert iv.mean == pytest.approx(0.03)
    assert iv.quantile(0.5) == pytest.approx(0.01)
    assert iv.quantile(0.75) == pytest.approx(0.01 + 0.09 * 0.5)
    assert iv.quantile(0.25) == pytest.approx(0.005)
    iv = w.step(Histogram(bounds, (15, 25, 25, 27), 10.0))  # all beyond the last finite bound
    assert iv.quantile(0.5) == 1.0
    assert w.step(Histogram(bounds, (0, 0, 0, 0), 0.0)).count == 0  # a reset
    assert w.step(Histogram((), (), 0.0)).count == 0


def test_reading_prometheus_objects() -> None:
    reg = CollectorRegistry()
    c = Counter("x_tokens", "t", ["model", "status"], registry=reg)
    c.labels("a", "200").inc(3)
    c.labels("b", "500").inc(4)
    assert read_counter(c) == 7
    assert read_counter(c, where=lambda labels: labels["status"].startswith("5")) == 4
    h = PromHistogram("x_seconds", "s", ["model"], buckets=(0.1, 1.0), registry=reg)
    h.labels("a").observe(0.05)
    h.labels("b").observe(0.5)
    h.labels("b").observe(5)
    got = read_histogram(h)
    assert got.bounds == (0.1, 1.0, math.inf) and got.cumulative == (1, 2, 3) and got.total == pytest.approx(5.55)


def test_host_of_addresses() -> None:
    assert host_of("tcp://10.0.0.7:5555") == "10.0.0.7"
    assert host_of("tcp://[::1]:5555") == "::1"
    assert host_of("inproc://worker-1") == "in-process"


def _frontend(metrics: FrontendMetrics, loads: list[WorkerLoad]) -> SimpleNamespace:
    model = SimpleNamespace(workers={ld.worker_id: None for ld in loads},
                            reports={ld.worker_id: ReportedLoad(ld, 0.0) for ld in loads})
    return SimpleNamespace(metrics=metrics, registry=SimpleNamespace(models={"m": model}),
                           generation=SimpleNamespace(prefill=SimpleNamespace(stats=DisaggStats())),
                           api=SimpleNamespace(inflight=3))


def test_sampler_point_from_the_frontends_counters() -> None:
    mx = FrontendMetrics()
    mm = mx.model("m")
    tiers = [TierLoad(tier="host", blocks=1, capacity_blocks=10, onboarded_bytes=1000)]
    loads = [WorkerLoad(worker_id="w1", model_name="m", kv_active_blocks=30, kv_total_blocks=100, num_running=2,
                        num_waiting=1, tiers=tiers),
             WorkerLoad(worker_id="w2", model_name="m", kv_active_blocks=10, kv_total_blocks=100, num_running=1,
                        num_waiting=0)]
    fe = _frontend(mx, loads)
    s = Sampler(fe, wall_clock=lambda: 1000.0)
    p0 = s.sample(1.0)
    assert p0.requests_ps == 0 and p0.ttft_ms_mean is None
    assert (p0.workers, p0.running, p0.waiting, p0.inflight) == (2, 3, 1, 3) and p0.kv_used == pytest.approx(0.2)
    for _ in range(4):
        mm.e2e.observe(0.2)
        mm.ttft.observe(0.02)
    mm.itl.observe(0.004)
    mm.output_tokens.inc(500)
    mx.count("m", "chat", 200)
    mx.count("m", "chat", 503)
    fe.generation.prefill.stats.decisions["remote"] += 3
    fe.generation.prefill.stats.decisions["local_short"] += 1
    fe.generation.prefill.stats.pulled_blocks += 40
    fe.registry.models["m"].reports["w1"] = ReportedLoad(
        WorkerLoad(worker_id="w1", model_name="m", kv_active_blocks=30, kv_total_blocks=100, num_running=2,
                   num_waiting=1, tiers=[TierLoad(tier="host", blocks=1, capacity_blocks=10, onboarded_bytes=3000)]),
        0.0)
    p = s.sample(2.0)
    assert p.t == 1000.0
    assert p.requests_ps == 2.0 and p.output_tps == 250.0 and p.errors_ps == 0.5
    assert p.ttft_ms_mean == pytest.approx(20.0) and 10.0 <= p.ttft_ms_p50 <= 25.0
    assert p.itl_ms_mean == pytest.approx(4.0)
    assert (p.disagg_remote_ps, p.disagg_local_ps, p.pulled_blocks_ps) == (1.5, 0.5, 20.0)
    assert p.onboard_bps == 1000.0
