"""Where a real engine's time went in a fidelity run: each request's TTFT split along the
engine's steps, the steps the timing model misses most, the time between steps, GC pauses.

Every time is on time.monotonic(): ``StepRecorder`` stamps steps and GC pauses, ``run_workload``
stamps sends and first tokens; ``EngineRun.t0_s`` ties them together. Per request:

    sent ──queue──▶ first step carrying it starts ──prefill──▶ step giving its first token ends
         ──delivery──▶ the client sees the token             queue + prefill + delivery = TTFT

queue: waiting to be scheduled, the step in flight included (slightly negative when a step
that had just started scheduled it); prefill: its chunks and whatever ran between them;
delivery: step thread to event loop to the client's stream.

    diagnose()          the timeline, the top-N lists, gaps and GC: a JSON-ready dict
    request_timeline()  the split of every request
    format_diagnosis()  that dict as a few short tables
"""
from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from turbine.bench.stats import Percentiles, render_table
from turbine.mocker.timing import TimingModel

if TYPE_CHECKING:
    from turbine.profiler.fidelity import GcPause, StepRecord
    from turbine.profiler.workload import EngineRun

__all__ = ["RequestTiming", "diagnose", "format_diagnosis", "predicted_ms", "request_timeline", "shape"]


def predicted_ms(r: StepRecord, timing: TimingModel) -> float:
    """The timing model's time for a recorded step's shape."""
    return 1e3 * timing.step_seconds(r.prefill_tokens, r.decode_seqs, 0.0, mean_prefill_context=r.prefill_context,
                                     mean_decode_context=r.decode_context)


def shape(r: StepRecord) -> str:
    """``P<new tokens>@<mean cached> D<decodes>@<mean context>`` (+ ``!<n>`` preempted)."""
    parts = []
    if r.prefill_tokens:
        parts.append(f"P{r.prefill_tokens}@{r.prefill_context:.0f}")
    if r.decode_seqs:
        parts.append(f"D{r.decode_seqs}@{r.decode_context:.0f}")
    if r.preempted:
        parts.append(f"!{r.preempted}")
    return " ".join(parts) or "-"


class RequestTiming(NamedTuple):
    index: int  # into EngineRun.items
    sent_s: float  # from the run's start
    ttft_ms: float
    queue_ms: float
    prefill_ms: float
    delivery_ms: float
    first_step: int  # index into the records: the first step that carried the request
    token_step: int  # the step that produced its first token


def request_timeline(run: EngineRun, records: Sequence[StepRecord]) -> list[RequestTiming]:
    """The TTFT split of every request with a first token that the records saw (ids
    ``f"{run.label}-{i}"``); queue + prefill + delivery equals the measured TTFT."""
    first: dict[str, int] = {}
    token: dict[str, int] = {}
    for k, r in enumerate(records):
        for rid in itertools.chain(r.prefill_ids, r.first_ids):
            first.setdefault(rid, k)
        for rid in r.first_ids:
            token.setdefault(rid, k)
    out = []
    for i, res in enumerate(run.results):
        rid = f"{run.label}-{i}"
        if not res.ok or res.ttft_s is None or rid not in token:
            continue
        a, b = records[first[rid]], records[token[rid]]
        sent = run.sent_s[i]
        start, end, seen = a.start_s - run.t0_s, b.end_s - run.t0_s, sent + res.ttft_s
        out.append(RequestTiming(i, sent, res.ttft_s * 1e3, (start - sent) * 1e3, (end - start) * 1e3,
                                 (seen - end) * 1e3, first[rid], token[rid]))
    return out


