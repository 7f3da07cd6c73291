"""A fleet on a virtual clock: the frontend's Router and one MockerCore per worker, no sockets.

Time jumps from event to event. Two kinds of event exist:

    arrival    (trace time / speed)  route the request, queue it on its worker
    step end   (step start + modeled duration)  the step's KV events reach the router, its
               tokens reach the client (first token -> router.first_token, last -> finished)

    t ─┬─ step ends at t (workers in id order) ─┬─ arrivals at t ─┬─ idle workers with work
       │                                        │                 │  start a step at t
       ▼                                        ▼                 ▼
    a worker steps while it has work; a request arriving mid-step joins the worker's next
    step, exactly as in MockEngine, whose loop is: step(), sleep the duration, deliver.

Only busy workers have a pending event (one each, in a heap keyed by end time); arrivals are
read from the sorted trace, so the heap never holds more than the number of workers.

A disaggregated fleet (``prefill_workers`` and ``decode_workers``) adds a third event, the end
of a KV pull, and the frontend's path through it:

    arrival ─▶ decide (turbine/disagg: effective prompt, prefill queue)
       remote: a prefill worker runs the prompt (max_tokens 1, KV held) ─▶ first token to the
               client ─▶ the decode worker (its own overlap and load) admits it, its scheduler
               orders a pull ─▶ pull ends after the modelled copy (one link per decode worker,
               copies in order) ─▶ finish_pull, the prefill worker releases ─▶ decode
       local:  the decode worker serves it whole

Each request's TTFT splits into queue (arrival to its first scheduled step), prefill (to the
first token), and for remote ones transfer (first token to the end of the pull) and first
decode (to the decode worker's first token).
"""
from __future__ import annotations

import heapq
import json
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from turbine.bench.stats import RequestResult
from turbine.bench.trace import DEFAULT_VOCAB_SIZE, TokenSynth, TraceRequest, arrival_offsets_s
from turbine.disagg.decision import DECISIONS, DisaggConfig, decide
from turbine.engine.scheduler import PullOrder
from turbine.engine.step import StepResult
from turbine.kvbm.tiered import TierSource
from turbine.mocker.core import DecodeRun, MockerConfig, MockerCore
from turbine.protocols.generate import GenerateRequest, SamplingOptions, StopConditions
from turbine.protocols.kv_transfer import AgentInfo, KvTransferParams, KvTransferRequest
from turbine.protocols.model_card import WorkerTiming
from turbine.protocols.load import WorkerLoad
from turbine.router.policies import POLICIES
from turbine.router.router import Router
from turbine.sim.frontends import Frontends

_DEFERRED: Any = object()  # a pending marker: the worker's plain decodes start after the others at t
_DECLINED = -2  # _arrive: no worker admits the request now


class SimConfig(msgspec.Struct, frozen=True, kw_only=True):
    """One simulated fleet. ``mocker`` is every worker's engine config (same as `turbine serve`)."""

    workers: int = 8
    router: str = "predicted"
    router_approx: bool = False  # kv without KV events: the router remembers its own decisions
    router_temperature: float = 0.0
    overlap_weight: float = 1.0
    router_max_itl_ms: float = 0.0  # predicted policy's ITL guard (0: none)
    router_max_queued: int = 0  # requests a worker may have waiting for a first token (0: no limit)
    speed: float = 1.0  # arrival times are divided by this
    vocab_size: int = DEFAULT_VOCAB_SIZE
    seed: int = 0
    mocker: MockerConfig = msgspec.field(default_factory=MockerConfig)
    # Disaggregated: this many prefill and decode workers instead of ``workers`` aggregated ones.
    prefill_workers: int = 0
    decode_workers: int = 0
    prefill_mocker: MockerConfig | None = None  # the prefill workers' engine, when it differs from ``mocker``
    min_remote_prefill_tokens: int = 512
    max_prefill_queue_tokens: int = 32768
    # Several frontends, each its own router (sim/frontends.py): requests alternate between them;
    # each learns of the others' requests from the workers' load reports every ``load_report_ms``.
    frontends: int = 1
    load_report_ms: float = 10.0  # a live worker publishes at most every LOAD_MIN_INTERVAL_S
    router_own_load_only: bool = False  # the frontends ignore the reports (each blind to the others)

    def __post_init__(self) -> None:
        if (self.prefill_workers > 0) != (self.decode_workers > 0) or min(self.prefill_workers,
                                                                            self.decode_workers) < 0:
            raise ValueError("a disaggregated fleet needs both prefill_workers and decode_workers (>= 1)")
        if self.workers < 1 and not self.disaggregated:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.router not in POLICIES:
            raise ValueError(f"unknown router {self.router!r}; choose one of {', '.join(POLICIES)}")
        if self.router_approx and self.router not in ("kv", "predicted"):
            raise ValueError("router_approx applies to the kv and predicted routers only")
        if self.router_max_itl_ms < 0 or self.router_max_queued < 0:
            raise ValueError("router_max_itl_ms and router_max_queued must be >= 0 (0: off)")
        if not (self.speed > 0 and math.isfinite(self.speed)):
            raise ValueError(f"speed must be a positive number, got {self.speed}")
        if self.router_temperature < 0:
            raise ValueError(f"router_temperature must be >= 0, got {self.router_temperature}")
        if self.frontends < 1:
            raise ValueError(f"frontends must be >= 1, got {self.frontends}")
        if self.frontends > 1 and self.disaggregated:
            raise ValueError("several frontends are simulated for aggregated fleets only")
        if not (self.load_report_ms > 0 and math.isfinite(self.load_report_ms)):
            raise ValueError(f"load_report_ms must be a positive number, got {self.load_report_ms}")

    @property
    def disaggregated(self) -> bool:
        return self.prefill_workers > 0

    @property
    def num_workers(self) -> int:
        return self.prefill_workers + self.decode_workers if self.disaggregated else self.workers

    def disagg(self) -> DisaggConfig:
        return DisaggConfig(min_remote_prefill_tokens=self.min_remote_prefill_tokens,
                            max_prefill_queue_tokens=self.max_prefill_queue_tokens)

    def label(self) -> str:
        base = "kv-approx" if self.router_approx else self.router
        return f"{base} {self.prefill_workers}P:{self.decode_workers}D" if self.disaggregated else base


