"""Routing policies on the Mooncake trace, simulated, beside Dynamo 1.6.1's replay in the same run.

8 workers (Dynamo's mocker defaults), speeds 1x/2x/4x/6x, every Turbine policy through
`turbine.sim.simulate`, and Dynamo's `run_trace_replay` (kv_router, round_robin) on the same
trace run from the anchor's venv (../shared/anchors/dynamo/). Targets (issue 15):

    predicted TTFT p50 and p99 <= 0.9x Dynamo's kv router at 2x and above;
    predicted never worse than round-robin (p50 and p99) at any speed;
    predicted prefix hit rate within 2 points of the overlap-first policy (kv).

Also printed: a lower bound no router can beat, per speed: each request's TTFT is at least the
prefill of the prompt tokens no earlier request shared (the trace's own prefix reuse, an
unlimited cache, no queue, no decode in its steps); the bound's p50/p99 say when a target asks
for less than that.

    python bench/routing_sim.py                   # ~4 min on 2 cores
    python bench/routing_sim.py --speeds 2 --policies kv,predicted --no-results
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _procs import machine  # noqa: E402
from fleet_sim_sweep import run_one  # noqa: E402

from turbine.bench.trace import MOONCAKE_BLOCK_TOKENS, load_trace  # noqa: E402
from turbine.mocker.timing import PolynomialTiming  # noqa: E402

DEFAULT_TRACE = Path("/work/shared/data/mooncake_synthetic_trace.jsonl")
ANCHOR = Path("/work/shared/anchors/dynamo")
ANCHOR_PY = Path(os.environ.get("ANCHOR_DIR", "/tmp/dynamo-anchor")) / "venv" / "bin" / "python"
POLICIES = ("predicted", "kv", "round-robin", "least-loaded", "power-of-two", "random")


def floor_ms(trace: str, budget: int = 8192) -> tuple[float, float]:
    """p50 and p99 of each request's prefill of the tokens no earlier request shared (see above)."""
    timing = PolynomialTiming()
    seen: set[int] = set()
    out = []
    for r in load_trace(trace):
        shared = 0
        for h in r.hash_ids:
            if h not in seen:
                break
            shared += 1
        seen.update(r.hash_ids)
        new = max(1, r.input_length - min(shared * MOONCAKE_BLOCK_TOKENS, r.input_length - 1))
        full, rem = divmod(new, budget)
        out.append(1e3 * (full * timing.step_seconds(budget, 0, 0.0) + (timing.step_seconds(rem, 0, 0.0) if rem else 0)))
    out.sort()
    return out[len(out) // 2], out[int(len(out) * 0.99)]


def dynamo_replay(trace: str, workers: int, speeds: list[float]) -> dict[tuple[float, str], dict[str, Any]]:
    if not ANCHOR_PY.exists():
        raise SystemExit(f"no Dynamo anchor venv at {ANCHOR_PY}: run {ANCHOR / 'setup.sh'} first")
    cmd = [str(ANCHOR_PY), str(ANCHOR / "replay_anchor.py"), trace, str(workers), *map(str, speeds)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "DYN_LOG": "error"},
                         check=True).stdout
    rows = {}
    for line in out.splitlines():
        if line.startswith("{"):
            d = json.loads(line)
            rows[(float(d["speed"]), "kv" if d["mode"] == "kv_router" else "round-robin")] = d
    return rows


