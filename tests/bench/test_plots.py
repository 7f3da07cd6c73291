"""`--plots DIR` of `turbine bench` (a sweep of load levels, a trace replay) and `turbine
simulate`: the PNGs are written and are images; without matplotlib the run stops at once with
the fix."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from turbine.bench.plots import LoadPoint, trace_load_points, write_run_plots
from turbine.bench.stats import Percentiles, RequestResult
from turbine.bench.trace import MOONCAKE_BLOCK_TOKENS as B
from turbine.bench.trace import TraceRequest, write_trace
from turbine.cli import main


def _assert_png(path: Path) -> None:
    plt_image = pytest.importorskip("matplotlib.image")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    h, w = plt_image.imread(str(path)).shape[:2]
    assert h > 200 and w > 300, (path, h, w)


def _trace(path: Path, n: int = 40) -> Path:
    write_trace(path, [TraceRequest(timestamp_ms=(50.0 if i < n // 2 else 20.0) * i, input_length=B + 5 * i,
                                    output_length=4 + i % 3, hash_ids=(i % 4, 100 + i)) for i in range(n)])
    return path


def _run(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as ex:
        main(argv)
    return int(ex.value.code or 0)


def test_write_run_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    ok = [RequestResult(ok=True, ttft_s=0.01 * (1 + i % 7), itl_s=[0.002 + 0.0001 * j for j in range(20)], e2e_s=0.1)
          for i in range(200)]
    failed = [RequestResult(ok=False, error="x")]
    starts = [0.05 * i for i in range(len(ok))] + [1.0]
    load = trace_load_points(ok + failed, starts)
    assert len(load) >= 4 and all(p.load > 0 and p.ttft_ms.p50 for p in load)
    written = write_run_plots(tmp_path / "p", {"a": ok, "b": ok[:50] + failed, "empty": []}, load=load,
                              load_label="req/s", connect=False, trace=(ok + failed, starts), title="t")
    assert {p.name for p in written} == {"ttft_cdf.png", "itl_cdf.png", "latency_vs_load.png", "ttft_over_time.png"}
    for p in written:
        _assert_png(p)
    one = [LoadPoint(1.0, Percentiles.of([1.0]), Percentiles.of([]), 1)]
    written = write_run_plots(tmp_path / "q", {"only": []}, load=one)  # nothing succeeded; one level: no load plot
    assert {p.name for p in written} == {"ttft_cdf.png", "itl_cdf.png"}


def test_simulate_writes_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plots = tmp_path / "plots" / "sim"
    code = _run(["simulate", "--trace", str(_trace(tmp_path / "t.jsonl")), "--workers", "2", "--router", "kv",
                 "--no-progress", "--json", str(tmp_path / "s.json"), "--plots", str(plots)])
    assert code == 0
    names = {"ttft_cdf.png", "itl_cdf.png", "latency_vs_load.png", "ttft_over_time.png"}
    assert {p.name for p in plots.iterdir()} == names
    for name in names:
        _assert_png(plots / name)
    assert json.loads((tmp_path / "s.json").read_text())["requests"] == 40


def test_bench_sweep_writes_json_runs_and_plots(tmp_path: Path, server: Any) -> None:
    pytest.importorskip("matplotlib")
    out, plots = tmp_path / "r.json", tmp_path / "plots"
    code = _run(["bench", "--url", server.url, "-c", "1,3", "-n", "6", "--prompt-tokens", "20", "--max-tokens", "4",
                 "--warmup", "0", "--no-progress", "--json", str(out), "--plots", str(plots)])
    assert code == 0
    d = json.loads(out.read_text())
    assert d["sweep"] == "concurrency" and [r["concurrency"] for r in d["runs"]] == [1, 3]
    assert all(r["ok"] == 6 for r in d["runs"])
    for name in ("ttft_cdf.png", "itl_cdf.png", "latency_vs_load.png"):
        _assert_png(plots / name)


def test_bench_trace_replay_writes_plots(tmp_path: Path, server: Any) -> None:
    pytest.importorskip("matplotlib")
    plots = tmp_path / "plots"
    code = _run(["bench", "--url", server.url, "--trace", str(_trace(tmp_path / "t.jsonl", 30)), "--speed", "4",
                 "--no-progress", "--plots", str(plots)])
    assert code == 0
    for name in ("ttft_cdf.png", "itl_cdf.png", "latency_vs_load.png", "ttft_over_time.png"):
        _assert_png(plots / name)


@pytest.mark.parametrize("argv", [
    ["bench", "--url", "http://127.0.0.1:9/v1", "--model", "m", "-n", "3"],
    ["bench", "--url", "http://127.0.0.1:9/v1", "--model", "m", "--trace", "TRACE"],
    ["simulate", "--trace", "TRACE", "--workers", "1"],
], ids=["bench", "bench-trace", "simulate"])
def test_plots_without_matplotlib_is_a_clear_error_before_the_run(argv: list[str], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    trace = str(_trace(tmp_path / "t.jsonl"))
    code = _run([trace if a == "TRACE" else a for a in argv] + ["--no-progress", "--plots", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "plotting needs matplotlib" in err and "pip install 'turbine[bench]'" in err
    assert "Traceback" not in err and "simulated" not in err  # stopped before running anything


def test_load_levels_are_checked() -> None:
    from turbine.bench.loadgen import _levels

    assert _levels(int)("1,4, 16") == [1, 4, 16] and _levels(float)("2.5") == [2.5]
    import argparse

    for bad in ("0", "1,-2", "x", ","):
        with pytest.raises(argparse.ArgumentTypeError):
            _levels(int)(bad)