@dataclass
class SimStats:
    """How the simulation itself went (not what it simulated)."""

    wall_s: float = 0.0
    steps: int = 0
    preemptions: int = 0
    kv_event_batches: int = 0
    requests_per_worker: list[int] = field(default_factory=list)
    decisions: dict[str, int] = field(default_factory=dict)  # disaggregated: where prompts were prefilled
    pulled_blocks: int = 0
    queued: int = 0  # requests that waited in the frontend's queue (no worker admitted them on arrival)
    onboarded_blocks: int = 0  # copied up from host/disk KV tiers
    ttft_split: dict[str, float] = field(default_factory=dict)  # medians (ms) of the TTFT parts

    def to_dict(self) -> dict[str, Any]:
        out = {"wall_s": round(self.wall_s, 3), "steps": self.steps, "preemptions": self.preemptions,
               "kv_event_batches": self.kv_event_batches, "requests_per_worker": list(self.requests_per_worker)}
        if self.decisions:
            out.update(decisions=dict(self.decisions), pulled_blocks=self.pulled_blocks)
        if self.onboarded_blocks:
            out["onboarded_blocks"] = self.onboarded_blocks
        if self.queued:
            out["queued"] = self.queued
        if self.ttft_split:
            out["ttft_split_p50_ms"] = dict(self.ttft_split)
        return out


@dataclass
class SimResult:
    """Per-request results in trace order, their arrival times, and the virtual duration."""

    results: list[RequestResult]
    arrivals_s: list[float]
    duration_s: float
    stats: SimStats


class _Track:
    """One request's timeline as the client would see it (times in virtual seconds)."""

    __slots__ = ("arrival", "first", "itl", "last", "started", "pulled", "decode_first", "remote", "index",
                 "output_length", "prompt", "cached")

    def __init__(self, arrival: float, index: int = -1) -> None:
        self.arrival = arrival
        self.first = -1.0
        self.last = -1.0
        self.itl: list[float] = []
        self.started = -1.0  # its first scheduled step began
        self.pulled = -1.0  # its KV pull ended (remote prefill)
        self.decode_first = -1.0  # the decode worker's first token (remote prefill)
        self.remote = False
        self.index = index
        self.output_length = 0
        self.prompt: list[int] = []
        self.cached = 0


def make_router(cfg: SimConfig, clock: Callable[[], float], *, queue: bool = True) -> Router:
    """The frontend's Router, configured as `turbine serve --router ...` would be (``queue``: with
    the per-worker queue limit; a disaggregated fleet's prefill pool has none)."""
    return Router(cfg.router, block_size=cfg.mocker.block_size, overlap_weight=cfg.overlap_weight,
                  temperature=cfg.router_temperature, approx=cfg.router_approx, seed=cfg.seed, clock=clock,
                  max_itl_s=cfg.router_max_itl_ms / 1e3 if cfg.router_max_itl_ms else math.inf,
                  max_queued=cfg.router_max_queued if queue else 0, shared_load=not cfg.router_own_load_only)


