"""PNG plots of a timing profile and of a fidelity run (matplotlib, imported only here).

A missing matplotlib never fails a run: each function returns one line per file, either the path
it wrote or why it could not (the numbers are in the JSON anyway).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from turbine.bench.report import PlotUnavailable

__all__ = ["plot_fidelity", "plot_profile"]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("plots need matplotlib (pip install 'turbine[bench]')") from None
    return plt


def _save(plt: Any, fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


def plot_profile(profile: dict[str, Any], out_dir: str | os.PathLike[str]) -> list[str]:
    """prefill.png (ms vs new tokens, one line per cached context) and decode.png (ms vs batch
    size, one line per context length); filled (unmeasured) cells are drawn hollow."""
    try:
        plt = _pyplot()
    except PlotUnavailable as e:
        return [f"no plots: {e}"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = profile.get("meta", {})
    title = " ".join(str(meta[k]) for k in ("model", "device", "dtype") if k in meta)
    lines = []
    for key, xname, yname, filled_key, xlabel, label in (
        ("prefill", "new_tokens", "cached_tokens", "prefill_filled", "new tokens in the step", "cached {:g}"),
        ("decode", "batch_size", "context_length", "decode_filled", "decode batch size", "context {:g}"),
    ):
        sec = profile[key]
        xs, ys, ms = sec[xname], sec.get(yname), sec["ms"]
        cols = ys if ys is not None else [0]
        rows = ms if ys is not None else [[v] for v in ms]
        filled = {tuple(c) for c in meta.get(filled_key, [])}
        fig, ax = plt.subplots(figsize=(8, 5))
        for j, y in enumerate(cols):
            line = ax.plot(xs, [r[j] for r in rows], marker="o", ms=4, label=label.format(y))[0]
            hollow = [(xs[i], rows[i][j]) for i in range(len(xs)) if (i, j) in filled]
            if hollow:
                ax.scatter([h[0] for h in hollow], [h[1] for h in hollow], s=40, facecolors="white",
                           edgecolors=line.get_color(), zorder=3)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("step time (ms)")
        ax.set_title(f"{key} step time — {title}" + ("  (hollow: extrapolated)" if filled else ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        lines.append(_save(plt, fig, out / f"{key}.png"))
    return lines


def _cdf(ax: Any, values: Sequence[float], label: str) -> None:
    xs = sorted(values)
    if xs:
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)


def plot_fidelity(samples: dict[str, dict[str, list[float]]], steps: Sequence[tuple[float, float, str]],
                  out_dir: str | os.PathLike[str], *, title: str = "") -> list[str]:
    """fidelity_cdf.png: TTFT and ITL distributions, one line per engine (``samples[engine]
    ["ttft_ms" | "itl_ms"]``); fidelity_steps.png: each real step's measured ms against the
    profile's prediction (``steps``: (measured, predicted, kind))."""
    try:
        plt = _pyplot()
    except PlotUnavailable as e:
        return [f"no plots: {e}"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, name in ((axes[0], "ttft_ms", "TTFT (ms)"), (axes[1], "itl_ms", "inter-token latency (ms)")):
        for engine, s in samples.items():
            _cdf(ax, s.get(key, []), engine)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of samples")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "real engine vs mocker")
    lines = [_save(plt, fig, out / "fidelity_cdf.png")]
    if steps:
        fig, ax = plt.subplots(figsize=(6.5, 6))
        for kind in sorted({k for _, _, k in steps}):
            pts = [(m, p) for m, p, k in steps if k == kind]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=6, alpha=0.5, label=f"{kind} ({len(pts)})")
        lo = min(min(m, p) for m, p, _ in steps)
        hi = max(max(m, p) for m, p, _ in steps)
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("real step (ms)")
        ax.set_ylabel("profile's prediction (ms)")
        ax.set_title("real engine steps vs the mocker's timing model")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        lines.append(_save(plt, fig, out / "fidelity_steps.png"))
    return lines
