"""Where a fidelity run's time went: the step log's new fields, the TTFT split on a hand-built
timeline (exact numbers), the split on a whole mocker run (it adds up for every request), and
the bench's fidelity.json / snippet on CPU."""
from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from testkit import load_bench

from turbine.bench.stats import RequestResult
from turbine.engine.step import StepOutput
from turbine.mocker.core import MockerConfig
from turbine.mocker.engine import MockEngine
from turbine.mocker.timing import ProfileTiming
from turbine.profiler.diagnosis import diagnose, format_diagnosis, request_timeline
from turbine.profiler.fidelity import GcPause, StepRecord, StepRecorder, run_fidelity
from turbine.profiler.workload import EngineRun, WorkItem, WorkloadConfig

pytestmark = pytest.mark.timeout(90)

# prefill 1 ms per 10 tokens, decode 1 ms flat: predictions are easy to read off
TIMING = {"prefill": {"new_tokens": [0, 1000], "ms": [0.0, 100.0]},
          "decode": {"batch_size": [1, 100], "ms": [1.0, 1.0]}}
SMALL = WorkloadConfig(phases=((1, 3), (4, 6), (16, 12)), prompt_tokens=(16, 200), output_tokens=(2, 6),
                       prefix_groups=2, prefix_tokens=48, prefix_share=0.5, warmup_requests=2, seed=3)


class _Result(NamedTuple):  # a StepResult with the integrator's host_s
    duration_s: float
    outputs: list[StepOutput]
    kv_events: list[Any]
    num_prefill_tokens: int
    num_decode_seqs: int
    num_preempted: int
    host_s: float


class _Core:
    def __init__(self) -> None:
        self.results = [
            _Result(0.002, [StepOutput("a", None, None, 40, 8, 0), StepOutput("b", 7, None, 10, 0, 1)], [], 42, 0, 0,
                    0.0005),
            _Result(0.001, [StepOutput("a", 3, None, 40, 8, 1), StepOutput("b", 9, "length", 10, 0, 2)], [], 8, 1, 1,
                    0.0002),
        ]

    def step(self) -> Any:
        gc.collect()  # a pause inside the step
        return self.results.pop(0)


def test_step_recorder_logs_ids_host_time_and_gc() -> None:
    core = _Core()
    rec = StepRecorder(core)
    assert rec._on_gc in gc.callbacks
    core.step()
    gc.collect()  # between steps: in gc_pauses, in no record
    core.step()
    rec.close()
    assert rec._on_gc not in gc.callbacks and "step" not in core.__dict__
    a, b = rec.records
    assert (a.prefill_ids, a.first_ids, a.decode_ids) == (("a",), ("b",), ())
    assert (b.prefill_ids, b.first_ids, b.decode_ids) == ((), ("a",), ("b",))
    assert (a.host_s, b.host_s, b.preempted) == (0.0005, 0.0002, 1) and a.ms == 2.0
    assert a.start_s <= a.end_s <= b.start_s <= b.end_s and a.alloc is None  # no CUDA here
    assert len(rec.gc_pauses) >= 3 and a.gc_ms > 0 and b.gc_ms > 0
    inside = [p for p in rec.gc_pauses if any(r.start_s <= p.start_s <= r.end_s for r in rec.records)]
    assert sum(p.end_s - p.start_s for p in inside) * 1e3 == pytest.approx(a.gc_ms + b.gc_ms)


def _rec(start: float, end: float, prefill: int, decodes: int, *, ms: float | None = None, pre: tuple = (),
         first: tuple = (), dec: tuple = (), gc_ms: float = 0.0) -> StepRecord:
    alloc = {"num_alloc_retries": 1, "num_device_alloc": 0, "num_device_free": 0}
    return StepRecord((end - start) * 1e3 if ms is None else ms, start, prefill, decodes, 0.0, 0.0, end, pre, first,
                      dec, gc_ms=gc_ms, alloc=alloc)


