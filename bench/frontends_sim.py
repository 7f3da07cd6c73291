"""Several frontends in front of one fleet, simulated: what a second (third) frontend costs, and
how much of it is the age of the workers' load reports (sim/frontends.py).

The Mooncake trace's first requests at 4x on 8 mocker workers (live_routing.py's defaults, so
its live two-frontend rows compare): one frontend; two and three sharing the workers' load
reports every 1 / 10 (the live worker's interval) / 50 / 200 ms; the same frontends blind to
each other (``--router-own-load-only``). Prints a table and appends it to bench/RESULTS.md.

    python bench/frontends_sim.py              # ~30 s
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _procs import machine  # noqa: E402

from turbine.bench.report import summarize_trace  # noqa: E402
from turbine.bench.trace import ideal_hit_rate, load_trace  # noqa: E402
from turbine.mocker.core import MockerConfig  # noqa: E402
from turbine.sim import SimConfig, simulate  # noqa: E402

DEFAULT_TRACE = REPO.parent / "shared" / "data" / "mooncake_synthetic_trace.jsonl"
# (label, frontends, load report interval ms, blind)
ROWS = [("one frontend", 1, 10.0, False)] + [
    (f"{n} frontends, reports every {ms:g} ms", n, ms, False) for n in (2, 3) for ms in (1.0, 10.0, 50.0, 200.0)
] + [(f"{n} frontends, blind to each other", n, 10.0, True) for n in (2, 3)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace", default=str(DEFAULT_TRACE))
    p.add_argument("-n", "--max-requests", type=int, default=400)
    p.add_argument("--speed", type=float, default=4.0)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--router", default="predicted")
    p.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    p.add_argument("--no-results", action="store_true")
    a = p.parse_args(argv)
    reqs = load_trace(a.trace, a.max_requests)
    ctx = max(r.input_length + r.output_length for r in reqs)
    # live_routing.py's fleet: block 64, 16,384 blocks a worker, 256 sequences, 8,192-token budget
    mocker = MockerConfig(block_size=64, num_gpu_blocks=16384, max_num_seqs=256, max_num_batched_tokens=8192,
                          context_length=max(ctx, 262144))
    ideal = ideal_hit_rate(reqs)
    lines = ["| frontends | TTFT p50 (ms) | TTFT p99 (ms) | p50 vs one | hit rate | requests per worker (min-max) |",
             "|---|---:|---:|---:|---:|---|"]
    t0, base = time.perf_counter(), None
    for label, n, ms, blind in ROWS:
        cfg = SimConfig(workers=a.workers, router=a.router, speed=a.speed, seed=0, mocker=mocker, frontends=n,
                        load_report_ms=ms, router_own_load_only=blind)
        res = simulate(reqs, cfg)
        rep = summarize_trace(res.results, res.duration_s, ideal_hit_rate=ideal)
        p50 = rep.ttft_ms.p50
        base = p50 if base is None else base
        per = res.stats.requests_per_worker
        lines.append(f"| {label} | {p50:.1f} | {rep.ttft_ms.p99:.1f} | {p50 / base:.2f}x | "
                     f"{(rep.hit_rate or 0) * 100:.1f}% | {min(per)}-{max(per)} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if not a.no_results:
        head = (f"\n## frontends_sim — {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
                f"- machine: {machine(load_average=True)}\n"
                f"- workload: the first {len(reqs)} requests of {Path(a.trace).name} at {a.speed:g}x, "
                f"{a.workers} mocker workers (live_routing.py's fleet), `{a.router}` router; each frontend its own "
                f"router, requests alternating between them, each knowing the others' requests only from the "
                f"workers' load reports (blind: ignoring them); script wall time {time.perf_counter() - t0:.1f} s\n\n")
        with open(a.results, "a", encoding="utf-8") as f:
            f.write(head + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
