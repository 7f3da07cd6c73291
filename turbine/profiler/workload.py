"""The fidelity workload and its drivers: the same requests, at the same times, on any engine.

    build_workload()     deterministic: prompt lengths, shared prefixes, output lengths, and an
                         open-loop arrival schedule in phases of rising target concurrency (rates
                         from a timing model by Little's law, so one config suits a CPU toy and
                         an H100)
    run_workload()       drives an ``Engine`` in-process (no HTTP) at those arrival times
    simulate_workload()  MockEngine's loop on a virtual clock over a ``MockerCore``
"""
from __future__ import annotations

import asyncio
import itertools
import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec

from turbine.bench.stats import RequestResult
from turbine.engine.base import Engine
from turbine.mocker.timing import TimingModel
from turbine.protocols.generate import GenerateRequest, SamplingOptions, StopConditions

__all__ = ["EngineRun", "WorkItem", "WorkloadConfig", "build_workload", "run_workload", "simulate_workload"]


class WorkloadConfig(msgspec.Struct, frozen=True, kw_only=True):
    # (target concurrency, requests): open-loop phases, one after the other.
    phases: tuple[tuple[int, int], ...] = ((1, 16), (4, 32), (16, 64), (64, 128))
    prompt_tokens: tuple[int, int] = (64, 2048)  # log-uniform, shared prefix included
    output_tokens: tuple[int, int] = (16, 128)  # uniform
    prefix_groups: int = 4  # distinct shared prefixes ("system prompts")
    prefix_tokens: int = 512
    prefix_share: float = 0.5  # fraction of requests that start with a shared prefix
    warmup_requests: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.phases or any(c < 1 or n < 1 for c, n in self.phases):
            raise ValueError(f"phases must be (concurrency >= 1, requests >= 1) pairs, got {self.phases}")
        for name in ("prompt_tokens", "output_tokens"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be 1 <= low <= high, got {(lo, hi)}")
        if not 0.0 <= self.prefix_share <= 1.0 or self.prefix_groups < 1 or self.prefix_tokens < 0:
            raise ValueError("prefix_share must be in [0, 1], prefix_groups >= 1, prefix_tokens >= 0")


class WorkItem(NamedTuple):
    arrival_s: float  # from the start of the measured run
    phase: int
    token_ids: list[int]
    max_tokens: int


def build_workload(cfg: WorkloadConfig, *, vocab_size: int, timing: TimingModel,
                   context_length: int) -> tuple[list[WorkItem], list[WorkItem]]:
    """(warm-up items, measured items); the same arguments give the same workload."""
    rng = random.Random(cfg.seed)
    lo, hi = cfg.prompt_tokens
    hi = min(hi, context_length - cfg.output_tokens[1] - 1)
    if hi < lo:
        raise ValueError(f"prompts of {cfg.prompt_tokens} tokens + {cfg.output_tokens[1]} outputs exceed the "
                         f"context length {context_length}")
    prefixes = [[rng.randrange(vocab_size) for _ in range(min(cfg.prefix_tokens, hi - 1))]
                for _ in range(cfg.prefix_groups)]

    def item(phase: int, arrival: float) -> WorkItem:
        n = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        head: list[int] = rng.choice(prefixes) if rng.random() < cfg.prefix_share and n > len(prefixes[0]) else []
        tail = [rng.randrange(vocab_size) for _ in range(n - len(head))]
        return WorkItem(arrival, phase, head + tail, rng.randint(*cfg.output_tokens))

    warm = [item(-1, 0.0) for _ in range(cfg.warmup_requests)]
    items: list[WorkItem] = []
    t = 0.0
    for p, (conc, count) in enumerate(cfg.phases):
        phase = [item(p, 0.0) for _ in range(count)]
        isl = statistics.fmean(len(w.token_ids) for w in phase)
        osl = statistics.fmean(w.max_tokens for w in phase)
        prefill = timing.step_seconds(int(isl), 0, 0.0)
        decode = timing.step_seconds(0, conc, 0.0, mean_decode_context=isl + osl / 2)
        step = decode + conc / osl * prefill  # each finishing request's prefill, spread over its steps
        rate = conc / (prefill + osl * step)  # Little's law: requests/s that keep `conc` in flight
        for w in phase:
            t += rng.expovariate(rate)
            items.append(w._replace(arrival_s=t))
    return warm, items


@dataclass
class EngineRun:
    label: str
    items: list[WorkItem]
    results: list[RequestResult]
    sent_s: list[float]  # send time of each request, from the run's start
    duration_s: float
    # The run's start on time.monotonic() (the StepRecorder's clock): t0_s + sent_s[i] + ttft_s is
    # when request i's client saw its first token. 0.0 for a virtual-clock run.
    t0_s: float = 0.0

    def concurrency(self, phase: int) -> float:
        """Time-averaged requests in flight while the phase's requests were."""
        spans = [(s, s + (r.e2e_s or 0.0)) for w, s, r in zip(self.items, self.sent_s, self.results, strict=True)
                 if w.phase == phase and r.ok]
        if not spans:
            return 0.0
        window = max(e for _, e in spans) - min(s for s, _ in spans)
        return sum(e - s for s, e in spans) / window if window > 0 else float(len(spans))


async def _one(engine: Engine, rid: str, w: WorkItem, sent_at: list[float] | None = None) -> RequestResult:
    """One request; its send time (time.monotonic) is appended to ``sent_at`` when given."""
    req = GenerateRequest(request_id=rid, token_ids=w.token_ids, sampling=SamplingOptions(temperature=0.0),
                          stop=StopConditions(max_tokens=w.max_tokens, min_tokens=w.max_tokens, ignore_eos=True))
    # time.monotonic: the StepRecorder's clock, so a request's times line up with the engine's steps
    # (CLOCK_MONOTONIC with ns resolution on Linux, the clock perf_counter reads there too).
    clock = time.monotonic
    sent = clock()
    if sent_at is not None:
        sent_at.append(sent)
    first = last = None
    itl: list[float] = []
    n = 0
    cached = None
    try:
        async for d in engine.generate(req):
            now = clock()
            if d.token_ids:
                if first is None:
                    first = now - sent
                elif last is not None:
                    itl.append(now - last)
                last = now
                n += len(d.token_ids)
            if d.cached_tokens is not None:
                cached = d.cached_tokens
            if d.finish_reason in ("error", "abort"):
                return RequestResult(ok=False, error=d.error or d.finish_reason)
    except (ValueError, RuntimeError) as e:
        return RequestResult(ok=False, error=repr(e))
    return RequestResult(ok=True, ttft_s=first, itl_s=itl, e2e_s=None if last is None else last - sent,
                         prompt_tokens=len(w.token_ids), output_tokens=n, cached_tokens=cached)


async def run_workload(engine: Engine, items: Sequence[WorkItem], *, warmup: Sequence[WorkItem] = (),
                       label: str = "", on_warm: Any = None) -> EngineRun:
    """Warm-up requests all at once (not measured), ``on_warm()`` if given, then the items at
    their arrival times. The engine must be started."""
    await asyncio.gather(*(_one(engine, f"{label}-warm-{i}", w) for i, w in enumerate(warmup)))
    if on_warm is not None:
        on_warm()
    loop = asyncio.get_running_loop()
    t0, t0_mono = loop.time(), time.monotonic()  # loop.time() schedules (on uvloop it is ms-grained)
    sent: list[list[float]] = [[] for _ in items]

    async def timed(i: int, w: WorkItem) -> RequestResult:
        await asyncio.sleep(max(0.0, t0 + w.arrival_s - loop.time()))
        return await _one(engine, f"{label}-{i}", w, sent[i])

    results = await asyncio.gather(*(timed(i, w) for i, w in enumerate(items)))
    return EngineRun(label, list(items), list(results), [s[0] - t0_mono for s in sent], time.monotonic() - t0_mono,
                     t0_mono)


def simulate_workload(core: Any, items: Sequence[WorkItem], *, warmup: Sequence[WorkItem] = (),
                      label: str = "") -> EngineRun:
    """MockEngine's loop on a virtual clock over a ``MockerCore``: a step starts when the last
    one ends (or at an arrival when idle), its tokens are seen at start + duration, and requests
    arriving meanwhile join the next step. Warm-up items all arrive at 0, before the run."""
    def drive(batch: Sequence[WorkItem], prefix: str) -> tuple[list[RequestResult], float]:
        t, k = 0.0, 0
        times: list[list[float]] = [[] for _ in batch]
        done = [False] * len(batch)
        cached: list[int | None] = [None] * len(batch)
        while k < len(batch) or core.has_work():
            if not core.has_work():
                t = max(t, batch[k].arrival_s)
            while k < len(batch) and batch[k].arrival_s <= t:
                w = batch[k]
                core.add_request(GenerateRequest(request_id=f"{prefix}-{k}", token_ids=w.token_ids,
                                                 sampling=SamplingOptions(temperature=0.0),
                                                 stop=StopConditions(max_tokens=w.max_tokens, min_tokens=w.max_tokens,
                                                                     ignore_eos=True)), t)
                k += 1
            res = core.step()
            if not res.outputs and not getattr(core, "in_flight", False):
                if k >= len(batch):
                    raise RuntimeError("the mocker cannot run its queued requests")
                t = batch[k].arrival_s
                continue
            t += res.duration_s
            for o in res.outputs:
                i = int(o.request_id.rsplit("-", 1)[1])
                if o.token_id is not None:
                    times[i].append(t)
                    cached[i] = o.cached_tokens
                done[i] = done[i] or o.finish_reason is not None
        results = []
        for i, w in enumerate(batch):
            ts = times[i]
            results.append(RequestResult(ok=done[i] and bool(ts), ttft_s=ts[0] - w.arrival_s if ts else None,
                                         itl_s=[b - a for a, b in itertools.pairwise(ts)],
                                         e2e_s=ts[-1] - w.arrival_s if ts else None, prompt_tokens=len(w.token_ids),
                                         output_tokens=len(ts), cached_tokens=cached[i]))
        return results, t

    drive([w._replace(arrival_s=0.0) for w in warmup], f"{label}-warm")
    results, end = drive(items, label)
    return EngineRun(label, list(items), results, [w.arrival_s for w in items], end)