def card_timing(mocker: MockerConfig) -> WorkerTiming:
    """What a mocker worker's card would announce (turbine/launch.py ``card_timing``)."""
    profile = None
    if mocker.profile:
        with open(mocker.profile, encoding="utf-8") as f:
            profile = json.load(f)
    return WorkerTiming(max_num_batched_tokens=mocker.max_num_batched_tokens, speedup_ratio=mocker.speedup_ratio,
                        profile=profile)


class Simulator:
    """Replays ``requests`` through the simulated fleet of ``cfg``; call ``run()`` once."""

    def __init__(self, requests: Sequence[TraceRequest], cfg: SimConfig, *,
                 on_finish: Callable[[], None] | None = None,
                 on_complete: Callable[[RequestResult, float], None] | None = None) -> None:
        if not requests:
            raise ValueError("no requests to simulate")
        self.cfg = cfg
        self.requests = list(requests)
        self.arrivals = arrival_offsets_s(self.requests, cfg.speed)
        self.now = 0.0
        clock = lambda: self.now  # noqa: E731
        # aggregated or decode workers: the frontend's router, or several frontends' (sim/frontends.py)
        self.router: Router | Frontends = make_router(cfg, clock) if cfg.frontends == 1 else \
            Frontends([make_router(cfg, clock) for _ in range(cfg.frontends)])
        self.prefill_router = make_router(cfg, clock, queue=False)
        if cfg.disaggregated:
            self.worker_ids = ([f"prefill-{i}" for i in range(cfg.prefill_workers)]
                               + [f"decode-{i}" for i in range(cfg.decode_workers)])
        else:
            self.worker_ids = [f"worker-{i}" for i in range(cfg.workers)]
        self.prefill_ids = [w for w in self.worker_ids if w.startswith("prefill-")]
        self.generate_ids = [w for w in self.worker_ids if not w.startswith("prefill-")]
        self._index = {w: i for i, w in enumerate(self.worker_ids)}
        self.cores = [MockerCore(cfg.prefill_mocker if w.startswith("prefill-") and cfg.prefill_mocker else cfg.mocker,
                                 vocab_size=cfg.vocab_size, rng_seed=cfg.seed * 1_000_003 + i, clock=clock)
                      for i, w in enumerate(self.worker_ids)]
        self._timings: dict[int, WorkerTiming] = {}
        for w, core in zip(self.worker_ids, self.cores):
            self._announce(w, core)
        # requests no worker could admit (route() said None), oldest first: the frontend's queue
        self._queue: deque[tuple[int, float]] = deque()
        self._capacity = False
        self.router.on_capacity = self._on_capacity
        self.synth = TokenSynth(cfg.vocab_size, seed=cfg.seed)
        self.disagg = cfg.disagg()
        n = cfg.num_workers
        self._pending: list[StepResult | DecodeRun | None] = [None] * n  # the step(s) each busy worker runs
        self._ends = [0.0] * n  # when each busy worker's pending step(s) end
        self._heap: list[tuple[float, int]] = []  # (end time, worker) of every pending step
        self._prefill_idx = [self._index[w] for w in self.prefill_ids]
        self._next_arrival = math.inf  # the first arrival not routed yet
        self._deferred: list[int] = []  # disaggregated: decode workers whose plain decodes run last at t
        # the fast path (runs of plain decode steps) for every worker that decodes step by step
        self._plain_decodes = [not core.pipelined and not w.startswith("prefill-")
                               for core, w in zip(self.cores, self.worker_ids)]
        self._pulls: list[tuple[float, int, int, PullOrder]] = []  # (end, tie, decode worker, order)
        self._link_free = [0.0] * n  # when each decode worker's link finishes the copies queued on it
        self._holders: dict[str, int] = {}  # held transfer id -> prefill worker
        self._tracks: dict[str, _Track] = {}
        self._results: list[RequestResult | None] = [None] * len(self.requests)
        self._split: dict[str, list[float]] = {"queue": [], "prefill": [], "transfer": [], "first_decode": []}
        self._on_finish = on_finish
        self._on_complete = on_complete  # (result, virtual time) for every request that ends
        # a dynamic fleet (the planner's virtual connector): timers, workers starting and draining
        self._timers: list[tuple[float, int, Callable[[float], None]]] = []  # (time, tie, callback)
        self._draining: set[int] = set()
        self.retired: dict[str, float] = {}  # drained worker -> when it went idle and left
        self.stats = SimStats(requests_per_worker=[0] * n,
                              decisions=dict.fromkeys(DECISIONS, 0) if cfg.disaggregated else {})
        self._uses_events = cfg.router in ("kv", "predicted") and not cfg.router_approx
        self._ran = False
        self._tie = 0
        if cfg.frontends > 1:
            self.at(cfg.load_report_ms / 1e3, self._report_loads)

    def _announce(self, worker_id: str, core: MockerCore) -> None:
        """The worker's card reached the router: its KV capacity and timing."""
        timing = self._timings.get(id(core.config))
        if timing is None:
            timing = self._timings[id(core.config)] = card_timing(core.config)
        router = self.prefill_router if worker_id.startswith("prefill-") else self.router
        router.worker_added(worker_id, core.config.num_gpu_blocks, timing)

    def _on_capacity(self) -> None:
        self._capacity = True

    def _report_loads(self, t: float) -> None:
        """Every worker's published load reaches every frontend (several frontends only), as
        ``Worker.current_load`` builds it; again after ``load_report_ms`` while anything is left
        to happen (a queue alone, with every worker idle, changes no load)."""
        for w, core in zip(self.worker_ids, self.cores):
            if w in self.retired:
                continue
            s = core.stats()
            self.router.reported_load(WorkerLoad(
                worker_id=w, model_name="sim", kv_active_blocks=s.kv_active_blocks, kv_total_blocks=s.kv_total_blocks,
                num_running=s.num_running, num_waiting=s.num_waiting, prefill_tokens=s.prefill_tokens, ts=t))
        if self._heap or self._pulls or self._next_arrival < math.inf or t < self.arrivals[-1]:
            self.at(t + self.cfg.load_report_ms / 1e3, self._report_loads)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> SimResult:
        if self._ran:
            raise RuntimeError("a Simulator runs once; build a new one")
        self._ran = True
        wall0 = time.perf_counter()
        heap, pulls, arrivals, pending = self._heap, self._pulls, self.arrivals, self._pending
        n, i = len(arrivals), 0
        inf = math.inf
        timers = self._timers
        while heap or pulls or i < n or self._queue:
            t = min(heap[0][0] if heap else inf, pulls[0][0] if pulls else inf, arrivals[i] if i < n else inf)
            if t == inf and not timers:  # only queued requests are left, and no worker will free up
                self._fail_queued("no worker admitted the request")
                break
            if timers and timers[0][0] <= t:  # a timer first: what it changes holds for events at its time
                self.now = t = timers[0][0]
                heapq.heappop(timers)[2](t)
                continue
            self.now = t
            kicked: list[int] = []
            while heap and heap[0][0] == t:
                w = heapq.heappop(heap)[1]
                kicked += self._deliver(w, t)
                kicked.append(w)
            while pulls and pulls[0][0] == t:
                _, _, w, order = heapq.heappop(pulls)
                kicked += self._pull_done(w, order)
            if self._queue and self._capacity:
                kicked += self._retry_queued(t)
            while i < n and arrivals[i] == t:
                if self._queue:  # others wait already: in line behind them
                    self._queue.append((i, t))
                    self.stats.queued += 1
                else:
                    w = self._arrive(i, t)
                    if w >= 0:
                        kicked.append(w)
                i += 1
            self._next_arrival = arrivals[i] if i < n else inf
            for w in kicked:
                if pending[w] is None:
                    self._start_step(w, t)
            if self._deferred:
                for w in self._deferred:
                    pending[w] = None
                    if not self._start_plain_decodes(w, t):
                        self._step(w, t)
                self._deferred.clear()
            if self._draining:
                self._retire_idle(t)
        self.stats.wall_s = time.perf_counter() - wall0
        if self.cfg.disaggregated:
            self.stats.ttft_split = {k: round(statistics.median(v) * 1e3, 3) for k, v in self._split.items() if v}
        results = [r if r is not None else RequestResult(ok=False, error="never finished") for r in self._results]
        return SimResult(results, self.arrivals, max(self.now, 1e-9), self.stats)

    # -- a dynamic fleet (turbine/planner/connectors/virtual.py drives it) ---------------------
    def at(self, t: float, callback: Callable[[float], None]) -> None:
        """Call ``callback(t)`` at virtual time ``t`` (while the fleet still has requests to serve)."""
        self._tie += 1
        heapq.heappush(self._timers, (t, self._tie, callback))

    def add_worker(self, role: str, ready_in_s: float = 0.0) -> str:
        """A new ``role`` worker ("agg", "prefill" or "decode"), routable ``ready_in_s`` from now
        (its model loading); its id."""
        if role not in ("agg", "prefill", "decode") or (role == "agg") == self.cfg.disaggregated:
            raise ValueError(f"a {'disaggregated' if self.cfg.disaggregated else 'aggregated'} fleet has no {role!r} pool")
        prefix = "worker" if role == "agg" else role
        wid = f"{prefix}-{sum(1 for w in self.worker_ids if w.startswith(prefix + '-'))}"
        w = len(self.worker_ids)
        clock = lambda: self.now  # noqa: E731
        mocker = self.cfg.prefill_mocker if role == "prefill" and self.cfg.prefill_mocker else self.cfg.mocker
        self.cores.append(MockerCore(mocker, vocab_size=self.cfg.vocab_size, rng_seed=self.cfg.seed * 1_000_003 + w,
                                     clock=clock))
        self.worker_ids.append(wid)
        self._index[wid] = w
        self._pending.append(None)
        self._ends.append(0.0)
        self._link_free.append(0.0)
        self._plain_decodes.append(not self.cores[w].pipelined and role != "prefill")
        self.stats.requests_per_worker.append(0)

        def ready(_t: float) -> None:
            if w in self._draining or wid in self.retired:
                return
            self._announce(wid, self.cores[w])
            if role == "prefill":
                self.prefill_ids.append(wid)
                self._prefill_idx.append(w)
            else:
                self.generate_ids.append(wid)
        if ready_in_s > 0:
            self.at(self.now + ready_in_s, ready)
        else:
            ready(self.now)
        return wid

    def drain_worker(self, worker_id: str) -> None:
        """Stop routing to ``worker_id``; it finishes what it holds, then leaves (``retired``)."""
        w = self._index[worker_id]
        if w in self._draining or worker_id in self.retired:
            return
        for ids in (self.generate_ids, self.prefill_ids):
            if worker_id in ids:
                ids.remove(worker_id)
        if w in self._prefill_idx:
            self._prefill_idx.remove(w)
        self._draining.add(w)
        self._retire_idle(self.now)

    def routable(self, worker_id: str) -> bool:
        return worker_id in self.generate_ids or worker_id in self.prefill_ids

    def _retire_idle(self, t: float) -> None:
        for w in [w for w in self._draining if self._pending[w] is None and self._idle(w)]:
            self._draining.discard(w)
            wid = self.worker_ids[w]
            self.retired[wid] = t
            router = self.prefill_router if wid.startswith("prefill-") else self.router
            router.worker_removed(wid)

    def _idle(self, w: int) -> bool:
        core = self.cores[w]
        return not core.has_work() and not core.scheduler.held and not core.scheduler.pulling

    # -- requests ----------------------------------------------------------------------------
    def _fail_queued(self, error: str) -> None:
        while self._queue:
            i, _ = self._queue.popleft()
            self._results[i] = RequestResult(ok=False, error=error)
            self._finished()

    def _retry_queued(self, t: float) -> list[int]:
        """Capacity freed up: route queued requests, oldest first, until one is declined again."""
        self._capacity = False
        kicked = []
        while self._queue:
            i, arrived = self._queue[0]
            w = self._arrive(i, t, arrived)
            if w == _DECLINED:
                break
            self._queue.popleft()
            if w >= 0:
                kicked.append(w)
        return kicked

    def _arrive(self, i: int, t: float, arrived: float | None = None) -> int:
        """Route request ``i`` and queue it on its worker; the worker index, -1 if rejected,
        _DECLINED if no worker admits it now (a new arrival then waits in the queue)."""
        self._deliver_run_events(t)  # the router reads its index now
        req = self.requests[i]
        ids = self.synth.prompt_array(req)  # the router hashes u32 arrays without converting
        tr = _Track(t if arrived is None else arrived, i)
        tr.output_length = req.output_length
        if self.cfg.disaggregated:
            decision = self._decide(ids)
            self.stats.decisions[decision] += 1
            if decision == "remote" and req.output_length >= 1:
                tr.remote = True
                tr.prompt = ids.tolist()
                pid = f"req-{i}.p"
                w = self._index[self.prefill_router.route(pid, self.prefill_ids, ids).worker_id]
                gen = GenerateRequest(request_id=pid, token_ids=tr.prompt, sampling=SamplingOptions(),
                                      stop=StopConditions(max_tokens=1, ignore_eos=True),
                                      kv_transfer=KvTransferRequest(hold_s=self.disagg.hold_s))
                return self._add(w, gen, tr, self.prefill_router, ids)
        rid = f"req-{i}"
        hashes = self.synth.prompt_block_hashes(req, self.cfg.mocker.block_size)  # the router's; memoised per hash id
        decision_ = self.router.route(rid, self.generate_ids, ids, local_hashes=hashes and hashes[0])
        if decision_ is None:
            if arrived is None:
                self._queue.append((i, t))
                self.stats.queued += 1
            return _DECLINED
        w = self._index[decision_.worker_id]
        gen = GenerateRequest(
            request_id=rid, token_ids=ids, sampling=SamplingOptions(),  # in process: the u32 array
            stop=StopConditions(max_tokens=req.output_length, min_tokens=req.output_length, ignore_eos=True),
            predicted_overlap_blocks=decision_.overlap_blocks,
        )
        return self._add(w, gen, tr, self.router, ids, hashes)

    def _decide(self, ids: Any) -> str:
        loads = self.prefill_router.loads.workers
        queued = [loads[w].prefill_tokens if w in loads else 0 for w in self.prefill_ids]
        cached = self.router.best_overlap(self.generate_ids, ids) * self.router.block_size
        return decide(len(ids), cached, queued, self.disagg)

    def _add(self, w: int, gen: GenerateRequest, tr: _Track, router: Router, ids: Any = None,
             block_hashes: tuple[list[int], list[int]] | None = None) -> int:
        """``block_hashes``: the prompt's (local, sequence) hashes at block size
        ``cfg.mocker.block_size``, if known."""
        core = self.cores[w]
        same = block_hashes and core.config.block_size == self.cfg.mocker.block_size
        try:
            core.add_request(gen, arrival_time=self.now, prompt_u32=ids,
                             block_hashes=block_hashes[1] if same else None,  # type: ignore[index]
                             local_hashes=block_hashes[0] if same else None,  # type: ignore[index]
                             ids_in_vocab=ids is not None and self.synth.vocab_size <= core.vocab_size)
        except ValueError as e:  # can never run on this engine (context, KV capacity)
            router.finished(gen.request_id)
            self._results[tr.index] = RequestResult(ok=False, error=str(e)[:200])
            if self._on_complete is not None:
                self._on_complete(self._results[tr.index], self.now)
            self._finished()
            return -1
        self._tracks[gen.request_id] = tr
        self.stats.requests_per_worker[w] += 1
        return w

    def _start_step(self, w: int, t: float) -> None:
        core = self.cores[w]
        if not core.has_work():
            return
        if self._plain_decodes[w]:
            if not self.cfg.disaggregated:
                if self._start_plain_decodes(w, t):
                    return
            elif core.scheduler.plain_decode_steps():  # run after every other start at t: a prefill
                self._pending[w] = _DEFERRED           # starting now may end before the run does
                self._deferred.append(w)
                return
        self._step(w, t)

    def _step(self, w: int, t: float) -> None:
        """One step of worker ``w`` starting at ``t`` (its outputs and events are delivered at its end)."""
        core = self.cores[w]
        res = core.step()
        self.stats.preemptions += res.num_preempted
        for order in res.pulls:
            self._start_pull(w, order, t)
        if not res.outputs and not core.in_flight:  # nothing fits now; freed blocks or an arrival kick it again
            self._apply_events(w, res, t, delivery=False)
            return
        self.stats.steps += 1
        self._pending[w] = res
        end = self._ends[w] = t + res.duration_s
        heapq.heappush(self._heap, (end, w))

    # -- the fast path: runs of plain decode steps ---------------------------------------------
    def _start_plain_decodes(self, w: int, t: float) -> bool:
        """Run at once worker ``w``'s plain decode steps (MockerCore.run_plain_decodes) that start
        before anything could reach it; their tokens are delivered when the last one ends.
        False (nothing done) if its next step is not a plain decode."""
        run = self.cores[w].run_plain_decodes(t, self._quiet_until(w))
        if run is None:
            return False
        self.stats.steps += len(run.ends)
        self._pending[w] = run
        end = self._ends[w] = run.ends[-1]
        heapq.heappush(self._heap, (end, w))
        return True

    def _quiet_until(self, w: int) -> float:
        """The first time anything could reach worker ``w``: the next arrival (the router may send
        it here), a KV pull ending here and, in a disaggregated fleet, any pull or prefill step
        ending (a prefill hands its request to a decode worker; a pull releases a prefill worker,
        which may then start a prefill)."""
        until = self._next_arrival
        disagg = self.cfg.disaggregated
        for end, _, pw, _ in self._pulls:
            if end < until and (pw == w or disagg):
                until = end
        if disagg:
            pending, ends = self._pending, self._ends
            for p in self._prefill_idx:
                if pending[p] is not None and ends[p] < until:
                    until = ends[p]
        return until

    def _deliver_run_events(self, t: float, reader: int | None = None, own: DecodeRun | None = None) -> None:
        """KV events of runs (MockerCore.run_plain_decodes) still held back, to the router in the
        order a step-by-step replay delivers them: by step end, then worker. Called before the
        router reads its index or takes other events: at an arrival (``reader`` None), every step
        that ended at or before ``t``; at worker ``reader``'s step end, those ended before ``t`` or
        at ``t`` on a lower worker, and all of ``own`` (the run of ``reader`` ending now). Only
        the router's reads can tell when an event arrived, so this keeps every result the same."""
        if not self._uses_events:
            return
        due: list[tuple[float, int, int, list[Any]]] = []
        for v, run in enumerate(self._pending):
            if type(run) is DecodeRun and run.events:
                ends, events = run.ends, run.events
                strict = reader is not None and v >= reader
                k = 0
                for i, batch in events:
                    if ends[i] > t or (strict and ends[i] == t):
                        break
                    due.append((ends[i], v, k, batch))
                    k += 1
                del events[:k]
        if own is not None and own.events:
            due += [(own.ends[i], reader, k, batch) for k, (i, batch) in enumerate(own.events)]  # type: ignore[misc]
            own.events.clear()
        if len(due) > 1:
            due.sort(key=lambda d: d[:3])
        ids = self.worker_ids
        for _, v, _, batch in due:
            self.stats.kv_event_batches += 1
            router = self.prefill_router if ids[v].startswith("prefill-") else self.router
            router.apply_kv_events(ids[v], batch)

    def _deliver_plain_decodes(self, run: DecodeRun) -> None:
        """Tokens of a run of decodes: one a step to each sequence (nothing else happens)."""
        ends = run.ends
        first, last = ends[0], ends[-1]
        gaps = [b - a for a, b in zip(ends, ends[1:])]
        tracks = self._tracks
        for rid in run.request_ids:
            tr = tracks[rid]
            tr.itl.append(first - tr.last)
            tr.itl += gaps
            tr.last = last

    def _apply_events(self, w: int, res: StepResult, t: float, delivery: bool = True) -> None:
        # Only exact kv routing reads the index; load policies and approx mode ignore events
        # (feeding them would cost ~15% of a run and change no decision).
        if res.kv_events and self._uses_events:
            # runs' events a step-by-step replay delivers before these (at the step's end: by
            # worker; at its start: every one ended by then)
            self._deliver_run_events(t, reader=w if delivery else None)
            self.stats.kv_event_batches += 1
            # no ts: the router takes it for a wall-clock stamp (its event-lag metric)
            router = self.prefill_router if self.worker_ids[w].startswith("prefill-") else self.router
            router.apply_kv_events(self.worker_ids[w], res.kv_events)

    def _deliver(self, w: int, t: float) -> list[int]:
        """The step of worker ``w`` ends at ``t``: events to the router, tokens to clients.
        Returns other workers this wakes (a decode worker given a prefilled request)."""
        res = self._pending[w]
        self._pending[w] = None
        if type(res) is DecodeRun:
            if res.events:
                self._deliver_run_events(t, reader=w, own=res)
            self._deliver_plain_decodes(res)
            return []
        assert res is not None
        self._apply_events(w, res, t)
        started = t - res.duration_s
        tracks = self._tracks
        woken: list[int] = []
        for out in res.outputs:
            rid = out.request_id
            tr = tracks[rid]
            if tr.started < 0:
                tr.started = started
            prefill_leg = rid.endswith(".p")
            if out.token_id is not None:
                if tr.first < 0:
                    tr.first = t
                    (self.prefill_router if prefill_leg else self.router).first_token(rid)
                else:
                    if tr.decode_first < 0 and tr.remote:
                        tr.decode_first = t
                        self.router.first_token(rid)
                    tr.itl.append(t - tr.last)
                tr.last = t
            if out.finish_reason is not None:
                if prefill_leg:
                    self._deliver_run_events(t, reader=w)  # it routes the decode leg
                    woken += self._prefill_done(w, rid, tr, out, t)
                else:
                    self.router.finished(rid)
                    if tr.remote:  # the decode leg's prompt held the first token too
                        self._complete(tr, len(tr.prompt), tr.cached, out.completion_tokens + 1, t)
                    else:
                        self._complete(tr, out.prompt_tokens, out.cached_tokens, out.completion_tokens, t)
                    del tracks[rid]
        return woken

    def _prefill_done(self, w: int, pid: str, tr: _Track, out: Any, t: float) -> list[int]:
        """A prefill leg finished: the request continues on a decode worker with the held KV."""
        self.prefill_router.finished(pid)
        del self._tracks[pid]
        tr.cached = out.cached_tokens
        held = out.held_kv
        if tr.output_length <= 1 or out.finish_reason != "length" or held is None:
            if held is not None:
                self.cores[w].release(pid)
            self._complete(tr, out.prompt_tokens, out.cached_tokens, 1, t)
            return []
        params = KvTransferParams(transfer_id=pid, worker_address=self.worker_ids[w], agent=AgentInfo(backend="mock"),
                                  block_ids=held.block_ids, block_hashes=held.block_hashes,
                                  num_tokens=held.num_tokens, hold_s=held.hold_s)
        self._holders[pid] = w
        did = pid[:-2]
        tokens = tr.prompt + [out.token_id]
        d = self._index[self.router.route(did, self.generate_ids, tokens, remote_kv=True).worker_id]
        n = tr.output_length - 1
        gen = GenerateRequest(request_id=did, token_ids=tokens, sampling=SamplingOptions(),
                              stop=StopConditions(max_tokens=n, min_tokens=n, ignore_eos=True),
                              kv_transfer=KvTransferRequest(source=params))
        if self._add(d, gen, tr, self.router) < 0:
            self.cores[w].release(pid)
            return []
        return [d]

    # -- KV pulls -----------------------------------------------------------------------------
    def _start_pull(self, w: int, order: PullOrder, t: float) -> None:
        if isinstance(order.source, TierSource):  # up from the worker's own host/disk tier
            self.stats.onboarded_blocks += len(order.local_blocks)
            self._tie += 1
            heapq.heappush(self._pulls, (t + self.cores[w].onboard_seconds(order.source), self._tie, w, order))
            return
        if not order.local_blocks:  # the decode worker's cache held it all
            self._release(order.source.transfer_id)
            return
        self.stats.pulled_blocks += len(order.local_blocks)
        start = max(t, self._link_free[w])
        end = start + self.cores[w].transfer_seconds(len(order.local_blocks))
        self._link_free[w] = end
        self._tie += 1
        heapq.heappush(self._pulls, (end, self._tie, w, order))

    def _pull_done(self, w: int, order: PullOrder) -> list[int]:
        tr = self._tracks.get(order.request_id)
        if tr is not None:
            tr.pulled = self.now
        self.cores[w].finish_pull(order.request_id, True)
        if isinstance(order.source, TierSource):
            return [w]
        holder = self._release(order.source.transfer_id)
        return [w] + ([holder] if holder is not None else [])

    def _release(self, transfer_id: str) -> int | None:
        holder = self._holders.pop(transfer_id, None)
        if holder is not None:
            self.cores[holder].release(transfer_id)
        return holder

    # -- results ------------------------------------------------------------------------------
    def _complete(self, tr: _Track, prompt: int, cached: int, completion: int, t: float) -> None:
        self._results[tr.index] = RequestResult(
            ok=True, ttft_s=tr.first - tr.arrival if tr.first >= 0 else None, itl_s=tr.itl,
            e2e_s=t - tr.arrival, prompt_tokens=prompt, output_tokens=completion, cached_tokens=cached)
        if self._on_complete is not None:
            self._on_complete(self._results[tr.index], t)
        if self.cfg.disaggregated and tr.first >= 0 and tr.started >= 0:
            sp = self._split
            sp["queue"].append(tr.started - tr.arrival)
            sp["prefill"].append(tr.first - tr.started)
            if tr.remote and tr.pulled >= 0 and tr.decode_first >= 0:
                sp["transfer"].append(tr.pulled - tr.first)
                sp["first_decode"].append(tr.decode_first - tr.pulled)
        self._finished()

    def _finished(self) -> None:
        if self._on_finish is not None:
            self._on_finish()


def simulate(requests: Sequence[TraceRequest], cfg: SimConfig, *,
             on_finish: Callable[[], None] | None = None) -> SimResult:
    """Run one simulation (see `Simulator`)."""
    return Simulator(requests, cfg, on_finish=on_finish).run()


__all__ = ["SimConfig", "SimResult", "SimStats", "Simulator", "make_router", "simulate"]
