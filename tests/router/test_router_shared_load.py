"""Load that several frontends share (worker reports reconciled with a router's own requests),
and the per-worker queue limit."""
from __future__ import annotations

from turbine.protocols.load import WorkerLoad
from turbine.router.router import Router

WORKERS = ["w0", "w1", "w2", "w3"]
PROMPT = list(range(4000))


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def report(worker: str, *routers: Router) -> WorkerLoad:
    """What the worker would publish: every frontend's requests on it (none has a first token yet)."""
    waiting = prefill = blocks = 0
    for r in routers:
        ld = r.loads.workers.get(worker)
        if ld is not None:
            own = ld.own()
            waiting += own[3]
            prefill += own[1]
            blocks += own[2]
    return WorkerLoad(worker_id=worker, model_name="m", kv_active_blocks=blocks, kv_total_blocks=16384,
                      num_running=0, num_waiting=waiting, prefill_tokens=prefill)


def frontends(shared: bool, seed: int, clock: Clock) -> tuple[Router, Router]:
    a = Router("predicted", block_size=64, seed=seed, clock=clock, shared_load=shared)
    b = Router("predicted", block_size=64, seed=seed + 1000, clock=clock, shared_load=shared)
    for r in (a, b):
        for w in WORKERS:
            r.worker_added(w, 16384)
    return a, b


def test_a_second_frontend_avoids_the_workers_the_first_one_filled() -> None:
    clock = Clock()
    piled = 0
    for seed in range(40):
        for shared in (True, False):
            a, b = frontends(shared, seed, clock)
            busy = {a.route(f"a{i}", WORKERS, PROMPT).worker_id for i in range(3)}  # type: ignore[union-attr]
            assert len(busy) == 3  # a spreads its own requests
            for w in WORKERS:
                b.reported_load(report(w, a, b))
            d = b.route("b0", WORKERS, PROMPT)
            assert d is not None
            if shared:
                assert d.worker_id not in busy  # the one worker nobody uses
            else:
                piled += d.worker_id in busy
    assert piled > 10  # blind to a's requests, b lands on a busy worker most of the time


def test_reports_are_not_counted_twice_and_lapse() -> None:
    clock = Clock()
    a, b = frontends(True, 0, clock)
    for i in range(2):
        a.loads.routed(f"a{i}", "w0", 4000)
    b.loads.routed("b0", "w0", 4000)
    a.reported_load(report("w0", a, b))
    ld = a.loads.workers["w0"]
    assert (ld.queued, ld.prefill_tokens, ld.foreign_queued) == (3, 12000, 1)  # b's one request, once
    assert a.loads.workers["w0"].own() == (2, 8000, 126, 2)
    a.first_token("a0")  # own changes keep the foreign part
    assert (ld.queued, ld.prefill_tokens) == (2, 8000)
    clock.t = 2.9
    a.route("probe", ["w1"], PROMPT)
    assert ld.foreign_queued == 1
    clock.t = 3.1  # no report for longer than stale_s: b's share is forgotten
    a.route("probe2", ["w1"], PROMPT)
    assert (ld.queued, ld.prefill_tokens, ld.foreign_queued) == (1, 4000, 0)
    # a report that says less than a's own bookkeeping never goes negative
    a.reported_load(WorkerLoad(worker_id="w0", model_name="m", kv_active_blocks=0, kv_total_blocks=1,
                               num_running=0, num_waiting=0))
    assert (ld.queued, ld.prefill_tokens) == (1, 4000)
    # a router that ignores reports
    c = Router("predicted", block_size=64, shared_load=False)
    c.worker_added("w0", 16384)
    c.reported_load(report("w0", a, b))
    assert c.loads.workers["w0"].queued == 0


