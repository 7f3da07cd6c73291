"""The planner live on this machine: `turbine worker` processes (mock engine, the H200 Llama-3.1-8B
profile at ``--speedup``) started and drained by the local connector through a day-shaped load,
beside static provisioning for the peak and the reactive +-1 baseline, and beside what the
simulator's closed loop predicts for the same requests, policy and settings.

Per policy: a fresh frontend; the policy's fleet (the planner and the reactive policy start at one
worker and decide every ``--interval`` s from the frontend's /metrics, as `turbine planner` does;
static runs as many workers as the planner peaked at); the trace replayed open loop
(`turbine.bench.replay`, token-id prompts, exact output lengths). Worker-seconds count every
worker process from its start to its exit (a drained one until it has finished). Scored per
request: TTFT <= target and mean ITL <= target; failed requests and frontend migrations too (both
must be 0: scale-down drains).

The 2-core machine limits the speed-up: the mock workers, frontend and load generator share it,
so the workers run the H200 timing slowed down (``--speedup 0.25``: each step takes 4x the H200's)
and the SLA is scaled the same way.

    python bench/planner_live.py [--duration 240] [--policies planner,reactive,static] [--no-record]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _procs import count_workers, free_port, get_json, start, stop_all  # noqa: E402

from turbine.bench.replay import ReplayConfig, replay  # noqa: E402
from turbine.bench.report import mean_itl_s  # noqa: E402
from turbine.bench.stats import percentile  # noqa: E402
from turbine.mocker.core import MockerConfig  # noqa: E402
from turbine.planner.closed_loop import run_closed_loop  # noqa: E402
from turbine.planner.connectors.local import LocalProcessConnector, worker_command  # noqa: E402
from turbine.planner.model_shape import get_shape  # noqa: E402
from turbine.planner.observe import FrontendScraper  # noqa: E402
from turbine.planner.perf_model import PerfModel  # noqa: E402
from turbine.planner.plan import within_sla  # noqa: E402
from turbine.planner.reactive import ReactivePlanner  # noqa: E402
from turbine.planner.runner import PlannerRunner  # noqa: E402
from turbine.planner.sla_planner import PlannerConfig, SlaPlanner  # noqa: E402
from turbine.planner.steady_state import Sla  # noqa: E402
from turbine.planner.workloads import LengthDist, day_shaped_trace, synthetic_requests  # noqa: E402
from turbine.sim.simulator import SimConfig  # noqa: E402

PROFILE = REPO / "bench" / "profiles" / "h200_llama3-8b_bf16.json"
CONTEXT = 16384  # the mock workers' context (the tiny tokenizer's model is shorter; the mocker need not be)


def _policy(name: str, model: PerfModel, cfg: PlannerConfig):  # type: ignore[no-untyped-def]
    return SlaPlanner(model, cfg) if name == "planner" else ReactivePlanner(cfg) if name == "reactive" else None


def _workers(url: str) -> int:
    try:
        return count_workers(get_json(url + "/health"))
    except OSError:
        return 0


async def _wait_workers(url: str, n: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while await asyncio.to_thread(_workers, url) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{n} workers did not register within {timeout_s:g} s")
        await asyncio.sleep(0.2)


def _migrations(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("turbine_frontend_migrations_total"))


async def run_live(name: str, trace: list, a: argparse.Namespace, model: PerfModel, cfg: PlannerConfig,  # type: ignore[type-arg]
                   model_dir: Path, logs: Path, static_workers: int) -> dict:  # type: ignore[type-arg]
    disc = Path(tempfile.mkdtemp(prefix=f"planner-live-{name}-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    fe = start(f"frontend-{name}", [sys.executable, "-m", "turbine", "frontend", "--discovery-dir", str(disc),
                                    "--port", str(port)], logs)
    args = ["--engine", "mock", "--model", str(model_dir), "--model-name", "tiny", "--profile", str(PROFILE),
            "--speedup-ratio", str(a.speedup), "--context-length", str(CONTEXT)]
    conn = LocalProcessConnector({"agg": worker_command("agg", args, discovery_dir=disc)}, drain_timeout_s=120,
                                 log_dir=logs / name)
    stop = asyncio.Event()
    samples: list[tuple[float, int, int]] = []  # (t, worker processes, registered workers)
    runner_task = None
    scraper = FrontendScraper(url)
    try:
        first = static_workers if name == "static" else 1
        await conn.scale("agg", first)
        await _wait_workers(url, first)
        policy = _policy(name, model, cfg)
        if policy is not None:
            runner_task = PlannerRunner(policy, scraper, conn).start(stop)
        t0 = time.monotonic()

        async def sample() -> None:
            while not stop.is_set():
                samples.append((time.monotonic() - t0, len(conn.processes()), await asyncio.to_thread(_workers, url)))
                await asyncio.sleep(0.5)
        sampler = asyncio.create_task(sample())
        res = await replay(trace, ReplayConfig(url=url, progress=False, timeout_s=300))
        elapsed = time.monotonic() - t0
        stop.set()
        await sampler
        if runner_task is not None:
            await runner_task
        migrations = await asyncio.to_thread(_migrations, url)
    finally:
        stop.set()
        await scraper.close()
        await conn.close()
        stop_all([fe])
    worker_s = sum((b[0] - a_[0]) * a_[1] for a_, b in zip(samples, samples[1:]))
    sla = cfg.sla
    ok = [r for r in res.results if r.ok]
    ttft = [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]
    itl = [v * 1e3 for r in ok if (v := mean_itl_s(r)) is not None]
    return {"policy": name, "requests": len(res.results), "failed": len(res.results) - len(ok),
            "migrations": migrations, "attainment": sum(within_sla(r, sla) for r in res.results) / len(res.results),
            "worker_s": worker_s, "peak": max(s[1] for s in samples), "elapsed_s": elapsed,
            "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99), "itl_p50": percentile(itl, 50),
            "itl_p99": percentile(itl, 99), "started": conn.started, "kills": conn.kills,
            "send_lag_s": res.report.meta.get("max_send_lag_s"), "timeline": samples[::4]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=240.0, help="seconds of the (one) day")
    p.add_argument("--peak-rate", type=float, default=5.0)
    p.add_argument("--swing", type=float, default=6.0)
    p.add_argument("--speedup", type=float, default=0.25, help="mock workers' speed-up over the H200 timing")
    p.add_argument("--isl", default="3000:0.3")
    p.add_argument("--osl", default="60:0.3")
    p.add_argument("--interval", type=float, default=10.0)
    p.add_argument("--startup", type=float, default=4.0, help="the planner's (and simulator's) worker start-up time")
    p.add_argument("--sla-ttft-ms", type=float, default=2000.0)
    p.add_argument("--sla-itl-ms", type=float, default=60.0)
    p.add_argument("--max-workers", type=int, default=6)
    p.add_argument("--policies", default="planner,reactive,static")
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args()
    policies = a.policies.split(",")
    if any(x not in ("planner", "reactive", "static") for x in policies):
        p.error("--policies: planner, reactive, static")

    shapes = synthetic_requests(2000, LengthDist.parse(a.isl), LengthDist.parse(a.osl), 1.0, shared_prefix_tokens=1024,
                                seed=1)
    trace = day_shaped_trace(shapes, duration_s=a.duration, peak_rate=a.peak_rate, swing=a.swing,
                             bursts=[(0.6 * a.duration, 0.05 * a.duration, 1.5)], seed=2)
    model = PerfModel(get_shape("llama3.1-8b"), "h200", profile=json.loads(PROFILE.read_text()))
    sla = Sla(a.sla_ttft_ms, a.sla_itl_ms)
    cfg = PlannerConfig(sla=sla, interval_s=a.interval, predictor="holt-winters", max_workers=a.max_workers,
                        gpu_budget=a.max_workers, scale_down_cooldown_s=3 * a.interval, scale_down_window_s=3 * a.interval, max_utilization=0.6,
                        speedup_ratio=a.speedup, startup_s=a.startup)
    print(f"{len(trace)} requests over {a.duration:g} s (peak {a.peak_rate:g} req/s, swing {a.swing:g}x, a x1.5 "
          f"burst); ISL {a.isl}, OSL {a.osl}; mock H200 at speed-up {a.speedup:g}; SLA TTFT <= {a.sla_ttft_ms:g} ms, "
          f"ITL <= {a.sla_itl_ms:g} ms", flush=True)
    work = Path(tempfile.mkdtemp(prefix="planner-live-"))
    logs = work / "logs"
    print(f"[bench] logs in {logs}", flush=True)
    model_dir = work / "tiny"
    import subprocess

    subprocess.run([sys.executable, "-m", "turbine", "make-model", str(model_dir)], check=True, capture_output=True)
    mocker = MockerConfig(profile=str(PROFILE), speedup_ratio=a.speedup, context_length=CONTEXT)
    live: dict[str, dict] = {}  # type: ignore[type-arg]
    sim: dict[str, dict] = {}  # type: ignore[type-arg]
    static_n = a.max_workers
    for name in sorted(policies, key=["planner", "reactive", "static"].index):
        if name == "static" and "planner" in live:
            static_n = live["planner"]["peak"]
        print(f"[bench] {name} live ...", flush=True)
        live[name] = asyncio.run(run_live(name, trace, a, model, cfg, model_dir, logs, static_n))
        pol = _policy(name, model, cfg)
        r = run_closed_loop(trace, SimConfig(workers=static_n if name == "static" else 1, mocker=mocker), sla,
                            policy=pol, interval_s=a.interval, startup_s=a.startup, label=name)
        sim[name] = {"attainment": r.attainment, "worker_s": r.gpu_seconds, "peak": sum(r.peak_workers.values())}
        L = live[name]
        print(f"[bench] {name}: live {L['attainment']:.1%} in SLA, {L['worker_s']:.0f} worker-s, peak {L['peak']}, "
              f"{L['failed']} failed, {L['migrations']:g} migrations | sim {sim[name]['attainment']:.1%}, "
              f"{sim[name]['worker_s']:.0f} worker-s, peak {sim[name]['peak']}", flush=True)

    base = live.get("static", {}).get("worker_s")
    lines = ["| policy | within SLA live / sim | worker-s live / sim | vs static (live) | peak workers live / sim "
             "| failed | migrations | TTFT p50 / p99 ms | ITL p50 / p99 ms | workers started | max send lag s |",
             "|" + "---|" * 11]
    for name, L in live.items():
        S = sim[name]
        vs = f"{L['worker_s'] / base - 1:+.0%}" if base else "-"
        lines.append(f"| {name} | {L['attainment']:.1%} / {S['attainment']:.1%} | {L['worker_s']:.0f} / "
                     f"{S['worker_s']:.0f} | {vs} | {L['peak']} / {S['peak']} | {L['failed']} | {L['migrations']:g} | "
                     f"{L['ttft_p50']:.0f} / {L['ttft_p99']:.0f} | {L['itl_p50']:.1f} / {L['itl_p99']:.1f} | "
                     f"{L['started']} | {L['send_lag_s']} |")
    table = "\n".join(lines)
    print("\n" + table)
    if not a.no_record:
        from _procs import RESULTS_HEADER, append_atomically, machine

        text = (f"\n## planner_live — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine(load_average=True)}\n\n"
                f"Live: {len(trace)} requests over a {a.duration:g} s day (peak {a.peak_rate:g} req/s, swing "
                f"{a.swing:g}x, a x1.5 burst), ISL {a.isl} (1024 shared tokens), OSL {a.osl}; `turbine worker "
                f"--engine mock` processes with the H200 Llama-3.1-8B profile at speed-up {a.speedup:g}, started and "
                f"drained by the local connector; planner interval {a.interval:g} s, start-up {a.startup:g} s, "
                f"max utilization 0.6. SLA per request: TTFT <= {a.sla_ttft_ms:g} ms, mean ITL <= "
                f"{a.sla_itl_ms:g} ms. Sim: the same requests, policy and settings in the simulator's closed "
                f"loop.\n\n{table}\n")
        append_atomically(REPO / "bench" / "RESULTS.md", text, RESULTS_HEADER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
