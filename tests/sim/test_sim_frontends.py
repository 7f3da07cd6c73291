"""Several frontends in the simulator: each routes its share of the requests and learns of the
others' only from the workers' load reports, as live frontends do (sim/frontends.py)."""
from __future__ import annotations

import random
import statistics

import pytest

from turbine.bench.trace import MOONCAKE_BLOCK_TOKENS as B
from turbine.bench.trace import TraceRequest
from turbine.mocker.core import MockerConfig
from turbine.sim import SimConfig, Simulator, simulate
from turbine.sim.frontends import Frontends


def _req(ms: float, n_in: int, n_out: int, ids: list[int]) -> TraceRequest:
    return TraceRequest(timestamp_ms=ms, input_length=n_in, output_length=n_out, hash_ids=tuple(ids))


def test_a_report_tells_the_second_frontend_which_worker_is_busy(flat_profile: str) -> None:
    """r0 (frontend 0) decodes for 0.4 s; r1 reaches frontend 1 at 100 ms, after two load
    reports: it goes to the idle worker. Blind to the reports, frontend 1 sees two idle workers
    and breaks the tie as frontend 0 did: both requests share one worker."""
    reqs = [_req(0, 100, 200, [1]), _req(100, 100, 2, [2])]

    def run(own_only: bool) -> list[int]:
        cfg = SimConfig(workers=2, router="predicted", frontends=2, router_own_load_only=own_only,
                        mocker=MockerConfig(profile=flat_profile, num_gpu_blocks=1024))
        sim = Simulator(reqs, cfg)
        assert isinstance(sim.router, Frontends) and len(sim.router.routers) == 2
        res = sim.run()
        assert all(r.ok for r in res.results)
        assert not sim.router._owner  # every request finished on the router that took it
        return sorted(res.stats.requests_per_worker)

    assert run(own_only=False) == [1, 1]
    assert run(own_only=True) == [0, 2]


def _busy_trace() -> list[TraceRequest]:
    """160 distinct prompts of 1k-12k tokens every 60 ms: 4 workers busy, not saturated."""
    rng = random.Random(3)
    reqs, hid = [], 0
    for i in range(160):
        n = rng.randint(2, 24)
        reqs.append(_req(i * 60.0, n * B, rng.randint(50, 200), list(range(hid, hid + n))))
        hid += n
    return reqs


def _mean_ttft(reqs: list[TraceRequest], **kw: object) -> float:
    res = simulate(reqs, SimConfig(workers=4, router="predicted", seed=0,
                                   mocker=MockerConfig(num_gpu_blocks=16384, context_length=65536), **kw))
    assert all(r.ok for r in res.results)
    return statistics.mean(r.ttft_s for r in res.results)


def test_shared_load_beats_blind_frontends_and_costs_little_against_one() -> None:
    """Two or three frontends sharing the workers' reports have a lower mean TTFT than the same
    frontends blind to each other, and two of them stay within 25% of one frontend."""
    reqs = _busy_trace()
    one = _mean_ttft(reqs, frontends=1)
    for n in (2, 3):
        shared, blind = _mean_ttft(reqs, frontends=n), _mean_ttft(reqs, frontends=n, router_own_load_only=True)
        assert shared < 0.95 * blind, (n, shared, blind)
    assert _mean_ttft(reqs, frontends=2) < 1.25 * one


def test_the_cost_of_a_second_frontend_grows_with_the_age_of_its_reports() -> None:
    """What two frontends lose against one is the age of what each knows of the other: fresher
    load reports (``load_report_ms``) bring them closer to one frontend."""
    reqs = _busy_trace()
    one = _mean_ttft(reqs, frontends=1)
    ages = [_mean_ttft(reqs, frontends=2, load_report_ms=ms) for ms in (1.0, 50.0, 200.0)]
    assert one < ages[0] < ages[1] < ages[2], (one, ages)


def test_frontends_config_is_checked() -> None:
    with pytest.raises(ValueError, match="frontends must be >= 1"):
        SimConfig(frontends=0)
    with pytest.raises(ValueError, match="aggregated fleets only"):
        SimConfig(frontends=2, prefill_workers=1, decode_workers=1)
    with pytest.raises(ValueError, match="load_report_ms"):
        SimConfig(frontends=2, load_report_ms=0)
    with pytest.raises(ValueError, match="two routers or more"):
        Frontends([])
