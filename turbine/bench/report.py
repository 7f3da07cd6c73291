"""The report both trace replay and the fleet simulator produce: one JSON summary, one table
row, one PNG of TTFT over time. Sharing it is what makes a simulated and a live run comparable.

Definitions (successful requests only, except ``errors``):
- ``hit_rate``: sum of ``cached_tokens`` / sum of ``prompt_tokens`` (usage.prompt_tokens_details);
- ``goodput_rps``: requests per second that met both SLOs: TTFT <= ``slo_ttft_ms`` and mean
  inter-token latency (the request's TPOT, (E2E - TTFT) / (tokens - 1)) <= ``slo_itl_ms``;
- ``itl_ms`` percentiles are over every gap between tokens of every request;
- ``duration_s``: first arrival to last completion (virtual seconds in a simulation).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from turbine.bench.stats import Percentiles, RequestResult, render_table

DEFAULT_SLO_TTFT_MS = 2000.0
DEFAULT_SLO_ITL_MS = 100.0


def mean_itl_s(r: RequestResult) -> float | None:
    """A request's mean inter-token latency; None when it produced fewer than two tokens."""
    if not r.itl_s:
        return None
    return math.fsum(r.itl_s) / len(r.itl_s)


def meets_slo(r: RequestResult, slo_ttft_ms: float, slo_itl_ms: float) -> bool:
    """Successful, first token within ``slo_ttft_ms``, mean gap within ``slo_itl_ms``."""
    if not r.ok or r.ttft_s is None or r.ttft_s * 1e3 > slo_ttft_ms:
        return False
    itl = mean_itl_s(r)
    return itl is None or itl * 1e3 <= slo_itl_ms


def hit_rate(results: Sequence[RequestResult]) -> float | None:
    """Cached prompt tokens / prompt tokens over successful requests that reported both."""
    prompt = cached = 0
    for r in results:
        if r.ok and r.prompt_tokens is not None and r.cached_tokens is not None:
            prompt += r.prompt_tokens
            cached += r.cached_tokens
    return cached / prompt if prompt else None


@dataclass
class TraceReport:
    """One trace run, live or simulated. ``meta`` carries how it was run (mode, router, ...)."""

    requests: int
    ok: int
    errors: int
    duration_s: float
    req_per_s: float
    output_tokens_per_s: float
    ttft_ms: Percentiles
    itl_ms: Percentiles
    e2e_ms: Percentiles
    hit_rate: float | None
    ideal_hit_rate: float | None
    goodput_rps: float
    slo_ttft_ms: float
    slo_itl_ms: float
    meta: dict[str, Any] = field(default_factory=dict)
    first_errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        r = lambda v, d=4: None if v is None else round(v, d)  # noqa: E731
        return {
            "requests": self.requests,
            "ok": self.ok,
            "errors": self.errors,
            "duration_s": r(self.duration_s, 3),
            "req_per_s": r(self.req_per_s, 3),
            "output_tokens_per_s": r(self.output_tokens_per_s, 1),
            "ttft_ms": self.ttft_ms.to_dict(),
            "itl_ms": self.itl_ms.to_dict(),
            "e2e_ms": self.e2e_ms.to_dict(),
            "hit_rate": r(self.hit_rate),
            "ideal_hit_rate": r(self.ideal_hit_rate),
            "goodput_rps": r(self.goodput_rps, 3),
            "slo": {"ttft_ms": self.slo_ttft_ms, "itl_ms": self.slo_itl_ms},
            **self.meta,
            "first_errors": list(self.first_errors),
        }


def summarize_trace(
    results: Sequence[RequestResult],
    duration_s: float,
    *,
    slo_ttft_ms: float = DEFAULT_SLO_TTFT_MS,
    slo_itl_ms: float = DEFAULT_SLO_ITL_MS,
    ideal_hit_rate: float | None = None,
    meta: dict[str, Any] | None = None,
) -> TraceReport:
    """Aggregate per-request results of a trace run (``results`` in any order)."""
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    if not slo_ttft_ms > 0 or not slo_itl_ms > 0:
        raise ValueError(f"SLOs must be positive, got ttft {slo_ttft_ms} ms, itl {slo_itl_ms} ms")
    ok = [x for x in results if x.ok]
    out_tokens = sum(x.output_tokens or 0 for x in ok)
    good = sum(1 for x in ok if meets_slo(x, slo_ttft_ms, slo_itl_ms))
    return TraceReport(
        requests=len(results),
        ok=len(ok),
        errors=len(results) - len(ok),
        duration_s=duration_s,
        req_per_s=len(ok) / duration_s,
        output_tokens_per_s=out_tokens / duration_s,
        ttft_ms=Percentiles.of([x.ttft_s * 1e3 for x in ok if x.ttft_s is not None]),
        itl_ms=Percentiles.of([g * 1e3 for x in ok for g in x.itl_s]),
        e2e_ms=Percentiles.of([x.e2e_s * 1e3 for x in ok if x.e2e_s is not None]),
        hit_rate=hit_rate(results),
        ideal_hit_rate=ideal_hit_rate,
        goodput_rps=good / duration_s,
        slo_ttft_ms=slo_ttft_ms,
        slo_itl_ms=slo_itl_ms,
        meta=dict(meta or {}),
        first_errors=[x.error or "unknown error" for x in results if not x.ok][:8],
    )