def test_diagnosis_on_a_hand_built_timeline() -> None:
    """t0 = 100 s. r-0 sent at 0.000, r-1 at 0.005 (while step 1 runs); steps (from t0):
    1 [0.001, 0.011] prefills r-0's first chunk; 2 [0.012, 0.022] r-0's last chunk (first token)
    and r-1's whole prompt (first token); 3 [0.030, 0.031] decodes both (an 8 ms gap before it).
    Clients see r-0's first token at 0.024, r-1's at 0.026."""
    t0 = 100.0
    recs = [_rec(t0 + 0.001, t0 + 0.011, 100, 0, ms=10.0, pre=("r-0",)),
            _rec(t0 + 0.012, t0 + 0.022, 80, 0, ms=9.0, first=("r-0", "r-1"), gc_ms=1.0),
            _rec(t0 + 0.030, t0 + 0.031, 0, 2, ms=1.0, dec=("r-0", "r-1"))]
    recs[0] = recs[0]._replace(waiting=1, running=1, kv_used=0.25)
    recs[1] = recs[1]._replace(waiting=0, running=2, kv_used=0.5)
    items = [WorkItem(0.0, 0, [1] * 100, 2), WorkItem(0.005, 1, [1] * 30, 2)]
    results = [RequestResult(ok=True, ttft_s=0.024, itl_s=[0.008], e2e_s=0.032, cached_tokens=0),
               RequestResult(ok=True, ttft_s=0.021, itl_s=[0.006], e2e_s=0.027, cached_tokens=0)]
    run = EngineRun("r", items, results, [0.0, 0.005], 0.04, t0)
    mock = EngineRun("m", items, [RequestResult(ok=True, ttft_s=0.02), RequestResult(ok=True, ttft_s=0.01)],
                     [0.0, 0.005], 0.04)
    pauses = [GcPause(t0 + 0.013, t0 + 0.014, 0), GcPause(t0 + 0.025, t0 + 0.0255, 2), GcPause(t0 + 9, t0 + 10, 2)]
    d = diagnose(run, list(reversed(recs)), ProfileTiming(TIMING), gc_pauses=pauses, read_us=[20.0, 40.0], mock=mock)

    tl = {t.index: t for t in request_timeline(run, recs)}
    assert [tl[0].queue_ms, tl[0].prefill_ms, tl[0].delivery_ms] == pytest.approx([1.0, 21.0, 2.0])
    assert [tl[1].queue_ms, tl[1].prefill_ms, tl[1].delivery_ms] == pytest.approx([7.0, 10.0, 4.0])
    r0, r1 = d["slowest_requests"]  # by TTFT, largest first
    assert (r0["request"], r1["request"]) == ("r-0", "r-1") and r0["chunks"] == 2 and r1["chunks"] == 1
    assert (r0["in_flight_at_send"], r1["in_flight_at_send"], r1["mock_ttft_ms"]) == (0, 1, 10.0)
    # r-1 waited [0.005, 0.026]: 6 ms of step 1, 1 ms gap, step 2 (10 ms), 4 ms with no step running
    assert r1["window"] == {"steps": 2, "step_ms": 16.0, "gap_ms": 5.0, "prefill_tokens": 180, "preempted": 0,
                            "max_waiting": 1, "max_running": 2, "max_kv_used": 0.5,
                            "longest": {"shape": "P100@0", "ms": 10.0, "predicted_ms": 10.0}}
    assert d["ttft_split_ms"]["send_late"]["p99"] == 0.0
    # measured - predicted: step 2 took 9 ms for 80 tokens (8 predicted), the others exactly theirs
    assert [s["excess_ms"] for s in d["slowest_steps"]] == [1.0, 0.0, 0.0]
    assert d["slowest_steps"][0]["at_s"] == 0.012 and d["slowest_steps"][0]["gc_ms"] == 1.0
    assert d["gaps"] == {"count": 2, "total_ms": 9.0, "busy_total_ms": 9.0, "longest_ms": 8.0, "longest_at_s": 0.022,
                         "longest_busy": True, "longest_busy_ms": 8.0, "longest_busy_at_s": 0.022}
    assert d["gc"] == {"pauses": 2, "in_steps_ms": 1.0, "between_steps_ms": 0.5, "longest_ms": 1.0,
                       "longest_at_s": 0.013, "longest_generation": 0}
    assert d["alloc_total"] == {"num_alloc_retries": 3, "num_device_alloc": 0, "num_device_free": 0}
    assert d["alloc_read_us_mean"] == 30.0 and d["slowest_share"]["queue"] == pytest.approx(8 / 45, abs=1e-3)
    text = format_diagnosis(d, markdown=True)
    assert "| r-0 " in text and "P100@0" in text and "3/0/0" in text and "1/2/50%" in text
    empty = diagnose(EngineRun("e", [], [], [], 0.0), [], ProfileTiming(TIMING))
    assert empty["requests"] == 0 and "0 steps" in format_diagnosis(empty)


