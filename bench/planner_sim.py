"""The SLA planner in a closed loop in the simulator, over a day of traffic, beside static
provisioning for the peak and the reactive +-1 baseline.

The day: one cosine period from trough to peak and back (``--swing`` x between them) with two
bursts, compressed into ``--duration`` seconds. Two days are replayed and the second is scored
(the first warms the policies up, as yesterday does in production); every request takes the next request shape of the
shared Mooncake trace (its lengths and prefix hash ids, so multi-turn reuse survives). Workers are
H200s running Llama-3.1-8B (the measured profile bench/profiles/h200_llama3-8b_bf16.json), one GPU
each; a started worker serves after ``--startup`` s and costs GPU time from the moment it is asked
for; a removed one drains. Policies:

    planner    SlaPlanner: Holt-Winters load prediction, the performance model's replica math,
               observed/expected latency corrections
    reactive   +1 worker when an interval's mean TTFT or ITL missed the SLA, -1 when both were
               under half of it
    static     as many workers as the planner needed at its busiest, for the whole day

Scored per request (TTFT <= target and mean ITL <= target) and in GPU-hours.
Target: planner >= 95% of requests within the SLA with >= 30% fewer GPU-hours than static.

    python bench/planner_sim.py [--duration 1800] [--peak-rate 14] [--no-record]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from turbine.bench.trace import load_trace  # noqa: E402
from turbine.mocker.core import MockerConfig  # noqa: E402
from turbine.planner.closed_loop import ClosedLoopResult, run_closed_loop  # noqa: E402
from turbine.planner.model_shape import get_shape  # noqa: E402
from turbine.planner.perf_model import Parallel, PerfModel  # noqa: E402
from turbine.planner.reactive import ReactivePlanner  # noqa: E402
from turbine.planner.sla_planner import PlannerConfig, SlaPlanner  # noqa: E402
from turbine.planner.steady_state import Sla  # noqa: E402
from turbine.planner.workloads import day_rate, day_shaped_trace  # noqa: E402
from turbine.sim.simulator import SimConfig  # noqa: E402

PROFILE = REPO / "bench" / "profiles" / "h200_llama3-8b_bf16.json"
TRACE = REPO.parent / "shared" / "data" / "mooncake_synthetic_trace.jsonl"
CONTEXT = 131072  # Llama-3.1-8B's context: longer Mooncake shapes are left out


def plot(path: Path, runs: list[ClosedLoopResult], a: argparse.Namespace, bursts: list) -> None:  # type: ignore[type-arg]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    ts = [i * a.duration / 400 for i in range(401)]
    ax2 = ax.twinx()
    ax2.plot(ts, [day_rate(t, period_s=a.duration, peak=a.peak_rate, swing=a.swing, bursts=bursts) for t in ts],
             color="0.7", lw=1, label="arrival rate")
    ax2.set_ylabel("requests/s")
    for r in runs:
        ax.step([k.t for k in r.ticks], [sum(k.current.values()) for k in r.ticks], where="post",
                label=f"{r.label}: {r.attainment:.1%} in SLA, {r.gpu_hours:.2f} GPU-h")
    ax.set_xlabel("virtual seconds")
    ax.set_ylabel("workers (H200)")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Planner in the simulator: workers over a compressed day")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace", default=str(TRACE))
    p.add_argument("--duration", type=float, default=1800.0, help="virtual seconds of the day")
    p.add_argument("--peak-rate", type=float, default=14.0, help="requests/s at the day's peak (before bursts)")
    p.add_argument("--swing", type=float, default=10.0, help="peak / trough")
    p.add_argument("--interval", type=float, default=30.0, help="planner interval, virtual seconds")
    p.add_argument("--startup", type=float, default=30.0, help="seconds a new worker takes to serve")
    p.add_argument("--sla-ttft-ms", type=float, default=3000.0)
    p.add_argument("--sla-itl-ms", type=float, default=25.0)
    p.add_argument("--max-workers", type=int, default=32)
    p.add_argument("--max-utilization", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args()

    shapes = [r for r in load_trace(a.trace) if r.input_length + r.output_length <= CONTEXT]
    bursts = [(0.3 * a.duration, 0.03 * a.duration, 1.6), (0.72 * a.duration, 0.04 * a.duration, 1.8)]
    trace = day_shaped_trace(shapes, duration_s=a.duration, peak_rate=a.peak_rate, swing=a.swing, bursts=bursts,
                             seed=a.seed, days=2)
    model = PerfModel(get_shape("llama3.1-8b"), "h200", profile=json.loads(PROFILE.read_text()))
    blocks = model.kv_capacity_tokens(Parallel()) // 64
    mocker = MockerConfig(profile=str(PROFILE), num_gpu_blocks=blocks, max_num_seqs=256, max_num_batched_tokens=8192,
                          context_length=CONTEXT)
    sla = Sla(a.sla_ttft_ms, a.sla_itl_ms)
    pcfg = PlannerConfig(sla=sla, interval_s=a.interval, predictor="holt-winters", max_workers=a.max_workers,
                         gpu_budget=a.max_workers, max_batch=256, scale_down_cooldown_s=2 * a.interval, scale_down_window_s=2 * a.interval,
                         max_utilization=a.max_utilization, startup_s=a.startup)
    print(f"{len(trace)} requests over two days of {a.duration:g} s (peak {a.peak_rate:g} req/s, swing {a.swing:g}x, bursts "
          f"x1.6 and x1.8), {len(shapes)} Mooncake shapes; SLA TTFT <= {a.sla_ttft_ms:g} ms, ITL <= {a.sla_itl_ms:g} ms",
          flush=True)
    t0 = time.perf_counter()
    common = {"interval_s": a.interval, "startup_s": a.startup, "score_from_s": a.duration}
    planned = run_closed_loop(trace, SimConfig(workers=1, mocker=mocker, seed=a.seed), sla,
                              policy=SlaPlanner(model, pcfg), label="planner", **common)
    print(f"planner done ({planned.sim_wall_s:.0f} s)", flush=True)
    reactive = run_closed_loop(trace, SimConfig(workers=1, mocker=mocker, seed=a.seed), sla,
                               policy=ReactivePlanner(pcfg), label="reactive +-1", **common)
    print(f"reactive done ({reactive.sim_wall_s:.0f} s)", flush=True)
    peak = planned.peak_workers["agg"]
    static = run_closed_loop(trace, SimConfig(workers=peak, mocker=mocker, seed=a.seed), sla,
                             label=f"static {peak}", **common)
    wall = time.perf_counter() - t0
    runs = [planned, reactive, static]

    header = ("| policy | within SLA | GPU-hours | vs static | peak workers | TTFT p50 / p99 ms | ITL p50 / p99 ms "
              "| scale decisions |")
    lines = [header, "|" + "---|" * 8]
    for r in runs:
        row = r.row(sla)
        lines.append(f"| {r.label} | {row['within_sla_pct']:.2f}% | {row['gpu_hours']:.3f} | "
                     f"{r.gpu_seconds / static.gpu_seconds - 1:+.0%} | {row['peak_workers']['agg']} | "
                     f"{row['ttft_p50_ms']:.0f} / {row['ttft_p99_ms']:.0f} | {row['itl_p50_ms']:.1f} / "
                     f"{row['itl_p99_ms']:.1f} | {row['scale_decisions']} |")
    saving = 1 - planned.gpu_seconds / static.gpu_seconds
    met = planned.attainment >= 0.95 and saving >= 0.30
    verdict = (f"Target (planner >= 95% within SLA, >= 30% fewer GPU-hours than static): "
               f"{'met' if met else 'MISSED'} ({planned.attainment:.1%}, {saving:.0%} fewer).")
    table = "\n".join(lines)
    print("\n" + table + "\n\n" + verdict)
    plot_path = REPO / "bench" / "plots" / "planner_sim.png"
    plot(plot_path, runs, a, bursts)
    if not a.no_record:
        from _procs import RESULTS_HEADER, append_atomically, machine

        text = (f"\n## planner_sim — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}\n\n"
                f"Closed loop in the simulator: {len(trace)} requests over two {a.duration:g} s days, the second "
                f"scored (peak {a.peak_rate:g} "
                f"req/s, trough {a.peak_rate / a.swing:g}, bursts x1.6 and x1.8), request shapes of the shared Mooncake "
                f"trace ({len(shapes)} that fit 128k context); H200 Llama-3.1-8B profile, TP1 workers, start-up "
                f"{a.startup:g} s, planner interval {a.interval:g} s, max utilization {a.max_utilization:g}. SLA per "
                f"request: TTFT <= {a.sla_ttft_ms:g} ms and mean ITL <= {a.sla_itl_ms:g} ms. Simulated in "
                f"{wall:.0f} s. Plot: bench/plots/planner_sim.png.\n\n{table}\n\n{verdict}\n")
        append_atomically(REPO / "bench" / "RESULTS.md", text, RESULTS_HEADER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
