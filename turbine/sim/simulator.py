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
"""
from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from turbine.bench.stats import RequestResult
from turbine.bench.trace import DEFAULT_VOCAB_SIZE, TokenSynth, TraceRequest, arrival_offsets_s
from turbine.mocker.core import MockerConfig, MockerCore, StepResult
from turbine.protocols.generate import GenerateRequest, SamplingOptions, StopConditions
from turbine.router.router import Router

ROUTERS = ("kv", "round-robin", "random", "least-loaded", "power-of-two")


class SimConfig(msgspec.Struct, frozen=True, kw_only=True):
    """One simulated fleet. ``mocker`` is every worker's engine config (same as `turbine serve`)."""

    workers: int = 8
    router: str = "kv"
    router_approx: bool = False  # kv without KV events: the router remembers its own decisions
    router_temperature: float = 0.0
    overlap_weight: float = 1.0
    speed: float = 1.0  # arrival times are divided by this
    vocab_size: int = DEFAULT_VOCAB_SIZE
    seed: int = 0
    mocker: MockerConfig = msgspec.field(default_factory=MockerConfig)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router {self.router!r}; choose one of {', '.join(ROUTERS)}")
        if self.router_approx and self.router != "kv":
            raise ValueError("router_approx applies to the kv router only")
        if not (self.speed > 0 and math.isfinite(self.speed)):
            raise ValueError(f"speed must be a positive number, got {self.speed}")
        if self.router_temperature < 0:
            raise ValueError(f"router_temperature must be >= 0, got {self.router_temperature}")

    def label(self) -> str:
        return "kv-approx" if self.router_approx else self.router


@dataclass
class SimStats:
    """How the simulation itself went (not what it simulated)."""

    wall_s: float = 0.0
    steps: int = 0
    preemptions: int = 0
    kv_event_batches: int = 0
    requests_per_worker: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"wall_s": round(self.wall_s, 3), "steps": self.steps, "preemptions": self.preemptions,
                "kv_event_batches": self.kv_event_batches, "requests_per_worker": list(self.requests_per_worker)}


@dataclass
class SimResult:
    """Per-request results in trace order, their arrival times, and the virtual duration."""

    results: list[RequestResult]
    arrivals_s: list[float]
    duration_s: float
    stats: SimStats


class _Track:
    """One request's timeline as the client would see it (times in virtual seconds)."""

    __slots__ = ("arrival", "first", "itl", "last")

    def __init__(self, arrival: float) -> None:
        self.arrival = arrival
        self.first = -1.0
        self.last = -1.0
        self.itl: list[float] = []


def make_router(cfg: SimConfig, clock: Callable[[], float]) -> Router:
    """The frontend's Router, configured as `turbine serve --router ...` would be."""
    return Router(cfg.router, block_size=cfg.mocker.block_size, overlap_weight=cfg.overlap_weight,
                  temperature=cfg.router_temperature, approx=cfg.router_approx, seed=cfg.seed, clock=clock)