def _window(records: Sequence[StepRecord], starts: list[float], lo: float, hi: float,
            timing: TimingModel) -> dict[str, Any]:
    """The steps that overlap [lo, hi] (monotonic): how much of it they cover, and the longest."""
    k = max(0, bisect.bisect_right(starts, lo) - 1)
    steps = []
    while k < len(records) and records[k].start_s < hi:
        if records[k].end_s > lo:
            steps.append(records[k])
        k += 1
    busy = sum(min(r.end_s, hi) - max(r.start_s, lo) for r in steps)
    out: dict[str, Any] = {"steps": len(steps), "step_ms": round(busy * 1e3, 2),
                           "gap_ms": round((hi - lo - busy) * 1e3, 2),
                           "prefill_tokens": sum(r.prefill_tokens for r in steps),
                           "preempted": sum(r.preempted for r in steps),
                           "max_waiting": _max(r.waiting for r in steps), "max_running": _max(r.running for r in steps),
                           "max_kv_used": _r3(_max(r.kv_used for r in steps)), "longest": None}
    if steps:
        r = max(steps, key=lambda r: r.ms)
        out["longest"] = {"shape": shape(r), "ms": round(r.ms, 2), "predicted_ms": round(predicted_ms(r, timing), 2)}
    return out


def _max(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return max(vals) if vals else None


def _r3(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _in_flight(run: EngineRun) -> list[tuple[float, float]]:
    """(sent, last token seen) of every finished request, from the run's start."""
    return [(s, s + r.e2e_s) for s, r in zip(run.sent_s, run.results, strict=True) if r.ok and r.e2e_s is not None]


def _gaps(records: Sequence[StepRecord], run: EngineRun) -> dict[str, Any]:
    """Time between one step's end and the next one's start; "busy" gaps are those with a
    request in flight throughout (sent before, its last token seen after): the engine had
    work, or the loop had tokens to deliver, and no step ran."""
    spans = sorted(_in_flight(run))
    union: list[list[float]] = []
    for s, e in spans:
        if union and s <= union[-1][1]:
            union[-1][1] = max(union[-1][1], e)
        else:
            union.append([s, e])
    union_starts = [u[0] for u in union]
    total = busy = 0.0
    longest = (0.0, 0.0, False)
    longest_busy = (0.0, 0.0)
    for a, b in itertools.pairwise(records):
        g = b.start_s - a.end_s
        lo, hi = a.end_s - run.t0_s, b.start_s - run.t0_s
        u = bisect.bisect_right(union_starts, lo) - 1
        is_busy = u >= 0 and union[u][1] >= hi
        total += g
        if is_busy:
            busy += g
            longest_busy = max(longest_busy, (g, lo))
        longest = max(longest, (g, lo, is_busy))
    return {"count": max(0, len(records) - 1), "total_ms": round(total * 1e3, 2), "busy_total_ms": round(busy * 1e3, 2),
            "longest_ms": round(longest[0] * 1e3, 2), "longest_at_s": round(longest[1], 3), "longest_busy": longest[2],
            "longest_busy_ms": round(longest_busy[0] * 1e3, 2), "longest_busy_at_s": round(longest_busy[1], 3)}


def _gc(records: Sequence[StepRecord], starts: list[float], pauses: Sequence[GcPause],
        run: EngineRun) -> dict[str, Any]:
    """GC pauses of the run's window, inside a logged step or between steps."""
    t_end = run.t0_s + run.duration_s
    inside = outside = 0.0
    n = 0
    longest: tuple[float, float, int] = (0.0, 0.0, -1)
    for p in pauses:
        if not run.t0_s <= p.start_s <= t_end:
            continue
        n += 1
        d = p.end_s - p.start_s
        k = bisect.bisect_right(starts, p.start_s) - 1
        if k >= 0 and p.end_s <= records[k].end_s:
            inside += d
        else:
            outside += d
        longest = max(longest, (d, p.start_s - run.t0_s, p.generation))
    return {"pauses": n, "in_steps_ms": round(inside * 1e3, 2), "between_steps_ms": round(outside * 1e3, 2),
            "longest_ms": round(longest[0] * 1e3, 2), "longest_at_s": round(longest[1], 3),
            "longest_generation": longest[2]}


def diagnose(run: EngineRun, records: Sequence[StepRecord], timing: TimingModel, *,
             gc_pauses: Sequence[GcPause] = (), read_us: Sequence[float] = (), mock: EngineRun | None = None,
             top: int = 10) -> dict[str, Any]:
    """The real run's TTFT split (percentiles of each part; the ``top`` slowest requests with
    the steps that ran while they waited), the ``top`` steps furthest above ``timing``, the
    gaps between steps and the GC pauses. ``mock``: a mock run of the same items, whose TTFT
    is shown next to each slow request's."""
    records = sorted(records, key=lambda r: r.start_s)
    starts = [r.start_s for r in records]
    tl = request_timeline(run, records)
    split = {name: Percentiles.of([getattr(t, f"{name}_ms") for t in tl]).to_dict(2)
             for name in ("ttft", "queue", "prefill", "delivery")}
    # not part of TTFT: how late the client sent against the schedule (a stalled event loop shows here)
    split["send_late"] = Percentiles.of([(s - w.arrival_s) * 1e3 for s, w in zip(run.sent_s, run.items,
                                                                                 strict=True)]).to_dict(2)
    in_flight = _in_flight(run)
    slow = []
    for t in sorted(tl, key=lambda t: -t.ttft_ms)[:top]:
        res, lo = run.results[t.index], run.t0_s + t.sent_s
        m = mock.results[t.index] if mock is not None else None
        slow.append({
            "request": f"{run.label}-{t.index}", "phase": run.items[t.index].phase, "sent_s": round(t.sent_s, 3),
            "ttft_ms": round(t.ttft_ms, 2), "queue_ms": round(t.queue_ms, 2), "prefill_ms": round(t.prefill_ms, 2),
            "delivery_ms": round(t.delivery_ms, 2), "prompt_tokens": len(run.items[t.index].token_ids),
            "cached_tokens": res.cached_tokens,
            "chunks": sum(f"{run.label}-{t.index}" in records[k].prefill_ids
                          for k in range(t.first_step, t.token_step)) + 1,
            "in_flight_at_send": sum(s < t.sent_s < e for s, e in in_flight),
            "mock_ttft_ms": None if m is None or m.ttft_s is None else round(m.ttft_s * 1e3, 2),
            "window": _window(records, starts, lo, lo + t.ttft_ms / 1e3, timing)})
    excess = sorted(((r.ms - predicted_ms(r, timing), r) for r in records), key=lambda x: -x[0])[:top]
    steps = [{"at_s": round(r.start_s - run.t0_s, 3), "shape": shape(r), "ms": round(r.ms, 2),
              "predicted_ms": round(r.ms - e, 2), "excess_ms": round(e, 2),
              "host_ms": None if r.host_s is None else round(r.host_s * 1e3, 2), "gc_ms": round(r.gc_ms, 2),
              "alloc": r.alloc} for e, r in excess]
    parts = {k: sum(s[f"{k}_ms"] for s in slow) for k in ("queue", "prefill", "delivery")}
    parts |= {k: sum(s["window"][f"{k}_ms"] for s in slow) for k in ("step", "gap")}
    ttft_sum = sum(s["ttft_ms"] for s in slow) or 1.0
    allocs = [r.alloc for r in records if r.alloc is not None]
    alloc_total = {k: sum(a[k] for a in allocs) for k in allocs[0]} if allocs else None
    hosts = [r.host_s for r in records if r.host_s is not None]
    return {"requests": len(tl), "steps": len(records), "ttft_split_ms": split,
            "slowest_share": {k: round(v / ttft_sum, 3) for k, v in parts.items()}, "slowest_requests": slow,
            "slowest_steps": steps, "gaps": _gaps(records, run), "gc": _gc(records, starts, gc_pauses, run),
            "step_ms_total": round(sum(r.ms for r in records), 2),
            "host_ms_total": round(sum(hosts) * 1e3, 2) if hosts else None, "alloc_total": alloc_total,
            "alloc_read_us_mean": round(sum(read_us) / len(read_us), 1) if read_us else None}


def _n(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def _i(v: float | None) -> str:
    return "-" if v is None else str(v)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def _alloc(a: dict[str, int] | None) -> str:
    return "-" if a is None else "/".join(str(a[k]) for k in a)


_LABELS = {"queue": "= queue", "prefill": "+ prefill", "delivery": "+ delivery", "send_late": "send - schedule"}


def format_diagnosis(d: dict[str, Any], *, markdown: bool = False, top: int | None = None) -> str:
    """The TTFT split, the slowest requests and steps (``top`` rows of each), gaps and GC."""
    split = d["ttft_split_ms"]
    out = [render_table(["TTFT part (ms)", "p50", "p90", "p99"],
                        [[_LABELS.get(k, k.upper()), *(_n(v[p]) for p in ("p50", "p90", "p99"))]
                         for k, v in split.items()],
                        markdown=markdown), ""]
    rows = []
    for s in d["slowest_requests"][:top]:
        w, lg = s["window"], s["window"]["longest"] or {}
        rows.append([s["request"], s["phase"], f"{s['sent_s']:.2f}", _n(s["ttft_ms"]), _n(s["queue_ms"]),
                     _n(s["prefill_ms"]), _n(s["delivery_ms"]), f"{s['prompt_tokens']}/{s['cached_tokens']}",
                     s["chunks"], s["in_flight_at_send"], f"{w['steps']}: {_n(w['step_ms'])} + {_n(w['gap_ms'])}",
                     w["prefill_tokens"], f"{_i(w['max_waiting'])}/{_i(w['max_running'])}/{_pct(w['max_kv_used'])}",
                     f"{lg.get('shape', '-')} {_n(lg.get('ms'))}/{_n(lg.get('predicted_ms'))}",
                     _n(s["mock_ttft_ms"])])
    sh = d["slowest_share"]
    out += [(f"Slowest {len(d['slowest_requests'])} first tokens: queue {sh['queue']:.0%}, prefill "
             f"{sh['prefill']:.0%}, delivery {sh['delivery']:.0%} of their TTFT; steps ran {sh['step']:.0%} of it, "
             f"none ran {sh['gap']:.0%}."), ""]
    out += [("Slowest first tokens (ms; over the wait: steps = count: step ms + gap ms, P tokens prefilled, "
             "most waiting / running / KV in use; shape P new@cached D decodes@context):"),
            "", render_table(["request", "ph", "sent s", "TTFT", "queue", "prefill", "deliv", "prompt/cached", "chunks",
                              "in flight", "steps", "P tokens", "wait/run/KV", "longest step meas/pred",
                              "mock TTFT"], rows,
                             markdown=markdown), ""]
    rows = [[f"{s['at_s']:.3f}", s["shape"], _n(s["ms"]), _n(s["predicted_ms"]), _n(s["excess_ms"]),
             _n(s["host_ms"]), _n(s["gc_ms"]), _alloc(s["alloc"])] for s in d["slowest_steps"][:top]]
    out += ["Steps furthest above the profile (ms; alloc = retries/device allocs/device frees):", "",
            render_table(["at s", "shape", "measured", "predicted", "excess", "host", "GC", "alloc"], rows,
                         markdown=markdown), ""]
    g, c = d["gaps"], d["gc"]
    out.append(f"{d['steps']} steps, {_n(d['step_ms_total'])} ms; between steps {_n(g['total_ms'])} ms "
               f"({_n(g['busy_total_ms'])} with requests in flight), longest {_n(g['longest_ms'])} at "
               f"{g['longest_at_s']} s, longest with requests in flight {_n(g['longest_busy_ms'])} at "
               f"{g['longest_busy_at_s']} s. GC: {c['pauses']} pauses, {_n(c['in_steps_ms'])} ms in steps, "
               f"{_n(c['between_steps_ms'])} between, longest {_n(c['longest_ms'])} (gen {c['longest_generation']}) "
               f"at {c['longest_at_s']} s. Host {_n(d['host_ms_total'])} ms; allocator {_alloc(d['alloc_total'])} "
               f"(read {_n(d['alloc_read_us_mean'])} us/step).")
    return "\n".join(out)
