"""Fidelity plumbing: the workload, the comparison, the step log, and a whole run (mocker vs
mocker without torch; the built-in engine end to end through bench/mocker_fidelity.py)."""
from __future__ import annotations

import importlib.util
import itertools
import json
import statistics
from pathlib import Path

import pytest
from testkit import load_bench

from turbine.bench.stats import RequestResult
from turbine.mocker.core import MockerConfig, MockerCore
from turbine.mocker.engine import MockEngine
from turbine.mocker.timing import PolynomialTiming, ProfileTiming
from turbine.profiler.fidelity import (
    StepRecorder,
    additive_timing,
    compare_runs,
    format_fidelity,
    mixed_summary,
    mock_timings,
    run_fidelity,
    step_accuracy,
    step_cadence,
)
from turbine.profiler.workload import (
    EngineRun,
    WorkItem,
    WorkloadConfig,
    build_workload,
    simulate_workload,
)
from turbine.protocols.generate import GenerateRequest, StopConditions

pytestmark = pytest.mark.timeout(90)

FLAT = {"prefill": {"new_tokens": [1, 10_000], "ms": [1.0, 11.0]}, "decode": {"batch_size": [1, 101], "ms": [1.0, 2.0]}}
SMALL = WorkloadConfig(phases=((1, 3), (4, 6), (16, 12)), prompt_tokens=(16, 200), output_tokens=(2, 6),
                       prefix_groups=2, prefix_tokens=48, prefix_share=0.5, warmup_requests=2, seed=3)


def test_workload_is_deterministic_and_shaped_as_asked() -> None:
    cfg = WorkloadConfig(seed=7)
    kw = {"vocab_size": 1000, "timing": PolynomialTiming(), "context_length": 4096}
    warm, items = build_workload(cfg, **kw)  # type: ignore[arg-type]
    assert (warm, items) == build_workload(cfg, **kw)  # type: ignore[arg-type]
    assert build_workload(WorkloadConfig(seed=8), **kw)[1] != items  # type: ignore[arg-type]
    assert len(warm) == 4 and len(items) == 240 and [w.phase for w in items] == sorted(w.phase for w in items)
    assert all(b.arrival_s > a.arrival_s for a, b in itertools.pairwise(items))
    assert all(64 <= len(w.token_ids) <= 2048 and 16 <= w.max_tokens <= 128 for w in items)
    heads = [tuple(w.token_ids[:512]) for w in items if len(w.token_ids) > 512]
    shared = [h for h in heads if heads.count(h) > 1]
    assert 0.3 < len(shared) / len(heads) < 0.9 and len(set(shared)) <= 4
    # higher target concurrency: requests arrive faster
    gaps = [statistics.fmean(b.arrival_s - a.arrival_s for a, b in itertools.pairwise(items) if a.phase == b.phase == p)
            for p in range(4)]
    assert gaps == sorted(gaps, reverse=True)
    with pytest.raises(ValueError, match="context length"):
        build_workload(cfg, vocab_size=1000, timing=PolynomialTiming(), context_length=100)
    with pytest.raises(ValueError):
        WorkloadConfig(phases=((0, 4),))


def test_additive_timing_drops_the_mixed_grid_and_the_lookahead() -> None:
    profile = {"meta": {"async_scheduling": True},
               "prefill": {"new_tokens": [1, 1001], "ms": [10.0, 110.0]},
               "decode": {"batch_size": [1, 101], "context_length": [0, 1000], "ms": [[8, 18], [28, 38]]},
               "mixed": {"new_tokens": [1, 1001], "batch_size": [1, 101], "context_length": 500,
                         "ms": [[14.0, 34.0], [114.0, 134.0]]}}
    full, base = ProfileTiming(profile), additive_timing(profile)
    assert full.async_scheduling and base.async_scheduling is False and not base.has_mixed
    # decode(b=11, L=500) = 13 + 0.1 * 20 = 15; prefill(100) = 19.9; mixed(100, 11) = 14 + 9.9 + 2 = 25.9
    assert base.step_seconds(100, 11, 0.0, mean_decode_context=500) == pytest.approx((15 + 19.9) * 1e-3)
    assert full.step_seconds(100, 11, 0.0, mean_decode_context=500) == pytest.approx(25.9e-3)
    assert base.step_seconds(100, 0, 0.0) == full.step_seconds(100, 0, 0.0)
    summary = mixed_summary(profile, [{"new_tokens": 100, "batch_size": 11, "decode_context": 500, "ms": 25.9}], 500)
    assert summary["points"][0]["additive_over_measured"] == pytest.approx(34.9 / 25.9, abs=1e-3)


def _run(label: str, ttft_ms: list[float], itl_ms: list[float]) -> EngineRun:
    items = [WorkItem(0.01 * i, i % 2, [1, 2], 3) for i in range(len(ttft_ms))]
    results = [RequestResult(ok=True, ttft_s=t / 1e3, itl_s=[g / 1e3 for g in itl_ms], e2e_s=0.05) for t in ttft_ms]
    return EngineRun(label, items, results, [w.arrival_s for w in items], 1.0)


def test_compare_reports_ratios_and_targets() -> None:
    real = _run("real", [10.0] * 10, [5.0, 5.0, 5.0, 50.0])
    cmp = compare_runs(real, {"close": _run("close", [10.5] * 10, [5.2, 5.2, 5.2, 58.0]),
                              "far": _run("far", [20.0] * 10, [5.0, 5.0, 5.0, 50.0])})
    close, far = cmp["mocks"]["close"], cmp["mocks"]["far"]
    assert close["ratio"]["ttft_p50"] == pytest.approx(1.05) and all(close["met"].values())
    assert far["ratio"]["ttft_p50"] == 2.0 and not far["met"]["ttft_p50"] and far["met"]["itl_p99"]
    assert set(cmp["real"]["phases"]) == {"0", "1"} and cmp["real"]["ok"] == 10
    table = format_fidelity(cmp, markdown=True)
    assert "TTFT p50 (ms)" in table and "2.00 MISS" in table and "1.05 ok" in table


