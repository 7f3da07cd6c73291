"""How fast `turbine simulate` replays the whole shared Mooncake trace through 8 workers, beside
Dynamo 1.6.1's Rust offline replay on the same machine in the same run.

Each tool runs ``--repeats`` times per router (kv, round-robin), alternating, each run a fresh
process. Turbine's wall time is the whole command (interpreter start, imports, trace load,
simulation); its simulation loop alone is reported too. Dynamo's is the ``wall_s`` its replay
reports (`replay_anchor.py`, run with the anchor venv's python: ../shared/anchors/dynamo/).
Turbine's results must be equal across repeats (the simulator is deterministic).
Target (issue 14): Turbine <= 3x Dynamo's wall time.

    python bench/sim_speed.py [--repeats 3] [--no-record]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from _procs import DEFAULT_DYNAMO_DIR, RESULTS_HEADER, append_atomically, machine  # noqa: E402

TRACE = REPO.parent / "shared" / "data" / "mooncake_synthetic_trace.jsonl"
ANCHOR = REPO.parent / "shared" / "anchors" / "dynamo" / "replay_anchor.py"
TARGET = 3.0


def turbine_once(router: str, trace: Path) -> tuple[float, float, dict]:  # type: ignore[type-arg]
    """(command wall s, simulation loop s, summary) of one `turbine simulate` process."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "sim.json"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "turbine", "simulate", "--trace", str(trace), "--workers", "8",
                        "--router", router, "--no-progress", "--json", str(out)], check=True, capture_output=True,
                       cwd=REPO, timeout=600)
        wall = time.perf_counter() - t0
        data = json.loads(out.read_text())
    runs = data["runs"] if isinstance(data, dict) and "runs" in data else [data]
    run = runs[0]
    sim = run.get("sim", run.get("meta", {}).get("sim", {}))
    summary = {k: v for k, v in run.items() if k not in ("sim", "meta")}
    return wall, float(sim.get("wall_s", float("nan"))), summary


def dynamo_once(python: Path, trace: Path) -> dict[str, float]:
    """Dynamo's replay wall_s per router (its script runs round_robin and kv_router)."""
    env = {**os.environ, "DYN_LOG": "error"}
    r = subprocess.run([str(python), str(ANCHOR), str(trace), "8", "1"], check=True, capture_output=True, text=True,
                       env=env, timeout=600)
    out = {}
    for line in r.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            row = json.loads(line)
            out["kv" if row["mode"] == "kv_router" else "round-robin"] = float(row["wall_s"])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace", default=str(TRACE))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dynamo-python", default=str(Path(DEFAULT_DYNAMO_DIR) / "venv" / "bin" / "python"))
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args()
    trace = Path(a.trace)
    dyn_py = Path(a.dynamo_python)
    have_dynamo = dyn_py.exists() and ANCHOR.exists()
    routers = ("kv", "round-robin")
    tw: dict[str, list[float]] = {r: [] for r in routers}
    tl: dict[str, list[float]] = {r: [] for r in routers}
    dw: dict[str, list[float]] = {r: [] for r in routers}
    summaries: dict[str, list[str]] = {r: [] for r in routers}
    for i in range(a.repeats):
        if have_dynamo:
            for r, w in dynamo_once(dyn_py, trace).items():
                dw[r].append(w)
        for r in routers:
            wall, loop, summary = turbine_once(r, trace)
            tw[r].append(wall)
            tl[r].append(loop)
            summaries[r].append(json.dumps(summary, sort_keys=True))
        print(f"repeat {i + 1}: turbine kv {tw['kv'][-1]:.2f} s, rr {tw['round-robin'][-1]:.2f} s"
              + (f"; dynamo kv {dw['kv'][-1]:.2f} s, rr {dw['round-robin'][-1]:.2f} s" if have_dynamo else ""), flush=True)
    same = all(len(set(v)) == 1 for v in summaries.values())
    lines = ["| router | Turbine wall s (median) | Turbine simulation loop s | Dynamo 1.6.1 replay wall s | "
             "Turbine / Dynamo | target <= 3x |", "|---|---:|---:|---:|---:|---|"]
    verdicts = []
    for r in routers:
        t, loop = statistics.median(tw[r]), statistics.median(tl[r])
        if have_dynamo:
            d = statistics.median(dw[r])
            ratio = t / d
            ok = ratio <= TARGET
            verdicts.append(ok)
            lines.append(f"| {r} | {t:.2f} | {loop:.2f} | {d:.2f} | {ratio:.2f}x | {'met' if ok else 'MISSED'} |")
        else:
            lines.append(f"| {r} | {t:.2f} | {loop:.2f} | - | - | no Dynamo venv at {dyn_py} |")
    table = "\n".join(lines)
    note = (f"Whole Mooncake trace ({len(trace.read_text().splitlines())} requests), 8 workers, speed 1x; "
            f"{a.repeats} repeats per tool and router, alternating, each a fresh process; medians. Turbine's results "
            f"{'identical across repeats' if same else 'DIFFER across repeats'}.")
    print("\n" + table + "\n\n" + note)
    if not a.no_record:
        text = (f"\n## sim_speed — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine(load_average=True)}\n\n"
                f"{note}\n\n{table}\n")
        append_atomically(REPO / "bench" / "RESULTS.md", text, RESULTS_HEADER)
    return 0 if same and all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