class Simulator:
    """Replays ``requests`` through ``cfg.workers`` simulated workers; call ``run()`` once."""

    def __init__(self, requests: Sequence[TraceRequest], cfg: SimConfig, *,
                 on_finish: Callable[[], None] | None = None) -> None:
        if not requests:
            raise ValueError("no requests to simulate")
        self.cfg = cfg
        self.requests = list(requests)
        self.arrivals = arrival_offsets_s(self.requests, cfg.speed)
        self.now = 0.0
        self.router = make_router(cfg, lambda: self.now)
        self.worker_ids = [f"worker-{i}" for i in range(cfg.workers)]
        self._index = {w: i for i, w in enumerate(self.worker_ids)}
        self.cores = [MockerCore(cfg.mocker, vocab_size=cfg.vocab_size, rng_seed=cfg.seed * 1_000_003 + i)
                      for i in range(cfg.workers)]
        self.synth = TokenSynth(cfg.vocab_size, seed=cfg.seed)
        self._pending: list[StepResult | None] = [None] * cfg.workers  # the step each busy worker runs
        self._heap: list[tuple[float, int]] = []  # (end time, worker) of every pending step
        self._tracks: dict[str, _Track] = {}
        self._results: list[RequestResult | None] = [None] * len(self.requests)
        self._on_finish = on_finish
        self.stats = SimStats(requests_per_worker=[0] * cfg.workers)
        self._uses_events = cfg.router == "kv" and not cfg.router_approx
        self._ran = False

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> SimResult:
        if self._ran:
            raise RuntimeError("a Simulator runs once; build a new one")
        self._ran = True
        wall0 = time.perf_counter()
        heap, arrivals, pending = self._heap, self.arrivals, self._pending
        n, i = len(arrivals), 0
        inf = math.inf
        while heap or i < n:
            t = min(heap[0][0] if heap else inf, arrivals[i] if i < n else inf)
            self.now = t
            kicked: list[int] = []
            while heap and heap[0][0] == t:
                w = heapq.heappop(heap)[1]
                self._deliver(w, t)
                kicked.append(w)
            while i < n and arrivals[i] == t:
                w = self._arrive(i, t)
                if w >= 0 and pending[w] is None:
                    kicked.append(w)
                i += 1
            for w in kicked:
                if pending[w] is None:
                    self._start_step(w, t)
        self.stats.wall_s = time.perf_counter() - wall0
        results = [r if r is not None else RequestResult(ok=False, error="never finished") for r in self._results]
        return SimResult(results, self.arrivals, max(self.now, 1e-9), self.stats)

    def _arrive(self, i: int, t: float) -> int:
        """Route request ``i`` and queue it on its worker; the worker index, -1 if rejected."""
        req = self.requests[i]
        rid = f"req-{i}"
        ids = self.synth.prompt_array(req)  # the router hashes u32 arrays without converting
        decision = self.router.route(rid, self.worker_ids, ids)
        w = self._index[decision.worker_id]
        gen = GenerateRequest(
            request_id=rid, token_ids=ids.tolist(), sampling=SamplingOptions(),
            stop=StopConditions(max_tokens=req.output_length, min_tokens=req.output_length, ignore_eos=True),
            predicted_overlap_blocks=decision.overlap_blocks,
        )
        try:
            self.cores[w].add_request(gen, arrival_time=t)
        except ValueError as e:  # can never run on this engine (context, KV capacity)
            self.router.finished(rid)
            self._results[i] = RequestResult(ok=False, error=str(e)[:200])
            self._finished()
            return -1
        self._tracks[rid] = _Track(t)
        self.stats.requests_per_worker[w] += 1
        return w

    def _start_step(self, w: int, t: float) -> None:
        core = self.cores[w]
        if not core.has_work():
            return
        res = core.step()
        self.stats.preemptions += res.num_preempted
        if not res.outputs and not core.in_flight:  # nothing fits now; freed blocks or an arrival kick it again
            self._apply_events(w, res, t)
            return
        self.stats.steps += 1
        self._pending[w] = res
        heapq.heappush(self._heap, (t + res.duration_s, w))

    def _apply_events(self, w: int, res: StepResult, t: float) -> None:
        # Only exact kv routing reads the index; load policies and approx mode ignore events
        # (feeding them would cost ~15% of a run and change no decision).
        if res.kv_events and self._uses_events:
            self.stats.kv_event_batches += 1
            # no ts: the router takes it for a wall-clock stamp (its event-lag metric)
            self.router.apply_kv_events(self.worker_ids[w], res.kv_events)

    def _deliver(self, w: int, t: float) -> None:
        """The step of worker ``w`` ends at ``t``: events to the router, tokens to clients."""
        res = self._pending[w]
        assert res is not None
        self._pending[w] = None
        self._apply_events(w, res, t)
        tracks, router = self._tracks, self.router
        for out in res.outputs:
            if out.token_id is not None:
                tr = tracks[out.request_id]
                if tr.first < 0:
                    tr.first = t
                    router.first_token(out.request_id)
                else:
                    tr.itl.append(t - tr.last)
                tr.last = t
            if out.finish_reason is not None:
                self._complete(out.request_id, out.prompt_tokens, out.cached_tokens, out.completion_tokens, t)

    def _complete(self, rid: str, prompt: int, cached: int, completion: int, t: float) -> None:
        tr = self._tracks.pop(rid)
        self.router.finished(rid)
        self._results[int(rid[4:])] = RequestResult(
            ok=True, ttft_s=tr.first - tr.arrival if tr.first >= 0 else None, itl_s=tr.itl,
            e2e_s=t - tr.arrival, prompt_tokens=prompt, output_tokens=completion, cached_tokens=cached)
        self._finished()

    def _finished(self) -> None:
        if self._on_finish is not None:
            self._on_finish()


def simulate(requests: Sequence[TraceRequest], cfg: SimConfig, *,
             on_finish: Callable[[], None] | None = None) -> SimResult:
    """Run one simulation (see `Simulator`)."""
    return Simulator(requests, cfg, on_finish=on_finish).run()


__all__ = ["ROUTERS", "SimConfig", "SimResult", "SimStats", "Simulator", "make_router", "simulate"]