def test_virtual_clock_follows_the_mockers_step_times() -> None:
    """Flat 1 ms steps (prefill 1 + decode 1 ms when mixed): every time is a small sum."""
    flat = ProfileTiming({"prefill": {"new_tokens": [1, 9999], "ms": [1.0, 1.0]},
                          "decode": {"batch_size": [1, 999], "ms": [1.0, 1.0]}})
    core = MockerCore(MockerConfig(block_size=4, num_gpu_blocks=256), vocab_size=100, timing=flat)
    items = [WorkItem(0.0, 0, list(range(1, 9)), 3), WorkItem(0.0105, 0, list(range(20, 30)), 2)]
    run = simulate_workload(core, items, label="v")
    a, b = run.results
    # a: prefill [0, 1 ms] -> token, decodes end at 2 and 3 ms
    assert a.ttft_s == pytest.approx(0.001) and a.itl_s == pytest.approx([0.001, 0.001])
    # b arrives at 10.5 ms on an idle engine: its prefill starts then
    assert b.ttft_s == pytest.approx(0.001) and b.e2e_s == pytest.approx(0.002) and a.ok and b.ok
    assert run.duration_s == pytest.approx(0.0125) and not core.has_work()
    with pytest.raises(ValueError, match="unknown mock variant"):
        mock_timings("unused.json", ["profile@wall"])


def test_step_recorder_logs_and_restores() -> None:
    core = MockerCore(MockerConfig(block_size=4, num_gpu_blocks=64), vocab_size=100, timing=ProfileTiming(FLAT))
    rec = StepRecorder(core)
    for i in range(3):
        core.add_request(GenerateRequest(request_id=f"r{i}", token_ids=list(range(1, 10 + i)),
                                         stop=StopConditions(max_tokens=3, min_tokens=3, ignore_eos=True)))
    while core.has_work():
        core.step()
    rec.close()
    assert "step" not in core.__dict__
    kinds = [(r.prefill_tokens > 0, r.decode_seqs) for r in rec.records]
    assert kinds == [(True, 0), (False, 3), (False, 3)]
    assert rec.records[1].decode_context == pytest.approx(statistics.fmean([10, 11, 12]))
    acc = step_accuracy(rec.records, ProfileTiming(FLAT))  # the mocker's own durations: exact
    assert acc["decode"]["median"] == 1.0 and acc["prefill"]["median"] == 1.0
    assert step_cadence(rec.records)["steps"] == 3


async def test_mocker_against_itself() -> None:
    """The plumbing of a run, with a MockEngine as the 'real' engine (same profile, no torch)."""
    real = MockEngine(MockerConfig(block_size=16, num_gpu_blocks=512, max_num_batched_tokens=512, context_length=1024),
                      vocab_size=1000, timing=ProfileTiming(FLAT))
    rec = StepRecorder(real.core)
    path = Path(__file__).parent / "_flat_profile.json"
    try:
        path.write_text(json.dumps(FLAT))
        res = await run_fidelity(real, str(path), vocab_size=1000, max_num_batched_tokens=512, workload=SMALL,
                                 recorder=rec)
    finally:
        rec.close()
        path.unlink()
    cmp = res.comparison
    assert cmp["real"]["ok"] == cmp["real"]["requests"] == 21
    assert list(cmp["mocks"]) == ["profile", "profile@virtual", "additive@virtual"]
    for m in cmp["mocks"].values():
        assert m["ok"] == 21 and set(m["ratio"]) == {"ttft_p50", "ttft_p99", "itl_p50", "itl_p99"}
        assert m["cached_tokens_mean"] > 0  # shared prefixes hit in the mocker too
    assert cmp["steps"]["profile"]["decode"]["median"] == 1.0  # predicted = the mocker's own time
    assert cmp["workload"]["requests"] == 21 and len(res.samples) == 4
    assert res.samples["real"]["itl_ms"] and len(res.samples["real"]["ttft_ms"]) == 21
    assert res.steps and all(m > 0 for m, _, _ in res.steps)


def test_bench_script_end_to_end_on_cpu(model_dir: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    bench = load_bench("mocker_fidelity")
    bench.QUICK_WORKLOAD = SMALL
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--model", str(model_dir), "--device", "cpu", "--quick", "--out", str(out),
                           "--no-results", "--no-progress", "--num-gpu-blocks", "2048", "--torch-threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    rep = json.loads((out / "fidelity.json").read_text())
    fid = rep["fidelity"]
    assert fid["real"]["ok"] == fid["real"]["requests"] == 21
    assert {k: v["ok"] for k, v in fid["mocks"].items()} == {"profile": 21, "profile@virtual": 21,
                                                            "additive@virtual": 21}
    assert fid["steps"]["cadence"]["steps"] > 0 and fid["steps"]["profile"]
    assert rep["profile_meta"]["num_kv_blocks"] == 2048 and rep["meta"]["device_type"] == "cpu"
    assert ProfileTiming.from_file(out / "profile.json").decode_ms(1, 128) > 0
    md = (out / "mocker_fidelity.md").read_text()
    assert md.startswith("## mocker_fidelity") and "| TTFT p50 (ms)" in md
    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("prefill.png", "decode.png", "fidelity_cdf.png", "fidelity_steps.png"):
            assert (out / name).read_bytes()[:4] == b"\x89PNG"
