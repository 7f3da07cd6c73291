"""`turbine plan` beside AIConfigurator on the reference case: Llama-3.1-8B, 8x H100, ISL 4000 /
OSL 500, TTFT <= 600 ms, ITL <= 20 ms.

1. Turbine's plan from the measured H100 profile (bench/profiles/h100_llama3-8b_bf16.json):
   its frontier, its recommendation, each checked deployment simulated (Poisson arrivals, the
   lengths varied +-30%).
2. AIConfigurator 0.12 run on the same case, when its CLI is installed (``--aic`` or
   $AIC_BIN, e.g. a venv with ``pip install aiconfigurator==0.12.0``): its best aggregated and
   disaggregated configurations, read from its best_config_topn.csv.
3. AIConfigurator's winner replayed through Turbine's simulator (its layout priced by Turbine's
   performance model) at the request rate it claims, and searched for the highest rate at which
   it holds the SLA: the two tools' answers compared on the same yardstick.

    python bench/plan_reference.py [--aic /path/to/aiconfigurator] [--no-record]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from turbine.planner.model_shape import get_shape  # noqa: E402
from turbine.planner.perf_model import Parallel, PerfModel  # noqa: E402
from turbine.planner.plan import Deployment, PlanInputs, Simulated, plan  # noqa: E402
from turbine.planner.steady_state import Sla, Workload, agg_point  # noqa: E402
from turbine.planner.workloads import LengthDist, synthetic_requests  # noqa: E402

ISL, OSL, TTFT, ITL, GPUS = 4000, 500, 600.0, 20.0, 8


def run_aiconfigurator(aic: str, out: Path) -> dict[str, dict[str, str]]:
    """AIConfigurator's best agg and disagg rows (its own CSV columns)."""
    cmd = [aic, "cli", "default", "--model", "meta-llama/Meta-Llama-3.1-8B", "--total-gpus", str(GPUS),
           "--system", "h100_sxm", "--isl", str(ISL), "--osl", str(OSL), "--ttft", str(int(TTFT)), "--tpot",
           str(int(ITL)), "--no-color", "--save-dir", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    best = {}
    for mode in ("agg", "disagg"):
        files = sorted(out.rglob(f"{mode}/best_config_topn.csv"))
        if files:
            with open(files[0], newline="") as f:
                best[mode] = next(csv.DictReader(f))
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--aic", default=os.environ.get("AIC_BIN") or shutil.which("aiconfigurator")
                   or ("/tmp/aic/venv/bin/aiconfigurator" if Path("/tmp/aic/venv/bin/aiconfigurator").exists() else None))
    p.add_argument("--requests", type=int, default=1000, help="requests per simulation")
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args()
    profile = json.loads((REPO / "bench" / "profiles" / "h100_llama3-8b_bf16.json").read_text())
    model = PerfModel(get_shape("llama3.1-8b"), "h100", profile=profile)
    sla = Sla(TTFT, ITL)
    inp = PlanInputs(model=model, sla=sla, workload=Workload(ISL, OSL), gpu_budget=GPUS)
    isl, osl = LengthDist(ISL, 0.3), LengthDist(OSL, 0.3)
    source = lambda rate: synthetic_requests(a.requests, isl, osl, rate, seed=7)  # noqa: E731
    t0 = time.perf_counter()
    res = plan(inp, source, progress=lambda m: print(f"  {m}", flush=True))
    plan_s = time.perf_counter() - t0

    aic_best: dict[str, dict[str, str]] = {}
    aic_note = "AIConfigurator not installed here: its row is missing (pass --aic)"
    if a.aic:
        with tempfile.TemporaryDirectory() as d:
            try:
                aic_best = run_aiconfigurator(a.aic, Path(d))
                aic_note = f"AIConfigurator ({a.aic}) run in this script"
            except (subprocess.SubprocessError, OSError) as e:
                aic_note = f"AIConfigurator failed: {e}"

    rows = ["| tool | deployment | GPUs | predicted tok/s/GPU | predicted tok/s/user | predicted TTFT / ITL ms | "
            "claimed req/s | simulated at that rate: TTFT p90 / ITL p90 ms, in SLA | simulated max req/s in SLA |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    sim = Simulated(inp, source)
    try:
        for c in res.checked:
            d, s = c.deployment, c.at_rate
            tag = "**Turbine (recommended)**" if c is res.recommended else "Turbine (checked)"
            rows.append(f"| {tag} | {d.label} | {d.gpus} | {d.point.tokens_per_s_gpu:.0f} | {d.point.tokens_per_s_user:.1f} | "
                        f"{d.point.ttft_ms:.0f} / {d.point.itl_ms:.1f} | {d.capacity_rps:.2f} | "
                        f"{s.ttft_ms:.0f} / {s.itl_ms:.1f}, {s.attainment:.0%} | {c.max_rate or 0:.2f} |")
        for mode, row in aic_best.items():
            label = (f"agg {GPUS // int(row['num_total_gpus'])} x TP{row['tp']} (batch {row['bs']})" if mode == "agg" else
                     f"disagg {row['(p)workers']} x TP{row['(p)tp']} prefill + {row['(d)workers']} x TP{row['(d)tp']} "
                     f"decode (batch {row['(d)bs']}) per replica")
            claimed = float(row["seq/s/gpu"]) * GPUS
            sim_cols = "-"
            if mode == "agg":  # replay its winner on Turbine's yardstick
                pt = agg_point(model, Parallel(tp=int(row["tp"])), inp.workload, int(row["bs"]))
                dep = Deployment(pt, workers=GPUS // int(row["num_total_gpus"]))
                chk = sim.check(dep, claimed)
                top, _ = sim.max_rate(dep)
                sim_cols = f"{chk.ttft_ms:.0f} / {chk.itl_ms:.1f}, {chk.attainment:.0%} | {top:.2f}"
            backend = row.get("backend") or row.get("(p)backend", "?")
            version = row.get("version") or row.get("(p)version", "?")
            rows.append(f"| AIConfigurator 0.12 ({backend} {version}, {mode}) | {label} | {GPUS} | "
                        f"{float(row['tokens/s/gpu_cluster']):.0f} | {float(row['tokens/s/user']):.1f} | "
                        f"{float(row['ttft']):.0f} / {float(row['tpot']):.1f} | {claimed:.2f} | {sim_cols}"
                        + (" |" if mode == "agg" else " | - |"))
    finally:
        sim.close()
    from _procs import machine

    rec = res.recommended
    text = (f"\n## plan_reference — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}\n\n"
            f"Llama-3.1-8B, {GPUS}x H100 SXM, ISL {ISL} / OSL {OSL}, TTFT <= {TTFT:g} ms, ITL <= {ITL:g} ms (p90 in the "
            f"simulator, lengths log-normal with cv 0.3, Poisson arrivals, {a.requests} requests per run). "
            f"Turbine's plan: {len(res.points)} configurations scored from the measured H100 profile, "
            f"{len(res.checked)} simulated, {plan_s:.0f} s. {aic_note}.\n\n" + "\n".join(rows) + "\n\n"
            + (f"Recommended: {rec.deployment.label}; simulated max {rec.max_rate:.2f} req/s within the SLA "
               f"({rec.max_rate * OSL / GPUS:.0f} output tok/s/GPU).\n" if rec and rec.max_rate else "No recommendation.\n"))
    print(text)
    if not a.no_record:
        from _procs import RESULTS_HEADER, append_atomically

        append_atomically(REPO / "bench" / "RESULTS.md", text, RESULTS_HEADER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