def _f(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(rows: dict[tuple[float, str], dict[str, Any]], dyn: dict[tuple[float, str], dict[str, Any]],
          floors: tuple[float, float]) -> str:
    head = ["speed", "router", "TTFT p50", "TTFT p99", "ITL p99", "E2E p50", "hit rate", "req/s", "sim wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if i > 1 else "---" for i in range(len(head))) + "|"]
    for s in sorted({k[0] for k in rows}):
        for (sp, p), d in sorted(rows.items(), key=lambda kv: POLICIES.index(kv[0][1])):
            if sp != s:
                continue
            lines.append(f"| {s:g}x | {p} | {_f(d['ttft_ms']['p50'])} | {_f(d['ttft_ms']['p99'])} | "
                         f"{_f(d['itl_ms']['p99'])} | {_f(d['e2e_ms']['p50'])} | {100 * d['hit_rate']:.1f}% | "
                         f"{_f(d['req_per_s'], 2)} | {d['wall_s']:.1f} |")
        for mode in ("kv", "round-robin"):
            d = dyn.get((s, mode))
            if d is not None:
                lines.append(f"| {s:g}x | dynamo {'kv_router' if mode == 'kv' else 'round_robin'} | "
                             f"{_f(d.get('median_ttft_ms'))} | {_f(d.get('p99_ttft_ms'))} | {_f(d.get('p99_itl_ms'))} |"
                             f" - | {100 * d.get('prefix_cache_reused_ratio', 0):.1f}% | "
                             f"{_f(d.get('request_throughput_rps'), 2)} | {d.get('wall_s', 0):.2f} |")
    lines.append(f"| any | lower bound (own unshared prefill) | {floors[0]:.1f} | {floors[1]:.1f} | | | | | |")
    return "\n".join(lines)


def checks(rows: dict[tuple[float, str], dict[str, Any]], dyn: dict[tuple[float, str], dict[str, Any]],
           floors: tuple[float, float]) -> list[str]:
    out = []
    for (s, p), d in sorted(rows.items()):
        if p != "predicted":
            continue
        p50, p99 = d["ttft_ms"]["p50"], d["ttft_ms"]["p99"]
        dk = dyn.get((s, "kv"))
        if s >= 2 and dk is not None:
            for name, mine, theirs, bound in (("p50", p50, dk["median_ttft_ms"], floors[0]),
                                              ("p99", p99, dk["p99_ttft_ms"], floors[1])):
                ratio = mine / theirs
                note = ""
                if ratio > 0.9 and bound > 0.9 * theirs:
                    note = f" (0.9x is {0.9 * theirs:.0f} ms, below the {bound:.0f} ms no router can beat)"
                out.append(f"{s:g}x TTFT {name}: predicted {mine:.1f} ms vs Dynamo kv {theirs:.1f} ms = {ratio:.2f}x, "
                           f"target <= 0.9x: {'met' if ratio <= 0.9 else 'MISSED'}{note}")
        rr = rows.get((s, "round-robin"))
        if rr is not None:
            ok = p50 <= rr["ttft_ms"]["p50"] and p99 <= rr["ttft_ms"]["p99"]
            out.append(f"{s:g}x vs round-robin: p50 {p50:.1f} vs {rr['ttft_ms']['p50']:.1f}, p99 {p99:.1f} vs "
                       f"{rr['ttft_ms']['p99']:.1f} ms: never worse {'met' if ok else 'MISSED'}")
        kv = rows.get((s, "kv"))
        if kv is not None:
            gap = 100 * (kv["hit_rate"] - d["hit_rate"])
            out.append(f"{s:g}x hit rate: predicted {100 * d['hit_rate']:.1f}% vs kv {100 * kv['hit_rate']:.1f}% "
                       f"({-gap:+.1f} points), target within 2 points below: {'met' if gap <= 2 else 'MISSED'}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace", default=str(DEFAULT_TRACE))
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--speeds", default="1,2,4,6")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--no-dynamo", action="store_true", help="skip Dynamo's replay (no anchor venv)")
    p.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    p.add_argument("--no-results", action="store_true")
    a = p.parse_args(argv)
    speeds = [float(s) for s in a.speeds.split(",") if s]
    policies = [x for x in a.policies.split(",") if x]
    if any(x not in POLICIES for x in policies) or not speeds:
        p.error(f"policies come from {POLICIES}")
    t0 = time.perf_counter()
    todo = [(x, s) for s in speeds for x in policies]
    with ProcessPoolExecutor(max_workers=a.jobs) as pool:
        futures = {k: pool.submit(run_one, a.trace, None, a.workers, *k) for k in todo}
        dyn = {} if a.no_dynamo else dynamo_replay(a.trace, a.workers, speeds)
        rows = {(s, x): f.result() for (x, s), f in futures.items()}
    floors = floor_ms(a.trace)
    wall = time.perf_counter() - t0
    text = table(rows, dyn, floors)
    found = checks(rows, dyn, floors)
    print(text)
    print("\n".join(["", "Target checks:", *("- " + c for c in found)]))
    print(f"wall time {wall:.0f} s")
    if not a.no_results:
        when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        body = "\n".join([
            f"\n## routing_sim — {when}, {machine()}", "",
            f"- workload: {Path(a.trace).name}, {a.workers} workers, Dynamo's mocker defaults (block 64, 16,384 "
            "blocks/worker, budget 8192, polynomial timing); Turbine's simulator and Dynamo 1.6.1's "
            "`run_trace_replay` in the same run; latencies in ms",
            "- predicted: defaults (work weight 0.5, no ITL guard, no queue limit)",
            f"- wall time {wall:.0f} s ({a.jobs} processes)", "", text, "", "Target checks:",
            *("- " + c for c in found), ""])
        fd = os.open(a.results, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, body.encode())
        finally:
            os.close(fd)
        print(f"appended to {a.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