def test_queue_limit_declines_when_every_worker_is_full_and_signals_capacity() -> None:
    r = Router("predicted", block_size=64, seed=0, max_queued=1)
    kicks = []
    r.on_capacity = lambda: kicks.append(1)
    for w in ("w0", "w1"):
        r.worker_added(w, 16384)
    first = [r.route(f"r{i}", ["w0", "w1"], PROMPT) for i in range(2)]
    assert {d.worker_id for d in first if d is not None} == {"w0", "w1"}
    assert r.route("r2", ["w0", "w1"], PROMPT) is None and r.stats.declined == 1
    n = len(kicks)
    r.first_token("r0")
    assert len(kicks) == n + 1
    d = r.route("r2", ["w0", "w1"], PROMPT)
    assert d is not None and d.worker_id == first[0].worker_id  # type: ignore[union-attr]
    # the kv and load-only policies honour the limit too
    for policy in ("kv", "round-robin"):
        q = Router(policy, block_size=64, max_queued=2)
        assert [q.route(f"x{i}", ["w"], PROMPT) is None for i in range(3)] == [False, False, True]


def test_a_report_that_still_counts_a_finished_own_request_adds_no_phantom_load() -> None:
    """The worker's report was taken while our request ran; it arrives after the request ended."""
    clock = Clock()
    a, _ = frontends(True, 0, clock)
    a.reported_load(report("w0", a))  # reports flow: peaks are kept from here on
    a.route("r", ["w0"], PROMPT)
    late = report("w0", a)  # taken now...
    a.finished("r")
    a.reported_load(late)  # ...received after the request finished
    ld = a.loads.workers["w0"]
    assert (ld.active_requests, ld.queued, ld.prefill_tokens, ld.decode_blocks) == (0, 0, 0, 0)
    # the next report, without the request, leaves it at zero too; another frontend's request
    # that arrives under no own peak is seen at once
    a.reported_load(report("w0", a))
    other = Router("predicted", block_size=64, clock=clock)
    other.worker_added("w0", 16384)
    other.loads.routed("o", "w0", 4000)
    a.reported_load(report("w0", a, other))
    assert (ld.queued, ld.prefill_tokens) == (1, 4000)


def test_the_first_report_a_router_hears_is_reconciled_with_its_peak_too() -> None:
    """A frontend that routes before any report reached it (a restart whose index a snapshot
    rebuilt at once): the worker's first report, taken while our request ran, arrives after it
    ended. It must not become another frontend's load, which would send the next request for the
    same prefix to a worker without it (the late-frontend e2e test failed that way)."""
    clock = Clock()
    a, _ = frontends(True, 0, clock)
    a.route("r", ["w0"], PROMPT)  # no report heard yet
    late = report("w0", a)
    a.finished("r")
    a.reported_load(late)
    ld = a.loads.workers["w0"]
    assert (ld.active_requests, ld.queued, ld.prefill_tokens, ld.decode_blocks) == (0, 0, 0, 0)
    assert not a.loads._foreign
    # the peak was used up by that report: another frontend's request is seen at the next one
    other = Router("predicted", block_size=64, clock=clock)
    other.worker_added("w0", 16384)
    other.loads.routed("o", "w0", 4000)
    a.reported_load(report("w0", a, other))
    assert (ld.queued, ld.prefill_tokens) == (1, 4000)


def test_a_predicted_hit_is_not_reported_back_as_queue() -> None:
    """The worker reports a waiting prompt whole; the router counted only its uncached part."""
    clock = Clock()
    a, _ = frontends(True, 0, clock)
    a.reported_load(report("w0", a))
    a.loads.routed("hit", "w0", 4000, cached_tokens=3840)  # 160 tokens to compute
    a.reported_load(WorkerLoad(worker_id="w0", model_name="m", kv_active_blocks=63, kv_total_blocks=16384,
                               num_running=0, num_waiting=1, prefill_tokens=4000))
    ld = a.loads.workers["w0"]
    assert (ld.prefill_tokens, ld.foreign_prefill_tokens, ld.queued) == (160, 0, 1)
