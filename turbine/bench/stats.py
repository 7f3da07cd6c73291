"""Per-request measurements → one run's report (percentiles, rates, CPU cost) and its table."""
from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


def percentile(values: Sequence[float], p: float) -> float | None:
    """The ``p``-th percentile (0..100) with linear interpolation (numpy's default); None if empty."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


@dataclass(frozen=True)
class Percentiles:
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles:
        xs = sorted(values)
        return cls(percentile(xs, 50), percentile(xs, 90), percentile(xs, 99))

    def to_dict(self, digits: int = 3) -> dict[str, float | None]:
        r = lambda v: None if v is None else round(v, digits)  # noqa: E731
        return {"p50": r(self.p50), "p90": r(self.p90), "p99": r(self.p99)}


@dataclass
class RequestResult:
    """What one request measured. Times are seconds from the moment the request was sent."""

    ok: bool
    error: str | None = None
    ttft_s: float | None = None  # first chunk carrying content; None without streaming
    itl_s: list[float] = field(default_factory=list)  # gaps between content chunks
    e2e_s: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None  # usage.completion_tokens, else content chunks seen
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens


@dataclass
class LoadReport:
    """Summary of one load phase; warm-up requests are never part of it."""

    label: str
    requests: int
    ok: int
    errors: int
    duration_s: float
    req_per_s: float
    output_tokens_per_s: float
    ttft_ms: Percentiles
    itl_ms: Percentiles
    e2e_ms: Percentiles
    cpu_ms_per_request: dict[str, float | None]
    cpu_pct: dict[str, float | None]
    prompt_tokens_mean: float | None
    cached_tokens_mean: float | None
    output_tokens_mean: float | None
    concurrency: int | None = None
    rate: float | None = None
    stream: bool = True
    fresh_conn: bool = False
    first_errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        r = lambda v, d=2: None if v is None else round(v, d)  # noqa: E731
        return {
            "label": self.label,
            "requests": self.requests,
            "ok": self.ok,
            "errors": self.errors,
            "duration_s": r(self.duration_s, 3),
            "req_per_s": r(self.req_per_s),
            "output_tokens_per_s": r(self.output_tokens_per_s, 1),
            "ttft_ms": self.ttft_ms.to_dict(),
            "itl_ms": self.itl_ms.to_dict(),
            "e2e_ms": self.e2e_ms.to_dict(),
            "cpu_ms_per_request": {k: r(v, 3) for k, v in self.cpu_ms_per_request.items()},
            "cpu_pct": {k: r(v, 1) for k, v in self.cpu_pct.items()},
            "prompt_tokens_mean": r(self.prompt_tokens_mean, 1),
            "cached_tokens_mean": r(self.cached_tokens_mean, 1),
            "output_tokens_mean": r(self.output_tokens_mean, 1),
            "concurrency": self.concurrency,
            "rate": self.rate,
            "stream": self.stream,
            "fresh_conn": self.fresh_conn,
            "first_errors": list(self.first_errors),
        }


def _mean(xs: list[int]) -> float | None:
    return statistics.fmean(xs) if xs else None


def summarize(
    results: Sequence[RequestResult],
    duration_s: float,
    cpu_s: dict[str, float | None] | None = None,
    *,
    label: str = "",
    concurrency: int | None = None,
    rate: float | None = None,
    stream: bool = True,
    fresh_conn: bool = False,
) -> LoadReport:
    """Aggregate one phase. Latency and token statistics use successful requests only; CPU per
    request divides by every request sent (a failed request still cost the server work)."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    ok = [x for x in results if x.ok]
    n = len(results)
    out_tokens = [x.output_tokens for x in ok if x.output_tokens is not None]
    cpu_s = cpu_s or {}
    return LoadReport(
        label=label,
        requests=n,
        ok=len(ok),
        errors=n - len(ok),
        duration_s=duration_s,
        req_per_s=len(ok) / duration_s,
        output_tokens_per_s=sum(out_tokens) / duration_s,
        ttft_ms=Percentiles.of([x.ttft_s * 1e3 for x in ok if x.ttft_s is not None]),
        itl_ms=Percentiles.of([g * 1e3 for x in ok for g in x.itl_s]),
        e2e_ms=Percentiles.of([x.e2e_s * 1e3 for x in ok if x.e2e_s is not None]),
        cpu_ms_per_request={
            k: (None if v is None or n == 0 else v * 1e3 / n) for k, v in cpu_s.items()
        },
        cpu_pct={k: (None if v is None else 100.0 * v / duration_s) for k, v in cpu_s.items()},
        prompt_tokens_mean=_mean([x.prompt_tokens for x in ok if x.prompt_tokens is not None]),
        cached_tokens_mean=_mean([x.cached_tokens for x in ok if x.cached_tokens is not None]),
        output_tokens_mean=_mean(out_tokens),
        concurrency=concurrency,
        rate=rate,
        stream=stream,
        fresh_conn=fresh_conn,
        first_errors=[x.error or "unknown error" for x in results if not x.ok][:8],
    )


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def format_table(reports: Iterable[LoadReport], *, markdown: bool = False) -> str:
    """One row per report: load shape, throughput, TTFT/ITL/E2E p50 and p99 (ms), mean prompt and
    cached tokens, CPU ms per request of each measured process."""
    reports = list(reports)
    cpu_names: list[str] = []
    for rep in reports:
        cpu_names += [k for k in rep.cpu_ms_per_request if k not in cpu_names]
    head = ["label", "load", "ok/req", "req/s", "tok/s", "TTFT p50", "TTFT p99", "ITL p50",
            "ITL p99", "E2E p50", "E2E p99", "prompt tok", "cached tok"] \
        + [f"cpu ms/req {k}" for k in cpu_names]
    rows = []
    for rep in reports:
        load = f"c={rep.concurrency}" if rep.concurrency else f"rate={rep.rate:g}/s"
        rows.append([
            rep.label or "-", load, f"{rep.ok}/{rep.requests}", _fmt(rep.req_per_s),
            _fmt(rep.output_tokens_per_s, 0), _fmt(rep.ttft_ms.p50), _fmt(rep.ttft_ms.p99),
            _fmt(rep.itl_ms.p50, 2), _fmt(rep.itl_ms.p99, 2), _fmt(rep.e2e_ms.p50),
            _fmt(rep.e2e_ms.p99), _fmt(rep.prompt_tokens_mean, 0), _fmt(rep.cached_tokens_mean, 0),
        ] + [_fmt(rep.cpu_ms_per_request.get(k), 2) for k in cpu_names])
    return render_table(head, rows, markdown=markdown)


def render_table(head: list[str], rows: list[list[str]], *, markdown: bool = False) -> str:
    """Left-aligned first column, right-aligned numbers; plain text or a Markdown table."""
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    cell = lambda i, s: str(s).ljust(widths[i]) if i == 0 else str(s).rjust(widths[i])  # noqa: E731
    if markdown:
        line = lambda r: "| " + " | ".join(cell(i, s) for i, s in enumerate(r)) + " |"  # noqa: E731
        sep = "|" + "|".join("-" * (w + 1) + ("-" if i == 0 else ":") for i, w in enumerate(widths)) + "|"
        return "\n".join([line(head), sep] + [line(r) for r in rows])
    line = lambda r: "  ".join(cell(i, s) for i, s in enumerate(r))  # noqa: E731
    return "\n".join([line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def print_table(reports: Iterable[LoadReport]) -> None:
    """Print `format_table(reports)` (aligned plain text) to stdout."""
    print(format_table(reports))