async def test_split_adds_up_on_a_mocker_run() -> None:
    """A MockEngine as the 'real' engine (steps on the loop, tokens after the step's sleep)."""
    flat = {"prefill": {"new_tokens": [1, 10_000], "ms": [1.0, 11.0]},
            "decode": {"batch_size": [1, 101], "ms": [1.0, 2.0]}}
    real = MockEngine(MockerConfig(block_size=16, num_gpu_blocks=512, max_num_batched_tokens=64, context_length=1024),
                      vocab_size=1000, timing=ProfileTiming(flat))
    rec = StepRecorder(real.core)
    path = Path(__file__).parent / "_diag_profile.json"
    try:
        path.write_text(json.dumps(flat))
        res = await run_fidelity(real, str(path), vocab_size=1000, max_num_batched_tokens=64, workload=SMALL,
                                 variants=("profile@virtual",), recorder=rec)
    finally:
        rec.close()
        path.unlink()
    d = res.comparison["diagnosis"]
    assert d["requests"] == 21 and d["steps"] == len(rec.records)
    assert all(r.start_s <= r.end_s and r.running is not None and 0 <= r.kv_used <= 1 for r in rec.records)
    # the warm-up's steps were dropped: only the measured run's ids remain
    ids = {i for r in rec.records for i in r.prefill_ids + r.first_ids + r.decode_ids}
    assert ids <= {f"real-{i}" for i in range(21)}
    real_run_ttft = sorted(res.samples["real"]["ttft_ms"], reverse=True)
    assert [s["ttft_ms"] for s in d["slowest_requests"]] == pytest.approx(real_run_ttft[:10], abs=0.01)
    for s in d["slowest_requests"]:
        assert s["queue_ms"] + s["prefill_ms"] + s["delivery_ms"] == pytest.approx(s["ttft_ms"], abs=0.02)
        assert s["window"]["step_ms"] + s["window"]["gap_ms"] == pytest.approx(s["ttft_ms"], abs=0.02)
        assert min(s["queue_ms"], s["prefill_ms"], s["delivery_ms"]) >= 0  # one thread: nothing can overlap
        assert s["mock_ttft_ms"] is not None
    excess = [s["excess_ms"] for s in d["slowest_steps"]]
    assert len(excess) == 10 and excess == sorted(excess, reverse=True)


def test_bench_writes_the_diagnosis(model_dir: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    bench = load_bench("mocker_fidelity", "mocker_fidelity_bench_diag")
    bench.QUICK_WORKLOAD = SMALL
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--model", str(model_dir), "--device", "cpu", "--quick", "--out", str(out), "--no-results",
                           "--no-progress", "--num-gpu-blocks", "512", "--torch-threads", "1",
                           "--variants", "profile@virtual"]) == 0
    finally:
        torch.set_num_threads(threads)
    d = json.loads((out / "fidelity.json").read_text())["fidelity"]["diagnosis"]
    assert d["requests"] == 21 and len(d["slowest_requests"]) == 10 and len(d["slowest_steps"]) == 10
    ttft = [s["ttft_ms"] for s in d["slowest_requests"]]
    assert ttft == sorted(ttft, reverse=True)
    for s in d["slowest_requests"]:
        assert s["queue_ms"] + s["prefill_ms"] + s["delivery_ms"] == pytest.approx(s["ttft_ms"], abs=0.02)
        assert s["prefill_ms"] > 0 and s["window"]["steps"] >= 1
    assert d["ttft_split_ms"]["ttft"]["p50"] > 0 and d["gc"]["pauses"] >= 0 and d["alloc_total"] is None
    md = (out / "mocker_fidelity.md").read_text()
    assert "| TTFT part (ms)" in md and "Slowest first tokens" in md and "Steps furthest above the profile" in md