# ---- table -----------------------------------------------------------------------------------
def _f(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


TABLE_HEAD = ["run", "ok/req", "req/s", "out tok/s", "TTFT p50", "TTFT p90", "TTFT p99", "ITL p50",
              "ITL p99", "E2E p50", "E2E p99", "hit rate", "ideal", "goodput rps"]


def table_row(rep: TraceReport, label: str) -> list[str]:
    return [label, f"{rep.ok}/{rep.requests}", _f(rep.req_per_s, 2), _f(rep.output_tokens_per_s, 0),
            _f(rep.ttft_ms.p50), _f(rep.ttft_ms.p90), _f(rep.ttft_ms.p99), _f(rep.itl_ms.p50, 2),
            _f(rep.itl_ms.p99, 2), _f(rep.e2e_ms.p50), _f(rep.e2e_ms.p99), _pct(rep.hit_rate),
            _pct(rep.ideal_hit_rate), _f(rep.goodput_rps, 2)]


def format_trace_table(rows: Sequence[tuple[str, TraceReport]], *, markdown: bool = False) -> str:
    """One row per (label, report); latencies in ms."""
    return render_table(TABLE_HEAD, [table_row(rep, label) for label, rep in rows], markdown=markdown)


# ---- plots -----------------------------------------------------------------------------------
class PlotUnavailable(RuntimeError):
    """matplotlib is not installed; the message says how to get it."""


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable(
            "plotting needs matplotlib: pip install 'turbine[bench]' (or pip install matplotlib)"
        ) from None
    return plt


def _rolling_median(ys: Sequence[float], half: int) -> list[float]:
    out = []
    for i in range(len(ys)):
        window = sorted(ys[max(0, i - half) : i + half + 1])
        out.append(window[len(window) // 2])
    return out


def plot_ttft_over_time(
    results: Sequence[RequestResult], start_s: Sequence[float], path: str, *, title: str = ""
) -> None:
    """Scatter of each request's TTFT (ms, log scale) at its send time, with a rolling median."""
    if len(results) != len(start_s):
        raise ValueError("results and start times differ in length")
    plt = _pyplot()
    pts = sorted((t, r.ttft_s * 1e3) for t, r in zip(start_s, results) if r.ok and r.ttft_s is not None)
    errors = sum(1 for r in results if not r.ok)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    if pts:
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        half = max(2, len(ys) // 40)
        ax.scatter(xs, ys, s=4, alpha=0.4, label="request TTFT")
        ax.plot(xs, _rolling_median(ys, half), color="C3", lw=1.5, label=f"rolling median of {2 * half + 1}")
        ax.set_yscale("log")
        ax.legend(loc="upper left")
    ax.set_xlabel("request send time (s)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title((title or "TTFT over time") + (f" ({errors} errors not shown)" if errors else ""))
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lines(
    series: dict[str, list[tuple[float, float | None]]], path: str, *, xlabel: str, ylabel: str,
    title: str = "", logy: bool = False,
) -> None:
    """One line per series of (x, y) points; None values are skipped."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for name, pts in series.items():
        pts = [(x, y) for x, y in pts if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def try_plot(fn: Any, *args: Any, **kwargs: Any) -> str | None:
    """Call a plot function; return None on success or a one-line reason it could not plot.
    A run's numbers matter more than its picture: a missing matplotlib never fails the run."""
    try:
        fn(*args, **kwargs)
    except PlotUnavailable as e:
        return str(e)
    except (OSError, ValueError) as e:
        return f"could not write the plot: {e}"
    return None


__all__ = [
    "DEFAULT_SLO_ITL_MS", "DEFAULT_SLO_TTFT_MS", "PlotUnavailable", "TraceReport", "format_trace_table",
    "hit_rate", "mean_itl_s", "meets_slo", "plot_lines", "plot_ttft_over_time", "summarize_trace",
    "table_row", "try_plot",
]
