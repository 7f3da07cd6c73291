"""The fleet simulator's event ordering on cases small enough to check by hand.

A timing profile with constant step times (prefill 10 ms, decode 2 ms, a step with both lasts
12 ms) makes every expected time a small sum.
"""
from __future__ import annotations

from typing import Any

import pytest

from turbine.bench.trace import MOONCAKE_BLOCK_TOKENS as B
from turbine.bench.trace import TraceRequest
from turbine.mocker.core import MockerConfig
from turbine.router.router import Router
from turbine.sim import SimConfig, Simulator, simulate

PREFILL, DECODE = 0.010, 0.002


def _cfg(profile: str, workers: int = 1, router: str = "round-robin", approx: bool = False, **kw: Any) -> SimConfig:
    return SimConfig(workers=workers, router=router, router_approx=approx,
                     mocker=MockerConfig(profile=profile, num_gpu_blocks=1024, **kw))


def _req(ms: float, n_in: int, n_out: int, ids: list[int]) -> TraceRequest:
    return TraceRequest(timestamp_ms=ms, input_length=n_in, output_length=n_out, hash_ids=tuple(ids))


def test_single_request_timeline(flat_profile: str) -> None:
    res = simulate([_req(0, 100, 3, [1])], _cfg(flat_profile))
    (r,) = res.results
    assert r.ok and r.ttft_s == pytest.approx(PREFILL)
    assert r.itl_s == pytest.approx([DECODE, DECODE])
    assert r.e2e_s == pytest.approx(PREFILL + 2 * DECODE)
    assert (r.prompt_tokens, r.output_tokens, r.cached_tokens) == (100, 3, 0)
    assert res.duration_s == pytest.approx(PREFILL + 2 * DECODE)
    assert res.stats.steps == 3


def test_arrival_mid_step_joins_the_next_step(flat_profile: str) -> None:
    # A prefills in [0, 10) ms; B arrives at 5 ms and joins step 2 = A's decode + B's prefill
    # (12 ms), so B's first token is at 22 ms and A's first gap is 12 ms.
    res = simulate([_req(0, 100, 3, [1]), _req(5, 100, 2, [2])], _cfg(flat_profile))
    a, b = res.results
    assert a.ttft_s == pytest.approx(PREFILL)
    assert a.itl_s[0] == pytest.approx(PREFILL + DECODE)
    assert b.ttft_s == pytest.approx(0.022 - 0.005)
    assert b.itl_s == pytest.approx([DECODE])  # step 3: both decode


def test_simultaneous_arrivals_share_a_step(flat_profile: str) -> None:
    res = simulate([_req(0, 100, 2, [1]), _req(0, 200, 2, [2])], _cfg(flat_profile))
    assert [r.ttft_s for r in res.results] == pytest.approx([PREFILL, PREFILL])
    assert res.stats.steps == 2


def test_workers_run_in_parallel(flat_profile: str) -> None:
    reqs = [_req(0, 100, 2, [1]), _req(0, 100, 2, [2]), _req(1, 100, 2, [3])]
    res = simulate(reqs, _cfg(flat_profile, workers=2))
    assert res.stats.requests_per_worker == [2, 1] or res.stats.requests_per_worker == [1, 2]
    ttfts = sorted(r.ttft_s for r in res.results)
    # Two start at 0 on different workers; the third waits for its worker's step to end at 10 ms.
    assert ttfts[:2] == pytest.approx([PREFILL, PREFILL])
    assert ttfts[2] > PREFILL


def test_speed_compresses_arrivals(flat_profile: str) -> None:
    reqs = [_req(0, 100, 2, [1]), _req(1000, 100, 2, [2])]
    res = simulate(reqs, _cfg(flat_profile, workers=2))
    assert res.arrivals_s == [0.0, 1.0]
    res4 = simulate(reqs, SimConfig(workers=2, router="round-robin", speed=4.0,
                                    mocker=MockerConfig(profile=flat_profile, num_gpu_blocks=1024)))
    assert res4.arrivals_s == [0.0, 0.25]
    assert res4.duration_s == pytest.approx(0.25 + PREFILL + DECODE)


def test_prefix_cache_hit_on_the_same_worker(flat_profile: str) -> None:
    # The second request arrives after the first finished and shares its two 512-token blocks.
    reqs = [_req(0, 2 * B, 2, [1, 2]), _req(100, 3 * B, 2, [1, 2, 3])]
    res = simulate(reqs, _cfg(flat_profile))
    assert [r.cached_tokens for r in res.results] == [0, 2 * B]
    from turbine.bench.report import hit_rate

    assert hit_rate(res.results) == pytest.approx(2 * B / (5 * B))


class RecordingRouter:
    """The real kv Router, with every call the simulator makes logged with the virtual time."""

    def __init__(self, sim_now: Any) -> None:
        self.inner = Router("kv", block_size=64, seed=0)
        self.now = sim_now
        self.log: list[tuple[float, str, str]] = []

    def route(self, rid: str, candidates: list[str], tokens: Any, **kw: Any) -> Any:
        self.log.append((self.now(), "route", rid))
        return self.inner.route(rid, candidates, tokens, **kw)

    def first_token(self, rid: str) -> None:
        self.log.append((self.now(), "first_token", rid))
        self.inner.first_token(rid)

    def finished(self, rid: str) -> None:
        self.log.append((self.now(), "finished", rid))
        self.inner.finished(rid)

    def apply_kv_events(self, worker: str, events: list[Any], ts: float | None = None) -> bool:
        self.log.append((self.now(), "kv_events", worker))
        return self.inner.apply_kv_events(worker, events)


