"""Grid arithmetic of a profile: measured cells moved onto the nominal axes, unmeasured cells
filled, the mixed points laid out as a grid. Pure functions over lists (no engine, no clock)."""
from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["clip_axis", "fill_rows", "ints", "mixed_table", "regrid", "round_ms"]


def mixed_table(points: list[dict[str, float]]) -> dict[str, Any] | None:
    """The mixed points as the profile's ``mixed`` grid: the token counts measured at every batch
    size (a count the step budget cut at some batch is dropped); None under two points a side."""
    cells = {(int(p["new_tokens"]), int(p["batch_size"])): float(p["ms"]) for p in points}
    batches = sorted({b for _, b in cells})
    news = sorted(n for n in {n for n, _ in cells} if all((n, b) in cells for b in batches))
    if len(news) < 2 or len(batches) < 2:
        return None
    return {"new_tokens": news, "batch_size": batches,
            "context_length": round(statistics.fmean(p["decode_context"] for p in points), 1),
            "ms": [[round(cells[n, b], 4) for b in batches] for n in news]}


def clip_axis(values: Iterable[int], hi: int) -> list[int]:
    kept = [v for v in values if v <= hi]
    return kept or [hi]


def ints(xs: list[float]) -> list[int]:
    return [int(x) for x in xs]


def round_ms(ms: list[list[float | None]]) -> list[list[float]]:
    return [[round(float(v), 4) for v in row] for row in ms]  # type: ignore[arg-type]


def regrid(ms: list[list[float | None]], measured_at: list[list[float | None]], axis: Sequence[float]) -> None:
    """Move each row's measured values from the contexts they were measured at (sequences grow
    a token per step) onto the nominal axis, piecewise linearly through the row's own points."""
    for i, row in enumerate(ms):
        pts = [(measured_at[i][j], v) for j, v in enumerate(row) if v is not None]
        if len(pts) < 2:
            continue
        for j, v in enumerate(row):
            if v is not None:
                k = min(max(sum(1 for x, _ in pts if x <= axis[j]) - 1, 0), len(pts) - 2)
                (x0, y0), (x1, y1) = pts[k], pts[k + 1]
                row[j] = max(0.0, y0 + (y1 - y0) * (axis[j] - x0) / (x1 - x0))  # type: ignore[operator]


def fill_rows(ms: list[list[float | None]], axis: Sequence[float]) -> list[list[int]]:
    """Fill unmeasured cells in place; return their [row, col] indices.

    Within a column (fixed context) a missing row past the last measured ones is extrapolated
    linearly in the row axis from the last two measured rows (never decreasing); otherwise the
    cell follows the shape of the first column with two measured rows (ratio at the nearest
    measured row), or copies that row."""
    filled: list[list[int]] = []
    n_rows, n_cols = len(ms), len(ms[0])
    ref = next((j for j in range(n_cols) if sum(ms[i][j] is not None for i in range(n_rows)) >= 2), None)
    for j in range(n_cols):
        have = [i for i in range(n_rows) if ms[i][j] is not None]
        if not have:
            raise ValueError(f"column {j} of a profile table has no measured point")
        for i in range(n_rows):
            if ms[i][j] is not None:
                continue
            near = min(have, key=lambda h: abs(h - i))
            if len(have) >= 2 and i > have[-1]:
                a, b = have[-2], have[-1]
                slope = (ms[b][j] - ms[a][j]) / (axis[b] - axis[a])  # type: ignore[operator]
                ms[i][j] = ms[b][j] + max(0.0, slope) * (axis[i] - axis[b])  # type: ignore[operator]
            elif ref is not None and ms[i][ref] is not None and ms[near][ref]:
                ms[i][j] = ms[near][j] * ms[i][ref] / ms[near][ref]  # type: ignore[operator]
            else:
                ms[i][j] = ms[near][j]
            filled.append([i, j])
    return filled
