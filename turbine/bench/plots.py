"""The PNGs ``turbine bench`` and ``turbine simulate`` write with ``--plots DIR``.

    ttft_cdf.png          TTFT CDF, one line per run (per load level of a sweep)
    itl_cdf.png           inter-token latency CDF, the same runs
    latency_vs_load.png   TTFT and ITL percentiles against load: a bench sweep's concurrency or rate
                          levels, or a trace's (replayed or simulated) windows by their arrival rate
    ttft_over_time.png    a trace's TTFT at each send time (report.plot_ttft_over_time)

``require_plots`` runs before any request is sent, so a missing matplotlib (or a directory that
cannot be made) fails in a second with the fix, not after the run.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from turbine.bench.report import PlotUnavailable, _pyplot, plot_ttft_over_time
from turbine.bench.stats import Percentiles, RequestResult

_CDF_POINTS = 2000  # a CDF line is drawn through this many quantiles at most (a trace has millions of gaps)


class LoadPoint(NamedTuple):
    load: float  # concurrency, or requests/s
    ttft_ms: Percentiles
    itl_ms: Percentiles
    requests: int


def require_plots(plots_dir: str | Path) -> Path:
    """The directory, made if needed; PlotUnavailable without matplotlib, OSError if not writable."""
    _pyplot()
    d = Path(plots_dir)
    d.mkdir(parents=True, exist_ok=True)
    return d


def _ms(results: Sequence[RequestResult]) -> tuple[list[float], list[float]]:
    ok = [r for r in results if r.ok]
    return ([r.ttft_s * 1e3 for r in ok if r.ttft_s is not None], [g * 1e3 for r in ok for g in r.itl_s])


def _cdf(values: list[float]) -> tuple[list[float], list[float]]:
    xs = sorted(values)
    n = len(xs)
    if n <= _CDF_POINTS:
        return xs, [(i + 1) / n for i in range(n)]
    idx = [min(n - 1, math.ceil(k * n / _CDF_POINTS) - 1) for k in range(1, _CDF_POINTS + 1)]
    return [xs[i] for i in idx], [(i + 1) / n for i in idx]


def _plain_numbers(axis: Any) -> None:
    """A log axis labelled 5, 10, 20 rather than 5x10^0; across decades, minor ticks at 2 and 5 only."""
    from matplotlib.ticker import FuncFormatter

    def minor(v: float, _pos: int) -> str:
        lo, hi = axis.get_view_interval()
        wide = lo > 0 and hi / lo > 30
        mantissa = round(v / 10 ** math.floor(math.log10(v)), 6) if v > 0 else 0
        return "" if wide and mantissa not in (2, 5) else f"{v:g}"

    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(minor))


def plot_cdfs(series: dict[str, list[float]], path: str | Path, *, xlabel: str, title: str) -> None:
    """One CDF line per series (milliseconds, log x); empty series are left out."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    drawn = 0
    for label, values in series.items():
        values = [v for v in values if v > 0]
        if values:
            xs, ys = _cdf(values)
            ax.step(xs, ys, where="post", label=f"{label} (n={len(values):,})")
            drawn += 1
    if drawn:
        ax.set_xscale("log")
        _plain_numbers(ax.xaxis)
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no successful measurements", ha="center", va="center", transform=ax.transAxes)
    for p in (0.5, 0.9, 0.99):
        ax.axhline(p, color="0.7", lw=0.6, ls=":")
    ax.set_ylim(0, 1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of measurements")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency_vs_load(points: Sequence[LoadPoint], path: str | Path, *, xlabel: str, title: str,
                         connect: bool = True) -> None:
    """TTFT and ITL p50/p90/p99 (ms, log) against load; ``connect``: a sweep's levels as lines,
    else (a trace's windows) as points."""
    plt = _pyplot()
    pts = sorted(points, key=lambda p: p.load)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, metric, name in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "itl_ms", "inter-token latency")):
        for q, color in (("p50", "C0"), ("p90", "C1"), ("p99", "C3")):
            xy = [(p.load, getattr(getattr(p, metric), q)) for p in pts]
            xy = [(x, y) for x, y in xy if y is not None and y > 0]
            if xy:
                ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", ms=4, color=color,
                        ls="-" if connect else "none", label=q)
        if ax.get_lines():
            ax.set_yscale("log")
            _plain_numbers(ax.yaxis)
            ax.legend(loc="upper left", fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{name} (ms)")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trace_load_points(results: Sequence[RequestResult], start_s: Sequence[float], *,
                      windows: int | None = None, min_requests: int = 3) -> list[LoadPoint]:
    """A trace run cut into equal windows of send time: each window's arrival rate and the
    latencies of the requests sent in it (windows with fewer than ``min_requests`` successes are
    left out). ``windows`` by default: one per ~25 requests, 4 to 30."""
    if len(results) != len(start_s):
        raise ValueError("results and start times differ in length")
    if not results:
        return []
    t0, t1 = min(start_s), max(start_s)
    n = windows or max(4, min(30, len(results) // 25))
    width = (t1 - t0) / n if t1 > t0 else 1.0
    groups: list[list[RequestResult]] = [[] for _ in range(n)]
    for r, t in zip(results, start_s):
        groups[min(n - 1, int((t - t0) / width))].append(r)
    out = []
    for g in groups:
        ttft, itl = _ms(g)
        if len(ttft) >= min_requests:
            out.append(LoadPoint(len(g) / width, Percentiles.of(ttft), Percentiles.of(itl), len(g)))
    return out


def sweep_load_point(load: float, results: Sequence[RequestResult]) -> LoadPoint:
    ttft, itl = _ms(results)
    return LoadPoint(load, Percentiles.of(ttft), Percentiles.of(itl), len(results))


def write_run_plots(plots_dir: str | Path, runs: dict[str, Sequence[RequestResult]], *,
                    load: Sequence[LoadPoint] = (), load_label: str = "", connect: bool = True,
                    trace: tuple[Sequence[RequestResult], Sequence[float]] | None = None,
                    title: str = "") -> list[Path]:
    """Every PNG a run has: CDFs of ``runs`` (label -> results), latency vs load when ``load`` has
    two points or more, TTFT over time for a ``trace`` (results, send times). The paths written."""
    d = require_plots(plots_dir)
    suffix = f": {title}" if title else ""
    written = []
    ms = {label: _ms(res) for label, res in runs.items()}
    plot_cdfs({k: v[0] for k, v in ms.items()}, d / "ttft_cdf.png", xlabel="time to first token (ms)",
              title="TTFT CDF" + suffix)
    plot_cdfs({k: v[1] for k, v in ms.items()}, d / "itl_cdf.png", xlabel="inter-token latency (ms)",
              title="Inter-token latency CDF" + suffix)
    written += [d / "ttft_cdf.png", d / "itl_cdf.png"]
    if len(load) >= 2:
        plot_latency_vs_load(load, d / "latency_vs_load.png", xlabel=load_label, title="Latency vs load" + suffix,
                             connect=connect)
        written.append(d / "latency_vs_load.png")
    if trace is not None:
        plot_ttft_over_time(trace[0], trace[1], str(d / "ttft_over_time.png"), title="TTFT over time" + suffix)
        written.append(d / "ttft_over_time.png")
    return written


__all__ = ["LoadPoint", "PlotUnavailable", "plot_cdfs", "plot_latency_vs_load", "require_plots", "sweep_load_point",
           "trace_load_points", "write_run_plots"]