def test_router_sees_events_and_tokens_at_step_end(flat_profile: str) -> None:
    sim = Simulator([_req(0, 2 * B, 2, [1, 2]), _req(3, 100, 1, [9])], _cfg(flat_profile, router="kv"))
    rec = RecordingRouter(lambda: sim.now)
    sim.router = rec  # type: ignore[assignment]
    sim.run()
    log = [(round(t * 1e3, 6), what, who) for t, what, who in rec.log]
    assert log == [
        (0.0, "route", "req-0"),
        (3.0, "route", "req-1"),
        # step 1 (0-10 ms): req-0's prefill stores its 16 full blocks; its first token
        (10.0, "kv_events", "worker-0"),
        (10.0, "first_token", "req-0"),
        # step 2 (10-22 ms): req-0 decodes its last token; req-1 prefills (one full block
        # stored) and its single token ends it
        (22.0, "kv_events", "worker-0"),
        (22.0, "finished", "req-0"),
        (22.0, "first_token", "req-1"),
        (22.0, "finished", "req-1"),
    ]


def test_results_are_deterministic(flat_profile: str) -> None:
    reqs = [_req(i * 3.0, 300 + 20 * i, 5, [i % 3, 10 + i]) for i in range(30)]
    a = simulate(reqs, _cfg(flat_profile, workers=3, router="random"))
    b = simulate(reqs, _cfg(flat_profile, workers=3, router="random"))
    assert [(r.ttft_s, r.e2e_s, r.cached_tokens) for r in a.results] == \
        [(r.ttft_s, r.e2e_s, r.cached_tokens) for r in b.results]


def test_request_that_cannot_fit_is_an_error(flat_profile: str) -> None:
    cfg = SimConfig(workers=1, router="round-robin",
                    mocker=MockerConfig(profile=flat_profile, num_gpu_blocks=4, context_length=100_000))
    res = simulate([_req(0, 2 * B, 2, [1, 2]), _req(1, 100, 2, [3])], cfg)
    assert not res.results[0].ok and "KV blocks" in (res.results[0].error or "")
    assert res.results[1].ok


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="workers"):
        SimConfig(workers=0)
    with pytest.raises(ValueError, match="unknown router"):
        SimConfig(router="fastest")
    with pytest.raises(ValueError, match="kv and predicted routers only"):
        SimConfig(router="random", router_approx=True)
    with pytest.raises(ValueError, match="speed"):
        SimConfig(speed=0)


def test_kv_routing_follows_the_cached_prefix(flat_profile: str) -> None:
    # A stores blocks [1, 2] on some worker; B arrives after A ended and shares them. kv must
    # send B there (the router learned it from KV events); round-robin sends it to the other.
    reqs = [_req(0, 2 * B, 2, [1, 2]), _req(100, 3 * B, 2, [1, 2, 3])]
    kv = simulate(reqs, _cfg(flat_profile, workers=2, router="kv"))
    assert [r.cached_tokens for r in kv.results] == [0, 2 * B]
    assert sorted(kv.stats.requests_per_worker) == [0, 2]
    assert kv.stats.kv_event_batches >= 2
    rr = simulate(reqs, _cfg(flat_profile, workers=2, router="round-robin"))
    assert [r.cached_tokens for r in rr.results] == [0, 0]
    assert rr.stats.requests_per_worker == [1, 1]
    approx = simulate(reqs, _cfg(flat_profile, workers=2, router="kv", approx=True))
    assert [r.cached_tokens for r in approx.results] == [0, 2 * B]  # remembered its own decision
    assert approx.stats.kv_event_batches == 0


def test_queue_limit_holds_requests_at_the_frontend_in_arrival_order(flat_profile: str) -> None:
    """Six requests at once on two workers with room for one waiting request each: four wait in
    the frontend's queue and are admitted oldest first as first tokens free the workers."""
    reqs = [_req(0, 100, 2, [i]) for i in range(6)]
    cfg = SimConfig(workers=2, router="predicted", router_max_queued=1,
                    mocker=MockerConfig(profile=flat_profile, num_gpu_blocks=1024))
    sim = Simulator(reqs, cfg)
    most = []
    real_route = sim.router.route

    def route(*a: Any, **kw: Any) -> Any:
        most.append(max((ld.queued for ld in sim.router.loads.workers.values()), default=0))
        return real_route(*a, **kw)
    sim.router.route = route  # type: ignore[method-assign]
    res = sim.run()
    assert all(r.ok for r in res.results) and res.stats.queued == 4
    assert max(most) <= 1  # never more than one request waiting on a worker
    ttfts = [r.ttft_s for r in res.results]
    assert ttfts[:2] == pytest.approx([PREFILL, PREFILL])
    assert ttfts == sorted(ttfts)  # admitted in arrival order
    # without the limit all six go straight to the workers
    free = simulate(reqs, SimConfig(workers=2, router="predicted",
                                    mocker=MockerConfig(profile=flat_profile, num_gpu_blocks=1024)))
    assert free.stats.queued == 0 and all(r.ok for r in free.results)


def test_predicted_policy_runs_on_kv_events(flat_profile: str) -> None:
    """The predicted router reads the same KV events as kv: a repeated prefix is a hit."""
    reqs = [_req(0, 4 * B, 2, [1, 2, 3, 4]), _req(100, 4 * B, 2, [1, 2, 3, 4])]
    res = simulate(reqs, _cfg(flat_profile, workers=4, router="predicted"))
    assert res.results[1].cached_tokens and res.results[1].cached_tokens >= 3 * B
