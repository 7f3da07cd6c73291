"""Mocker fidelity: one mixed workload (turbine/profiler/workload.py) on a real engine and on
the mocker loaded with that engine's profile; TTFT and ITL percentiles side by side.

    run_fidelity()    the workload on the real engine, then on each mock variant
    StepRecorder      wraps a core's ``step`` to log each real step (shape, start/end, request ids,
                      host time, GC pauses, CUDA allocator counters)
    compare_runs()    percentiles, mock/real ratios, the targets (p50 within 10%, p99 within 20%)
    diagnose()        where the real run's time went (turbine/profiler/diagnosis.py): "diagnosis"
    step_accuracy()   each logged real step against a timing model's prediction
    additive_timing() the profile without its mixed-step grid: the mocker's model before it had one
"""
from __future__ import annotations

import gc
import itertools
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Self

import msgspec

from turbine.bench.stats import Percentiles, RequestResult, render_table
from turbine.engine.base import Engine
from turbine.mocker.timing import ProfileTiming, TimingModel
from turbine.profiler.diagnosis import diagnose, predicted_ms
from turbine.profiler.workload import (
    EngineRun,
    WorkloadConfig,
    build_workload,
    run_workload,
    simulate_workload,
)

__all__ = ["FidelityResult", "GcLog", "GcPause", "StepRecord", "StepRecorder", "additive_timing", "compare_runs",
           "format_fidelity", "mixed_summary", "mock_timings", "run_fidelity", "step_accuracy", "step_cadence",
           "step_points"]

TARGETS = {"p50": 0.10, "p99": 0.20}  # |mock / real - 1| at most


class StepRecord(NamedTuple):
    ms: float  # the core's own duration_s
    start_s: float  # time.monotonic() when step() was called (the workload's clock: EngineRun.t0_s)
    prefill_tokens: int
    decode_seqs: int
    prefill_context: float  # mean cached tokens of the step's prefills (first chunks exact)
    decode_context: float  # mean length of the decoding sequences
    end_s: float = 0.0  # time.monotonic() when step() returned
    prefill_ids: tuple[str, ...] = ()  # prefill chunks that produced no token
    first_ids: tuple[str, ...] = ()  # sequences that got their first token
    decode_ids: tuple[str, ...] = ()
    preempted: int = 0
    host_s: float | None = None  # the step's host work (StepResult.host_s), where the core reports it
    gc_ms: float = 0.0  # Python GC pauses between the step's start and end (any thread: they hold the GIL)
    alloc: dict[str, int] | None = None  # CUDA caching-allocator counters, delta since the last step's end
    # The scheduler's queues and the KV blocks in use at the step's end (None: the core has no such parts)
    waiting: int | None = None
    running: int | None = None
    kv_used: float | None = None  # referenced blocks / all blocks
    device_ms: float | None = None  # the step's device time (StepResult.device_s), where the core times it


ALLOC_COUNTERS = ("num_alloc_retries", "num_device_alloc", "num_device_free")


class GcPause(NamedTuple):
    start_s: float  # time.monotonic()
    end_s: float
    generation: int


def _cuda_counters(device: Any) -> Callable[[], dict[str, int]] | None:
    """A reader of ALLOC_COUNTERS on ``device``, or None unless it is a CUDA device of an
    initialized context (torch is imported here only: the profiler package works without it).
    It reads ``memory_stats_as_nested_dict`` (the allocator's own dict; ``memory_stats`` also
    flattens ~100 keys in Python: 140 us a read against 27 us on an H100, torch 2.11) once per
    step, after the step's end time is taken; the cost lands in the gap before the next step and
    StepRecorder.read_us keeps it."""
    if getattr(device, "type", None) != "cuda":
        return None
    try:
        import torch
    except ImportError:
        return None
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None

    def read() -> dict[str, int]:
        stats = torch.cuda.memory_stats_as_nested_dict(device)
        return {k: int(stats.get(k, 0)) for k in ALLOC_COUNTERS}

    return read


