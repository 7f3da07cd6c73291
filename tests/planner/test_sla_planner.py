"""The live planner's parts: predictors, replica math, corrections, bounds, cooldowns, observations."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from turbine.frontend.metrics import FrontendMetrics
from turbine.planner.observe import difference, parse_counters
from turbine.planner.perf_model import Parallel, Step
from turbine.planner.predictors import Constant, HoltWinters, MovingAverage, make_predictor
from turbine.planner.sla_planner import Observation, PlannerConfig, SlaPlanner
from turbine.planner.steady_state import Sla


# -- predictors ------------------------------------------------------------------------------
def _feed(p, values):  # type: ignore[no-untyped-def]
    for v in values:
        p.observe(v)
    return p.predict()


def test_constant_and_moving_average() -> None:
    assert Constant().predict() is None and _feed(Constant(), [1, 5, 3]) == 3
    assert _feed(MovingAverage(3), [1, 2, 3, 4, 5]) == 4
    with pytest.raises(ValueError):
        MovingAverage(0)


def test_holt_winters_follows_a_ramp_that_averages_lag() -> None:
    ramp = [10 + 5 * i for i in range(12)]  # next: 70
    hw = _feed(HoltWinters(), ramp)
    ma = _feed(MovingAverage(5), ramp)
    assert abs(hw - 70) < 3 and abs(ma - 70) > 10


def test_holt_winters_anticipates_a_seasonal_peak() -> None:
    day = [10, 20, 60, 100, 60, 20]  # one cycle of six intervals
    p = HoltWinters(season=6)
    _feed(p, day * 3 + day[:2])  # three days, then the next day's first two intervals
    assert abs(p.predict() - 60) < 10  # the climb to the peak, before it is seen
    assert abs(_feed(Constant(), day * 3 + day[:2]) - 60) == 40
    assert make_predictor("holt-winters", season=6).season == 6
    with pytest.raises(ValueError):
        make_predictor("arima")


# -- replica math ----------------------------------------------------------------------------
class FlatModel:
    """Decode steps cost ``decode_ms``, prompt tokens ``per_token_ms`` each; KV holds ``kv`` tokens."""

    def __init__(self, decode_ms: float = 10.0, per_token_ms: float = 0.0, kv: int = 10**9) -> None:
        self.decode_ms, self.per_token_ms, self.kv = decode_ms, per_token_ms, kv
        self.shape = SimpleNamespace(kv_bytes_per_token=1000)

    def step_ms(self, step: Step, par: Parallel = Parallel()) -> float:
        return self.decode_ms + self.per_token_ms * step.prefill_tokens

    def kv_capacity_tokens(self, par: Parallel, memory_utilization: float = 0.9) -> int:
        return self.kv * par.gpus


def _cfg(**kw) -> PlannerConfig:  # type: ignore[no-untyped-def]
    base = dict(sla=Sla(1000, 20), scale_down_cooldown_s=0.0, correct=False, max_utilization=1.0, predictor="constant")
    base.update(kw)
    return PlannerConfig(**base)  # type: ignore[arg-type]


def test_agg_replicas_by_hand() -> None:
    # Every step 10 ms: TTFT 15 ms, ITL 10 ms; KV for 32 requests of 1000 + 100 tokens -> batch 32.
    model = FlatModel(10.0, kv=32 * 1100)
    pl = SlaPlanner(model, _cfg())  # type: ignore[arg-type]
    per_worker = 32 / ((15 + 99 * 10) / 1e3)  # 31.8 req/s
    d = pl.decide(Observation(60, rate=100, isl=1000, osl=100), {"agg": 1}, now=0)
    assert d.per_worker_rps["agg"] == pytest.approx(per_worker)
    assert d.needed["agg"] == math.ceil(100 / per_worker) == 4 and d.target["agg"] == 4
    # With 80% headroom: ceil(100 / (0.8 * 31.8)) = 4 -> 4; at 120 req/s: 5 vs 4.
    pl = SlaPlanner(model, _cfg(max_utilization=0.8))  # type: ignore[arg-type]
    assert pl.decide(Observation(60, rate=120, isl=1000, osl=100), {"agg": 1}, 0).needed["agg"] == 5


def test_disagg_replicas_by_hand() -> None:
    # Decode steps 10 ms (ITL 10 <= 20) with KV for 64 requests; prefill 10 ms + 0.04 ms/token = 50 ms.
    model = FlatModel(10.0, per_token_ms=0.04, kv=64 * 1100)
    pl = SlaPlanner(model, _cfg(mode="disagg", sla=Sla(100, 20), max_utilization=0.9))  # type: ignore[arg-type]
    d = pl.decide(Observation(60, rate=30, isl=1000, osl=100), {"prefill": 1, "decode": 1}, 0)
    decode_rps = 64 / (100 * 0.010) * 0.9  # 57.6
    rho = min(0.9, 1 - 50 / 100)  # the queue keeps a 100 ms TTFT at 50% busy
    prefill_rps = rho * 1e3 / 50  # 10
    assert d.per_worker_rps["decode"] == pytest.approx(decode_rps) and d.per_worker_rps["prefill"] == pytest.approx(prefill_rps)
    assert d.target == {"prefill": 3, "decode": 1}


def test_corrections_scale_with_observed_latency() -> None:
    model = FlatModel(10.0, kv=32 * 1100)
    pl = SlaPlanner(model, _cfg(correct=True, correction_smoothing=1.0))  # type: ignore[arg-type]
    # Observed ITL twice the model's: the ITL target halves, so only batches with ITL <= 10 ms count.
    d = pl.decide(Observation(60, rate=50, isl=1000, osl=100, ttft_ms=15, itl_ms=20, concurrency=16), {"agg": 2}, 0)
    assert d.correction["itl"] == pytest.approx(2.0) and d.correction["ttft"] == pytest.approx(1.0)
    # The flat model's ITL (10 ms) still meets 20 / 2: same capacity; a slower fleet (x3) meets nothing.
    d = pl.decide(Observation(60, rate=50, isl=1000, osl=100, ttft_ms=15, itl_ms=30, concurrency=16), {"agg": 2}, 60)
    assert d.correction["itl"] == pytest.approx(3.0)
    assert d.needed["agg"] == 64 and "no batch" in d.reasons["agg"]  # as many as allowed


def test_bounds_budget_and_cooldowns() -> None:
    model = FlatModel(10.0, kv=32 * 1100)
    cfg = _cfg(min_workers=2, max_workers=6, gpu_budget=10, scale_down_cooldown_s=120, scale_up_cooldown_s=30,
               max_scale_down_fraction=0.5)
    pl = SlaPlanner(model, cfg)  # type: ignore[arg-type]
    obs = lambda rate: Observation(60, rate=rate, isl=1000, osl=100)  # noqa: E731
    assert pl.decide(obs(1000), {"agg": 2}, 0).target["agg"] == 6  # capped at max_workers
    assert pl.decide(obs(0), {"agg": 6}, 60).target["agg"] == 6  # changed 60 s ago: down-cooldown holds it
    d = pl.decide(obs(0), {"agg": 6}, 200)
    assert d.target["agg"] == 3  # down at most half at once, never below min
    assert pl.decide(obs(0), {"agg": 3}, 400).target["agg"] == 2  # min_workers
    d = pl.decide(obs(1000), {"agg": 2}, 410)
    assert d.target["agg"] == 6
    assert pl.decide(obs(1000), {"agg": 4}, 420).target["agg"] == 4  # up-cooldown (30 s) holds it
    # A GPU budget smaller than the pools want: they shrink in proportion.
    tp2 = _cfg(mode="disagg", prefill_layout=Parallel(tp=2), decode_layout=Parallel(tp=2), gpu_budget=8, max_workers=8)
    d = SlaPlanner(FlatModel(10.0, per_token_ms=0.04, kv=64 * 1100), tp2).decide(obs(1000), {"prefill": 1, "decode": 1}, 0)  # type: ignore[arg-type]
    assert sum(d.target[p] * 2 for p in d.target) <= 8 and min(d.target.values()) >= 1
    with pytest.raises(ValueError, match="budget"):
        _cfg(min_workers=3, gpu_budget=2)


def test_a_start_up_time_plans_for_the_load_when_new_workers_serve() -> None:
    hw = HoltWinters()
    for v in (10, 20, 30, 40):
        hw.observe(v)
    assert hw.predict(3) - hw.predict(1) == pytest.approx(2 * hw._trend) and hw.predict(3) > hw.predict(1)
    model = FlatModel(10.0, kv=32 * 1100)
    ramp = [Observation(60, rate=r, isl=1000, osl=100) for r in (30, 60, 90, 120)]
    needed = {}
    for startup in (0.0, 120.0):  # 60 s intervals: a worker asked for now serves in the third interval
        cfg = _cfg(predictor="holt-winters", startup_s=startup)
        assert cfg.horizon == (1 if startup == 0 else 3)
        pl = SlaPlanner(model, cfg)  # type: ignore[arg-type]
        for i, o in enumerate(ramp):
            d = pl.decide(o, {"agg": 1}, 60.0 * i)
        needed[startup] = d.needed["agg"]
    assert needed[120.0] > needed[0.0]
    # a falling load: the next interval's prediction (the larger) still rules
    pl = SlaPlanner(model, _cfg(predictor="holt-winters", startup_s=120.0))  # type: ignore[arg-type]
    for i, o in enumerate(reversed(ramp)):
        d = pl.decide(o, {"agg": 1}, 60.0 * i)
    assert d.predicted["rate"] == pytest.approx(pl.rate_p.predict(1))


def test_cached_prompt_tokens_cost_no_prefill() -> None:
    # Prompt tokens cost 0.04 ms each: a 50% prefix hit halves the modelled prefill of a prompt.
    model = FlatModel(10.0, per_token_ms=0.04, kv=64 * 1100)
    cfg = _cfg(mode="disagg", sla=Sla(100, 20), max_utilization=0.9)
    cold = SlaPlanner(model, cfg).decide(Observation(60, rate=30, isl=1000, osl=100), {"prefill": 1, "decode": 1}, 0)  # type: ignore[arg-type]
    warm_pl = SlaPlanner(model, cfg)  # type: ignore[arg-type]
    warm_pl.decide(Observation(60, rate=30, isl=1000, osl=100, prefix_hit=0.5), {"prefill": 1, "decode": 1}, 0)
    warm = warm_pl.decide(Observation(60, rate=30, isl=1000, osl=100, prefix_hit=0.5), {"prefill": 1, "decode": 1}, 60)
    assert warm.predicted["prefix_hit"] == pytest.approx(0.375)  # smoothed: 0.25, then 0.375
    assert warm.per_worker_rps["prefill"] > cold.per_worker_rps["prefill"]
    assert warm.target["prefill"] < cold.target["prefill"]


def test_a_pool_shrinks_only_to_the_largest_size_wanted_in_the_window() -> None:
    model = FlatModel(10.0, kv=32 * 1100)
    pl = SlaPlanner(model, _cfg(scale_down_window_s=150, max_scale_down_fraction=1.0))  # type: ignore[arg-type]
    obs = lambda rate: Observation(60, rate=rate, isl=1000, osl=100)  # noqa: E731
    assert pl.decide(obs(150), {"agg": 1}, 0).target["agg"] == 5
    d = pl.decide(obs(0), {"agg": 5}, 60)  # one quiet interval: 5 was wanted 60 s ago
    assert d.target["agg"] == 5 and "largest size wanted" in d.reasons["agg"]
    assert pl.decide(obs(60), {"agg": 5}, 120).target["agg"] == 5  # 5 (at 0) still in the window
    assert pl.decide(obs(60), {"agg": 5}, 160).target["agg"] == 2  # now only 1 and 2 were wanted
    with pytest.raises(ValueError, match="window"):
        _cfg(scale_down_window_s=-1)


def test_no_traffic_keeps_the_minimum() -> None:
    pl = SlaPlanner(FlatModel(), _cfg(min_workers=2))  # type: ignore[arg-type]
    d = pl.decide(Observation(60, rate=0.0), {"agg": 2}, 0)
    assert d.target == {"agg": 2} and d.reasons["agg"] == "no traffic seen yet"


# -- observations ----------------------------------------------------------------------------
def test_observation_from_frontend_counters() -> None:
    m = FrontendMetrics()
    mm = m.model("tiny")
    before = parse_counters(m.render().decode(), at=100.0)
    for _ in range(10):  # 10 requests: 1000 prompt and 50 output tokens, TTFT 0.2 s, 49 gaps of 10 ms, 2 s each
        mm.ttft.observe(0.2)
        mm.e2e.observe(2.0)
        mm.prompt_tokens.inc(1000)
        mm.output_tokens.inc(50)
        mm.cached_tokens.inc(250)
        for _ in range(49):
            mm.itl.observe(0.01)
    obs = difference(before, parse_counters(m.render().decode(), at=110.0))
    assert obs.rate == pytest.approx(1.0) and obs.isl == pytest.approx(1000) and obs.osl == pytest.approx(50)
    assert obs.ttft_ms == pytest.approx(200) and obs.itl_ms == pytest.approx(10) and obs.concurrency == pytest.approx(2.0)
    assert obs.prefix_hit == pytest.approx(0.25)
    assert parse_counters(m.render().decode(), model="other").values["prompt"] == 0
    # Nothing finished: lengths unknown, not zero.
    idle = difference(parse_counters(m.render().decode(), at=0), parse_counters(m.render().decode(), at=5))
    assert idle.rate == 0 and idle.isl is None and idle.ttft_ms is None
