"""The shared trace report: percentiles, goodput under an SLO, hit rate, JSON shape, plots."""
from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest

from turbine.bench.report import (
    PlotUnavailable,
    format_trace_table,
    hit_rate,
    mean_itl_s,
    meets_slo,
    plot_ttft_over_time,
    summarize_trace,
    try_plot,
)
from turbine.bench.stats import RequestResult


def _ok(ttft: float, itl: list[float], prompt: int = 100, cached: int = 0, out: int | None = None) -> RequestResult:
    return RequestResult(ok=True, ttft_s=ttft, itl_s=itl, e2e_s=ttft + sum(itl), prompt_tokens=prompt,
                         cached_tokens=cached, output_tokens=out if out is not None else len(itl) + 1)


def test_mean_itl_and_slo() -> None:
    r = _ok(0.5, [0.01, 0.03])
    assert mean_itl_s(r) == pytest.approx(0.02)
    assert meets_slo(r, slo_ttft_ms=500, slo_itl_ms=20)
    assert not meets_slo(r, slo_ttft_ms=499, slo_itl_ms=20)
    assert not meets_slo(r, slo_ttft_ms=500, slo_itl_ms=19.9)
    assert meets_slo(_ok(0.1, []), 200, 1)  # one token: no gap to judge
    assert not meets_slo(RequestResult(ok=False, error="x"), 1e9, 1e9)


def test_hit_rate_weights_by_prompt_tokens() -> None:
    rs = [_ok(0.1, [], prompt=1000, cached=900), _ok(0.1, [], prompt=3000, cached=100),
          RequestResult(ok=False, prompt_tokens=5000, cached_tokens=5000),
          RequestResult(ok=True, ttft_s=0.1, prompt_tokens=7, cached_tokens=None)]
    assert hit_rate(rs) == pytest.approx(1000 / 4000)
    assert hit_rate([]) is None


def test_summary_numbers() -> None:
    # TTFTs 0.1 .. 1.0 s; ITL gaps: request i has gaps of i ms (two of them).
    rs = [_ok(0.1 * i, [0.001 * i, 0.001 * i], prompt=100, cached=50) for i in range(1, 11)]
    rs.append(RequestResult(ok=False, error="HTTP 500: boom"))
    rep = summarize_trace(rs, 4.0, slo_ttft_ms=500, slo_itl_ms=4, ideal_hit_rate=0.6, meta={"mode": "sim"})
    assert (rep.requests, rep.ok, rep.errors) == (11, 10, 1)
    assert rep.ttft_ms.p50 == pytest.approx(550.0)  # numpy-style interpolation of 100..1000
    assert rep.ttft_ms.p99 == pytest.approx(991.0)
    assert rep.itl_ms.p50 == pytest.approx(5.5)
    assert rep.output_tokens_per_s == pytest.approx(30 / 4.0)
    assert rep.req_per_s == pytest.approx(10 / 4.0)
    assert rep.hit_rate == pytest.approx(0.5)
    # Meeting both: TTFT <= 500 ms (i <= 5) and mean ITL <= 4 ms (i <= 4): 4 requests in 4 s.
    assert rep.goodput_rps == pytest.approx(1.0)
    d = json.loads(json.dumps(rep.to_dict()))
    for key in ("requests", "ttft_ms", "itl_ms", "e2e_ms", "output_tokens_per_s", "hit_rate", "goodput_rps",
                "ideal_hit_rate", "errors", "duration_s"):
        assert key in d
    assert set(d["ttft_ms"]) == {"p50", "p90", "p99"}
    assert d["mode"] == "sim" and d["first_errors"] == ["HTTP 500: boom"]
    assert "live" in format_trace_table([("live", rep)])


def test_summary_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="duration"):
        summarize_trace([], 0.0)
    with pytest.raises(ValueError, match="SLO"):
        summarize_trace([], 1.0, slo_ttft_ms=0)


def test_plot_writes_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rs = [_ok(0.01 * (i % 7 + 1), [0.001]) for i in range(50)] + [RequestResult(ok=False, error="x")]
    out = tmp_path / "ttft.png"
    assert try_plot(plot_ttft_over_time, rs, [0.1 * i for i in range(51)], str(out)) is None
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_matplotlib_is_a_message_not_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name: str, *a: object, **kw: object) -> object:
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib here")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(PlotUnavailable, match="pip install"):
        plot_ttft_over_time([], [], str(tmp_path / "x.png"))
    msg = try_plot(plot_ttft_over_time, [], [], str(tmp_path / "x.png"))
    assert msg is not None and "matplotlib" in msg
    assert not (tmp_path / "x.png").exists()