def _load(core: Any) -> tuple[int | None, int | None, float | None]:
    """(waiting, running, KV fraction in use): a scheduler's and block manager's O(1) counters,
    read without the core's lock (a snapshot a request may race with; good enough to explain)."""
    sched, bm = getattr(core, "scheduler", None), getattr(core, "block_manager", None)
    kv = bm.num_active_blocks / bm.num_blocks if bm is not None and getattr(bm, "num_blocks", 0) else None
    return (getattr(sched, "num_waiting", None), getattr(sched, "num_running", None), kv)


class GcLog:
    """Python GC pauses (any thread: a collection holds the GIL) while hooked into
    ``gc.callbacks`` (``watch_gc`` / ``unwatch_gc``, or ``with``), kept in ``gc_pauses``."""

    def __init__(self) -> None:
        self.gc_pauses: list[GcPause] = []
        self._gc_start: tuple[float, int] | None = None

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        # GC holds the GIL and never nests: a stop always follows its own start.
        if phase == "start":
            self._gc_start = (time.monotonic(), info.get("generation", -1))
        elif self._gc_start is not None:
            self.gc_pauses.append(GcPause(self._gc_start[0], time.monotonic(), self._gc_start[1]))
            self._gc_start = None

    def watch_gc(self) -> None:
        gc.callbacks.append(self._on_gc)

    def unwatch_gc(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def __enter__(self) -> Self:
        self.watch_gc()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unwatch_gc()

    def gc_summary(self) -> dict[str, float]:
        """Count, total and longest pause (ms), and how many were full (generation 2) collections."""
        ms = [(p.end_s - p.start_s) * 1e3 for p in self.gc_pauses]
        return {"pauses": len(ms), "total_ms": round(sum(ms), 2), "longest_ms": round(max(ms, default=0.0), 2),
                "full": sum(p.generation == 2 for p in self.gc_pauses)}


class StepRecorder(GcLog):
    """Logs every step of a core (shadowing its ``step`` on the instance until ``close()``): shape,
    start/end, the request ids it carried, host time, GC pauses inside it and allocator counters.
    GC pauses anywhere in the process are kept in ``gc_pauses`` (a ``gc.callbacks`` hook)."""

    def __init__(self, core: Any) -> None:
        super().__init__()
        self.core = core
        self._step = core.step
        self.records: list[StepRecord] = []
        self._counters = _cuda_counters(getattr(core, "device", None))
        if hasattr(core, "enable_device_timing"):  # a pipelined step's call time is not its own
            core.enable_device_timing(True)
        self._last: dict[str, int] | None = None
        self.read_us: list[float] = []  # cost of each allocator-counter read
        self.reset()
        self.watch_gc()
        core.step = self

    def reset(self) -> None:
        """Forget what was logged so far (after a warm-up)."""
        self.records.clear()
        self.gc_pauses.clear()
        self.read_us.clear()
        self._last = self._counters() if self._counters is not None else None

    def __call__(self) -> Any:
        n_gc = len(self.gc_pauses)
        t0 = time.monotonic()
        res = self._step()
        t1 = time.monotonic()
        if res.outputs:
            gc_ms = sum(p.end_s - p.start_s for p in self.gc_pauses[n_gc:]) * 1e3
            alloc = None
            if self._counters is not None:
                now = self._counters()
                self.read_us.append((time.monotonic() - t1) * 1e6)
                if self._last is not None:
                    alloc = {k: now[k] - self._last[k] for k in ALLOC_COUNTERS}
                self._last = now
            outs = res.outputs
            dec = [o.prompt_tokens + o.completion_tokens - 1 for o in outs if o.completion_tokens >= 2]
            pre = [o.cached_tokens for o in outs if o.completion_tokens <= 1]
            self.records.append(StepRecord(
                res.duration_s * 1e3, t0, res.num_prefill_tokens, res.num_decode_seqs,
                statistics.fmean(pre) if pre else 0.0, statistics.fmean(dec) if dec else 0.0, t1,
                tuple(o.request_id for o in outs if o.token_id is None),
                tuple(o.request_id for o in outs if o.token_id is not None and o.completion_tokens == 1),
                tuple(o.request_id for o in outs if o.token_id is not None and o.completion_tokens >= 2),
                res.num_preempted, getattr(res, "host_s", None), gc_ms, alloc, *_load(self.core),
                _ms(getattr(res, "device_s", None))))
        return res

    def close(self) -> None:
        if hasattr(self.core, "enable_device_timing"):
            self.core.enable_device_timing(False)
        self.unwatch_gc()
        if self.core.__dict__.get("step") is self:
            del self.core.step


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _measured_ms(r: StepRecord) -> float:
    """The step's own time: its device time where timed, else the call's wall time."""
    return r.device_ms if r.device_ms is not None else r.ms


def _kind(r: StepRecord) -> str:
    return "mixed" if r.prefill_tokens and r.decode_seqs else ("prefill" if r.prefill_tokens else "decode")


def step_accuracy(records: Sequence[StepRecord], timing: TimingModel) -> dict[str, dict[str, float]]:
    """Per step kind: steps, median and p10/p90 of predicted / measured time (device time where
    the core reports it: a pipelined call's wall time overlaps its neighbours' steps)."""
    by_kind: dict[str, list[float]] = {}
    for r in records:
        if _measured_ms(r) > 0:
            by_kind.setdefault(_kind(r), []).append(predicted_ms(r, timing) / _measured_ms(r))
    out = {}
    for kind, ratios in sorted(by_kind.items()):
        q = statistics.quantiles(ratios, n=10) if len(ratios) >= 2 else ratios * 9
        out[kind] = {"steps": len(ratios), "median": round(statistics.median(ratios), 3),
                     "p10": round(q[0], 3), "p90": round(q[-1], 3)}
    return out


def step_cadence(records: Sequence[StepRecord]) -> dict[str, float | None]:
    """Step time and the gap from one step's end to the next one's start (thread hand-offs,
    backpressure, idle waits), median and p90 in ms: time the engine spends outside ``step()``."""
    gaps = [(b.start_s - a.start_s) * 1e3 - a.ms for a, b in itertools.pairwise(records)]
    steps = Percentiles.of([r.ms for r in records])
    between = Percentiles.of(gaps)
    return {"steps": len(records), "step_ms_p50": _r(steps.p50), "between_ms_p50": _r(between.p50),
            "between_ms_p90": _r(between.p90)}


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def step_points(records: Sequence[StepRecord], timing: TimingModel) -> list[tuple[float, float, str]]:
    """(measured ms, predicted ms, kind) of each record, for a scatter plot."""
    return [(_measured_ms(r), predicted_ms(r, timing), _kind(r)) for r in records if _measured_ms(r) > 0]


def additive_timing(profile: dict[str, Any]) -> ProfileTiming:
    """The profile without its ``mixed`` grid (mixed steps cost prefill + decode) and without
    async scheduling: the baseline the measured grid and the one-step lookahead improve on."""
    meta = profile.get("meta")
    meta = {**meta, "async_scheduling": False} if isinstance(meta, dict) else {"async_scheduling": False}
    return ProfileTiming({**{k: v for k, v in profile.items() if k != "mixed"}, "meta": meta})


def mixed_summary(profile: dict[str, Any], points: list[dict[str, float]], context: int) -> dict[str, Any]:
    """Measured mixed steps against the additive composition ``prefill(n) + decode(b, L)``: what
    the profile's mixed grid corrects."""
    timing = additive_timing(profile)
    out = []
    for p in points:
        n, b, ctx = int(p["new_tokens"]), int(p["batch_size"]), p["decode_context"]
        additive = timing.prefill_ms(n) + timing.decode_ms(b, ctx)
        out.append({**p, "additive_ms": round(additive, 4), "additive_over_measured": round(additive / p["ms"], 3)})
    return {"context_length": context, "points": out,
            "additive_over_measured_median": statistics.median(q["additive_over_measured"] for q in out)}


def _samples(results: Sequence[RequestResult]) -> dict[str, list[float]]:
    ok = [r for r in results if r.ok]
    return {"ttft_ms": [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None],
            "itl_ms": [g * 1e3 for r in ok for g in r.itl_s]}


def _summary(run: EngineRun) -> dict[str, Any]:
    s = _samples(run.results)
    per_phase = {}
    for p in sorted({w.phase for w in run.items}):
        ps = _samples([r for w, r in zip(run.items, run.results, strict=True) if w.phase == p])
        per_phase[str(p)] = {"concurrency": round(run.concurrency(p), 1),
                             "ttft_ms": Percentiles.of(ps["ttft_ms"]).to_dict(),
                             "itl_ms": Percentiles.of(ps["itl_ms"]).to_dict()}
    ok = [r for r in run.results if r.ok]
    return {"label": run.label, "requests": len(run.results), "ok": len(ok), "duration_s": round(run.duration_s, 3),
            "ttft_ms": Percentiles.of(s["ttft_ms"]).to_dict(), "itl_ms": Percentiles.of(s["itl_ms"]).to_dict(),
            "cached_tokens_mean": round(statistics.fmean(r.cached_tokens or 0 for r in ok), 1) if ok else None,
            "phases": per_phase, "errors": [r.error for r in run.results if not r.ok][:4]}


def compare_runs(real: EngineRun, mocks: Mapping[str, EngineRun]) -> dict[str, Any]:
    """Summaries of every run and, per mock, the mock / real ratio of each percentile and
    whether it meets its target (p50 within 10%, p99 within 20%)."""
    out: dict[str, Any] = {"real": _summary(real), "mocks": {}}
    for name, run in mocks.items():
        m = _summary(run)
        ratios, met = {}, {}
        for metric in ("ttft_ms", "itl_ms"):
            for p, tol in TARGETS.items():
                a, b = out["real"][metric][p], m[metric][p]
                key = f"{metric.removesuffix('_ms')}_{p}"
                ratios[key] = None if not a or b is None else round(b / a, 3)
                met[key] = ratios[key] is not None and abs(ratios[key] - 1.0) <= tol
        out["mocks"][name] = {**m, "ratio": ratios, "met": met}
    return out


def format_fidelity(cmp: dict[str, Any], *, markdown: bool = False) -> str:
    """Metric rows; per mock its value, the mock/real ratio and the target verdict."""
    mocks = cmp["mocks"]
    head = ["metric", "real"] + [h for name in mocks for h in (f"mock {name}", "ratio")] + ["target"]
    rows = []
    for metric in ("ttft_ms", "itl_ms"):
        for p, tol in TARGETS.items():
            key = f"{metric.removesuffix('_ms')}_{p}"
            row = [f"{metric.removesuffix('_ms').upper()} {p} (ms)", _f(cmp["real"][metric][p])]
            for m in mocks.values():
                r = m["ratio"][key]
                row += [_f(m[metric][p]), "-" if r is None else f"{r:.2f} {'ok' if m['met'][key] else 'MISS'}"]
            rows.append([*row, f"±{tol:.0%}"])
    return render_table(head, rows, markdown=markdown)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


class FidelityResult(NamedTuple):
    comparison: dict[str, Any]  # compare_runs() + "steps" (step_accuracy per timing) + "workload" + "diagnosis"
    samples: dict[str, dict[str, list[float]]]  # per engine: "ttft_ms", "itl_ms" (for plots)
    steps: list[tuple[float, float, str]]  # real steps: (measured, profile's prediction, kind)


def _read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a timing profile is a JSON object")
    return data


def mock_timings(profile_path: str, variants: Sequence[str]) -> dict[str, tuple[ProfileTiming | None, bool]]:
    """Per mock variant: its timing and whether it runs on a virtual clock. "profile" is the file
    as ``MockerConfig.profile`` loads it (timing None) on a MockEngine in real time, "additive"
    ``additive_timing`` of it; a "@virtual" suffix runs ``simulate_workload`` instead (no asyncio
    jitter, no wall time spent)."""
    out: dict[str, tuple[ProfileTiming | None, bool]] = {}
    for v in variants:
        name, _, clock = v.partition("@")
        if name not in ("profile", "additive") or clock not in ("", "virtual"):
            raise ValueError(f"unknown mock variant {v!r}; choose profile or additive, optionally @virtual")
        if name == "additive":
            out[v] = (additive_timing(_read_json(profile_path)), bool(clock))
        else:
            out[v] = (ProfileTiming.from_file(profile_path) if clock else None, bool(clock))
    return out

async def run_fidelity(real: Engine, profile_path: str, *, vocab_size: int, max_num_batched_tokens: int,
                       workload: WorkloadConfig,
                       variants: Sequence[str] = ("profile", "profile@virtual", "additive@virtual"),
                       recorder: StepRecorder | None = None) -> FidelityResult:
    """The workload on ``real`` (not started yet), then on the mocker per variant (``mock_timings``)
    with the real engine's block size, KV blocks, max_num_seqs, max_num_batched_tokens, context."""
    from turbine.mocker.core import MockerCore
    from turbine.mocker.engine import MockEngine, MockerConfig

    profile = _read_json(profile_path)  # a small local file, read once before the runs
    timing = ProfileTiming(profile)
    timings = mock_timings(profile_path, variants)
    warm, items = build_workload(workload, vocab_size=vocab_size, timing=timing, context_length=real.context_length)
    config = MockerConfig(block_size=real.block_size, num_gpu_blocks=real.num_kv_blocks, max_num_seqs=real.max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens, context_length=real.context_length,
                          profile=profile_path)
    runs: dict[str, EngineRun] = {}
    engines: list[tuple[str, Any]] = [("real", real)]
    for v, (t, virtual) in timings.items():
        if virtual:
            core = MockerCore(config, vocab_size=vocab_size, timing=t)  # async scheduling as the timing says
            runs[v] = simulate_workload(core, items, warmup=warm, label=v)
        else:
            engines.append((v, MockEngine(config, vocab_size=vocab_size, timing=t)))
    gc_runs: dict[str, dict[str, float]] = {}
    for name, engine in engines:
        # What earlier runs left on the heap (a loaded model, their results) is frozen out of
        # the collector: a full collection scanning it mid-run stalls the event loop for tens of
        # ms, a tail latency of this harness, not of the engine under test.
        gc.collect()
        gc.freeze()
        await engine.start()
        try:
            on_warm = recorder.reset if recorder is not None and engine is real else None
            with GcLog() as log:
                runs[name] = await run_workload(engine, items, warmup=warm, label=name, on_warm=on_warm)
            gc_runs[name] = log.gc_summary()
        finally:
            await engine.stop()
            gc.unfreeze()
    runs = {k: runs[k] for k in ["real", *timings]}
    real_run = runs.pop("real")
    cmp = compare_runs(real_run, runs)
    records = recorder.records if recorder is not None else []
    cmp["gc"] = gc_runs
    cmp["steps"] = {"profile": step_accuracy(records, timing),
                    "additive": step_accuracy(records, additive_timing(profile)),
                    "cadence": step_cadence(records)}
    if recorder is not None:
        mock = next((runs[k] for k in ("profile", "profile@virtual", *runs) if k in runs), None)
        cmp["diagnosis"] = diagnose(real_run, records, timing, gc_pauses=recorder.gc_pauses,
                                    read_us=recorder.read_us, mock=mock)
    cmp["workload"] = {**msgspec.to_builtins(workload), "requests": len(items),
                       "prompt_tokens_mean": round(statistics.fmean(len(w.token_ids) for w in items), 1),
                       "output_tokens_mean": round(statistics.fmean(w.max_tokens for w in items), 1),
                       "arrival_span_s": round(items[-1].arrival_s, 3)}
    samples = {"real": _samples(real_run.results), **{f"mock {k}": _samples(r.results) for k, r in runs.items()}}
    return FidelityResult(cmp, samples, step_points(records, timing))
