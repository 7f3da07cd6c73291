"""`turbine simulate`: the command line writes the same JSON summary as a live replay."""
from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from turbine.bench.trace import MOONCAKE_BLOCK_TOKENS as B
from turbine.bench.trace import TraceRequest, write_trace
from turbine.cli import main


def _trace(path: Path) -> Path:
    reqs = [TraceRequest(timestamp_ms=100.0 * i, input_length=2 * B - 7 * i, output_length=5 + i % 4,
                         hash_ids=(i % 3, 100 + i)) for i in range(24)]
    write_trace(path, reqs)
    return path


@pytest.mark.parametrize("router", ["round-robin", "least-loaded"])
def test_simulate_writes_the_shared_summary(tmp_path: Path, router: str) -> None:
    out = tmp_path / "out.json"
    with pytest.raises(SystemExit) as ex:
        main(["simulate", "--trace", str(_trace(tmp_path / "t.jsonl")), "--workers", "3", "--router", router,
              "--speed", "2", "--max-requests", "20", "--json", str(out), "--no-progress",
              "--num-gpu-blocks", "2048", "--slo-ttft", "1000", "--slo-itl", "50"])
    assert ex.value.code == 0
    d = msgspec.json.decode(out.read_bytes())
    assert d["requests"] == 20 and d["errors"] == 0 and d["mode"] == "sim"
    for key in ("ttft_ms", "itl_ms", "e2e_ms"):
        assert set(d[key]) == {"p50", "p90", "p99"} and d[key]["p50"] > 0
    assert 0 < d["hit_rate"] < 1 and d["ideal_hit_rate"] == pytest.approx(0.425)  # 17 of 40 blocks seen before
    assert d["output_tokens_per_s"] > 0 and d["goodput_rps"] > 0
    assert d["router"] == router and d["workers"] == 3 and d["speed"] == 2.0
    assert d["mocker"]["num_gpu_blocks"] == 2048 and d["slo"] == {"ttft_ms": 1000.0, "itl_ms": 50.0}
    assert sum(d["sim"]["requests_per_worker"]) == 20


def test_simulate_plot_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "ttft.png"
    with pytest.raises(SystemExit) as ex:
        main(["simulate", "--trace", str(_trace(tmp_path / "t.jsonl")), "--router", "random", "--workers", "2",
              "--plot", str(png), "--no-progress"])
    assert ex.value.code == 0 and png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit) as ex:
        main(["simulate", "--trace", str(tmp_path / "missing.jsonl"), "--no-progress"])
    assert ex.value.code == 2 and "missing.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ex:
        main(["simulate", "--trace", str(tmp_path / "t.jsonl"), "--router", "random", "--router-approx"])
    assert ex.value.code == 2 and "predicted routers only" in capsys.readouterr().err


def test_simulate_schedules_ahead_as_the_profile_or_the_flag_says(tmp_path: Path) -> None:
    """A profile measured on an async-scheduling engine makes the simulated workers schedule one
    step ahead (a request joins a step later: higher TTFT); --mock-async-scheduling overrides."""
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"meta": {"async_scheduling": True},
                                   "prefill": {"new_tokens": [1, 100_000], "ms": [20.0, 2020.0]},
                                   "decode": {"batch_size": [1, 1000], "ms": [8.0, 40.0]}}))
    trace = _trace(tmp_path / "t.jsonl")
    ttft = {}
    for flag in ("auto", "off"):
        out = tmp_path / f"{flag}.json"
        with pytest.raises(SystemExit) as ex:
            main(["simulate", "--trace", str(trace), "--workers", "1", "--router", "round-robin", "--speed", "100",
                  "--max-requests", "20", "--json", str(out), "--no-progress", "--num-gpu-blocks", "2048",
                  "--profile", str(profile), "--mock-async-scheduling", flag])
        assert ex.value.code == 0
        d = msgspec.json.decode(out.read_bytes())
        assert d["mocker"]["async_scheduling"] == (None if flag == "auto" else False)
        ttft[flag] = d["ttft_ms"]["p50"]
    assert ttft["auto"] > ttft["off"]
