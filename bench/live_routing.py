#!/usr/bin/env python3
"""Routing policies on live processes, next to the simulator's prediction and Dynamo 1.6.1.

The first N requests of the Mooncake synthetic trace are replayed (`turbine.bench.replay`:
token-id prompts to /v1/completions at their recorded times / speed) against

- Turbine: `turbine frontend --router POLICY` + one `turbine worker --engine mock --num-workers 8`
  process (8 simulated workers), for each policy; both restarted between policies (fresh caches);
- Dynamo 1.6.1: `python -m dynamo.frontend --router-mode MODE` + one `python -m dynamo.mocker
  --num-workers 8` process, from the anchor venv (../shared/anchors/dynamo/), same replayer;

with the same mocker settings on both sides (block size 64, 16,384 blocks, max_num_seqs 256,
max_num_batched_tokens 8192, speedup 1, the default timing model). Each row also shows what
`turbine simulate` predicts for the same requests, speed and config. The replay is open loop;
the send lag (how late each request left against its schedule) says whether this machine kept up.

Prints a table, writes a PNG bar chart of TTFT p50 (bench/plots/) and appends both, with the
machine and notes, to bench/RESULTS.md in one write. Every process started is stopped in a
``finally`` (SIGINT, SIGKILL after 10 s), on errors and SIGTERM too; as root the script re-runs
itself in a loopback-only network namespace (Dynamo's ZMQ publisher binds 0.0.0.0).

    python bench/live_routing.py                      # defaults: first 400 requests at 2x, ~8 min
    python bench/live_routing.py --start 3600         # a late window of the trace (more prefix reuse)
    python bench/live_routing.py -n 200 --policies kv,round-robin --systems turbine --no-results
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _procs import (  # noqa: E402
    DEFAULT_DYNAMO_DIR,
    DYNAMO_MODEL_NAME,
    RESULTS_HEADER,
    System,
    append_atomically,
    dynamo_env,
    dynamo_missing,
    free_port,
    fresh_dir,
    machine,
    machine_busy_s,
    prometheus_sums,
    reexec_in_netns,
    start,
    start_system,
    wait_ready,
    stop_all,
    want_netns,
)

from turbine.bench.cpu import CpuMeter, Target  # noqa: E402
from turbine.bench.replay import ReplayConfig, replay  # noqa: E402
from turbine.bench.report import TraceReport, summarize_trace  # noqa: E402
from turbine.bench.stats import percentile, render_table  # noqa: E402
from turbine.bench.trace import (  # noqa: E402
    MOONCAKE_BLOCK_TOKENS,
    TraceRequest,
    arrival_offsets_s,
    ideal_hit_rate,
    load_trace,
)
from turbine.mocker.core import MockerConfig  # noqa: E402
from turbine.sim import SimConfig, simulate  # noqa: E402

DEFAULT_TRACE = "/work/shared/data/mooncake_synthetic_trace.jsonl"
TURBINE_POLICIES = ("predicted", "predicted-own-load", "kv", "kv-approx", "round-robin", "random", "least-loaded",
                    "power-of-two")
# how each row's frontends are started (predicted-own-load: each frontend blind to the others' requests)
ROUTER_ARGS = {"kv-approx": ["--router", "kv", "--router-approx"],
               "predicted-own-load": ["--router", "predicted", "--router-own-load-only"]}
DYNAMO_POLICIES = {"kv": ["--router-mode", "kv"], "kv-approx": ["--router-mode", "kv", "--no-router-kv-events"],
                   "round-robin": ["--router-mode", "round-robin"], "random": ["--router-mode", "random"],
                   "least-loaded": ["--router-mode", "least-loaded"],
                   "power-of-two": ["--router-mode", "power-of-two"]}
LAG_OK_S = 0.1  # a replay whose p99 send lag is within this kept its schedule


@dataclass
class Row:
    system: str
    policy: str
    live: TraceReport | None
    sim: TraceReport | None
    lag_s: tuple[float, float] | None = None  # p99, max of send time - scheduled time
    cpu_pct: dict[str, float | None] | None = None  # % of one core over the replay
    failure: str | None = None
    router: dict[str, float] | None = None  # Turbine's router counters after the replay


# ---- workload --------------------------------------------------------------------------------------
def load_requests(a: argparse.Namespace) -> tuple[list[TraceRequest], int]:
    """The first N requests; with --max-input-tokens, longer prompts are cut (hash ids too).
    Returns the requests and how many were cut."""
    reqs = load_trace(a.trace, a.start + a.max_requests)[a.start:]
    if not reqs:
        raise ValueError(f"{a.trace} holds no requests past --start {a.start}")
    if not a.max_input_tokens:
        return reqs, 0
    out, cut = [], 0
    for r in reqs:
        if r.input_length > a.max_input_tokens:
            cut += 1
            n = a.max_input_tokens
            r = TraceRequest(timestamp_ms=r.timestamp_ms, input_length=n, output_length=r.output_length,
                             hash_ids=r.hash_ids[: -(-n // MOONCAKE_BLOCK_TOKENS)])
        out.append(r)
    return out, cut


def mocker_config(a: argparse.Namespace) -> MockerConfig:
    return MockerConfig(block_size=a.block_size, num_gpu_blocks=a.num_gpu_blocks, max_num_seqs=a.max_num_seqs,
                        max_num_batched_tokens=a.max_num_batched_tokens, speedup_ratio=1.0,
                        context_length=a.context_length)


def run_sim(reqs: list[TraceRequest], policy: str, a: argparse.Namespace) -> TraceReport:
    """`turbine simulate` on the same requests, speed, fleet and mocker config (a row of N
    frontends simulates N, each learning of the others from the workers' load reports)."""
    base, _, count = policy.partition(" x")
    cfg = SimConfig(workers=a.workers, router={"kv-approx": "kv", "predicted-own-load": "predicted"}.get(base, base),
                    router_approx=base == "kv-approx", speed=a.speed, vocab_size=a.vocab_size, seed=0,
                    mocker=mocker_config(a), frontends=int(count or 1),
                    router_own_load_only=base == "predicted-own-load")
    res = simulate(reqs, cfg)
    return summarize_trace(res.results, res.duration_s, slo_ttft_ms=a.slo_ttft, slo_itl_ms=a.slo_itl,
                           ideal_hit_rate=ideal_hit_rate(reqs), meta={"mode": "sim", "router": policy,
                                                                      "wall_s": round(res.stats.wall_s, 2)})


# ---- live systems ------------------------------------------------------------------------------------
def start_turbine(policy: str, a: argparse.Namespace, work: Path) -> System:
    """``policy`` may end in " xN": N frontends on the same workers (the replay takes turns)."""
    from turbine.launch import default_model_dir

    cmd = [sys.executable, "-m", "turbine"]
    model = Path(a.turbine_model) if a.turbine_model else default_model_dir()
    disc = str(fresh_dir(work / "turbine-discovery"))
    name, _, count = policy.partition(" x")
    ports = [free_port() for _ in range(int(count or 1))]
    router = ROUTER_ARGS.get(name, ["--router", name])
    frontends = [(f"frontend{i or ''}", cmd + ["frontend", "--discovery-dir", disc, "--host", "127.0.0.1",
                                               "--port", str(port), *router]) for i, port in enumerate(ports)]
    sys_ = start_system(System(f"turbine {policy}", f"http://127.0.0.1:{ports[0]}", str(model)), [
        *frontends[:1],
        ("worker", cmd + [
            "worker", "--engine", "mock", "--model", str(model), "--num-workers", str(a.workers),
            "--discovery-dir", disc, "--block-size", str(a.block_size), "--num-gpu-blocks", str(a.num_gpu_blocks),
            "--max-num-seqs", str(a.max_num_seqs), "--max-num-batched-tokens", str(a.max_num_batched_tokens),
            "--context-length", str(a.context_length), "--speedup-ratio", "1"]),
    ], work / "logs" / f"turbine-{policy.replace(' ', '')}", a.workers, a.ready_timeout)
    try:
        for (fname, fcmd), port in zip(frontends[1:], ports[1:]):
            sys_.procs.append(start(fname, fcmd, work / "logs" / f"turbine-{policy.replace(' ', '')}"))
            url = f"http://127.0.0.1:{port}"
            wait_ready(System(sys_.label, url, sys_.tokenizer), a.workers, a.ready_timeout)
            sys_.extra_urls.append(url)
    except BaseException:
        stop_all(sys_.procs)
        raise
    return sys_


def start_dynamo(policy: str, a: argparse.Namespace, work: Path) -> System:
    root = Path(a.dynamo_dir)
    py = str(root / "venv" / "bin" / "python")
    model = Path(a.dynamo_model) if a.dynamo_model else root / "model"
    env = dynamo_env(fresh_dir(work / "dynamo-kv"), root / "venv")
    port = free_port()
    return start_system(System(f"dynamo {policy}", f"http://127.0.0.1:{port}", str(model)), [
        ("frontend", [py, "-m", "dynamo.frontend", "--http-host", "127.0.0.1", "--http-port", str(port),
                      *DYNAMO_POLICIES[policy]]),
        ("worker", [
            py, "-m", "dynamo.mocker", "--model-path", str(model), "--model-name", DYNAMO_MODEL_NAME,
            "--num-workers", str(a.workers), "--block-size", str(a.block_size),
            "--num-gpu-blocks-override", str(a.num_gpu_blocks), "--max-num-seqs", str(a.max_num_seqs),
            "--max-num-batched-tokens", str(a.max_num_batched_tokens), "--max-model-len", str(a.context_length),
            "--speedup-ratio", "1"]),
    ], work / "logs" / f"dynamo-{policy}", a.workers, a.ready_timeout, env, work)


def run_live(sys_: System, reqs: list[TraceRequest], a: argparse.Namespace) -> Row:
    """Replay against a started system, measuring CPU of its processes and of this replayer."""
    targets = [Target(p.name, p.popen.pid, tree=True) for p in sys_.procs] + [Target("replayer", os.getpid())]
    meter = CpuMeter(targets)
    cfg = ReplayConfig(url=sys_.url, extra_urls=tuple(sys_.extra_urls), speed=a.speed, vocab_size=a.vocab_size, seed=0, slo_ttft_ms=a.slo_ttft,
                       slo_itl_ms=a.slo_itl, progress=not a.no_progress, meta={"system": sys_.label})
    meter.start()
    busy0, t0 = machine_busy_s(), time.perf_counter()
    out = asyncio.run(replay(reqs, cfg))
    wall = time.perf_counter() - t0
    used = meter.stop()
    cpu = {k: None if v is None else 100 * v / wall for k, v in used.items()}
    cpu["other"] = max(0.0, 100 * (machine_busy_s() - busy0) / wall - sum(v or 0 for v in cpu.values()))
    router = prometheus_sums(sys_.url, "turbine_router_") if sys_.label.startswith("turbine") else None
    lags = [s - at for s, at in zip(out.sent_at_s, arrival_offsets_s(reqs, a.speed))]
    system, policy = sys_.label.split(" ", 1)
    return Row(system, policy, out.report, None, (percentile(lags, 99) or 0.0, max(lags)), cpu, router=router)


# ---- output ------------------------------------------------------------------------------------------
def _f(v: float | None, d: int = 0) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def _pair(live: float | None, sim: float | None, d: int = 0, pct: bool = False, *, has_sim: bool = True) -> str:
    """``live (sim)``; a percentage when ``pct``; no parenthesis when there was no simulation."""
    def fmt(v: float | None) -> str:
        return "n/a" if v is None else (f"{100 * v:.{d}f}%" if pct else f"{v:.{d}f}")

    return f"{fmt(live)} ({fmt(sim)})" if has_sim else fmt(live)


HEAD = ["system", "policy", "ok/req", "TTFT p50", "TTFT p99", "ITL p99", "E2E p50", "hit rate", "goodput rps",
        "out tok/s", "send lag p99/max s", "kept schedule", "CPU % fe/workers/replayer/other"]


def table(rows: list[Row], *, markdown: bool) -> str:
    body = []
    for r in rows:
        lv, sm = r.live, r.sim
        if lv is None:
            body.append([r.system, r.policy, f"failed: {r.failure}"] + ["-"] * (len(HEAD) - 3))
            continue
        cells = [(lv.ttft_ms.p50, sm and sm.ttft_ms.p50, 0, False), (lv.ttft_ms.p99, sm and sm.ttft_ms.p99, 0, False),
                 (lv.itl_ms.p99, sm and sm.itl_ms.p99, 1, False), (lv.e2e_ms.p50, sm and sm.e2e_ms.p50, 0, False),
                 (lv.hit_rate, sm and sm.hit_rate, 1, True), (lv.goodput_rps, sm and sm.goodput_rps, 2, False),
                 (lv.output_tokens_per_s, sm and sm.output_tokens_per_s, 0, False)]
        cpu = r.cpu_pct or {}
        body.append([
            r.system, r.policy, f"{lv.ok}/{lv.requests}",
            *[_pair(x, y, d, pct, has_sim=sm is not None) for x, y, d, pct in cells],
            f"{r.lag_s[0]:.3f} / {r.lag_s[1]:.3f}" if r.lag_s else "-",
            ("yes" if r.lag_s[0] <= LAG_OK_S else "NO") if r.lag_s else "-",
            "/".join(_f(cpu.get(k)) for k in ("frontend", "worker", "replayer", "other")),
        ])
    return render_table(HEAD, body, markdown=markdown)


def router_note(r: Row) -> str | None:
    """One line on how well Turbine's router predicted the workers' prefix hits."""
    m = r.router or {}
    n = m.get("overlap_observations_total")
    if not n or r.policy.split(" ")[0] not in ("kv", "kv-approx", "predicted", "predicted-own-load"):
        return None
    lag_n = m.get("kv_event_lag_seconds_count")
    lag = m.get("kv_event_lag_seconds_sum", 0) / lag_n * 1e3 if lag_n else None
    return (f"turbine {r.policy} router: predicted {m.get('predicted_overlap_blocks_total', 0):,.0f} hit blocks, "
            f"workers reported {m.get('actual_cached_blocks_total', 0):,.0f} (mean |error| "
            f"{m.get('overlap_error_blocks_total', 0) / n:.2f} blocks/request over {n:.0f}); "
            f"{m.get('kv_blocks_stored_total', 0):,.0f} blocks stored, {m.get('kv_blocks_removed_total', 0):,.0f} "
            f"removed, mean KV event lag {_f(lag, 2)} ms, {m.get('kv_events_rejected_total', 0):.0f} rejected, "
            f"{m.get('resyncs_total', 0):.0f} resyncs")


def plot(rows: list[Row], path: Path, title: str) -> str | None:
    """Grouped bars: live and simulated TTFT p50 per system/policy. None, or why there is no plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plotting needs matplotlib (pip install matplotlib)"
    rows = [r for r in rows if r.live is not None]
    labels = [f"{r.system}\n{r.policy}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(rows)), 4.8))
    live = [r.live.ttft_ms.p50 or 0 for r in rows]  # type: ignore[union-attr]
    sim = [(r.sim.ttft_ms.p50 or 0) if r.sim else 0 for r in rows]
    colors = ["C0" if r.system == "turbine" else "C2" for r in rows]
    ax.bar([x - 0.2 for x in xs], live, 0.4, color=colors, label="live (blue: Turbine, green: Dynamo 1.6.1)")
    ax.bar([x + 0.2 for x in xs], sim, 0.4, color="C7", alpha=0.7, label="turbine simulate, same requests")
    for x, v in zip(xs, live):
        ax.annotate(f"{v:.0f}", (x - 0.2, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("TTFT p50 (ms)")
    positive = [v for v in live + sim if v > 0]
    if positive and min(positive) * 20 < max(positive):  # a wide range: log scale
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def append_results(a: argparse.Namespace, rows: list[Row], reqs: list[TraceRequest], notes: list[str],
                   plot_rel: str | None, wall: float) -> None:
    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    span = (reqs[-1].timestamp_ms - reqs[0].timestamp_ms) / 1000
    tokens = sum(r.input_length for r in reqs)
    lines = [
        "", f"## live_routing — {when}", "",
        (f"- machine: {machine(load_average=True)} (when the run ended); the frontend, the worker process "
         f"({a.workers} simulated workers) and the replayer share these cores"),
        (f"- workload: {'the first' if not a.start else f'from request {a.start},'} {len(reqs)} requests of "
         f"{Path(a.trace).name} ({span:.0f} s of trace, {tokens:,} prompt tokens, trace's ideal reuse {100 * ideal_hit_rate(reqs):.1f}%) replayed at {a.speed:g}x "
         f"(`turbine.bench.replay`: token-id prompts to /v1/completions, streaming, exact output lengths, "
         f"vocab {a.vocab_size})"),
        (f"- fleet: {a.workers} mocker workers in one process per system, block size {a.block_size}, "
         f"{a.num_gpu_blocks:,} blocks/worker, max_num_seqs {a.max_num_seqs}, max_num_batched_tokens "
         f"{a.max_num_batched_tokens}, speedup 1, default timing; worker and frontend restarted per policy"),
        (f"- cells: live (simulated by `turbine simulate` on the same requests, speed and config); latencies in ms; "
         f"goodput SLO TTFT <= {a.slo_ttft:g} ms and mean ITL <= {a.slo_itl:g} ms; kept schedule = p99 send lag "
         f"<= {LAG_OK_S * 1e3:.0f} ms; CPU % of one core over the replay, other = the rest of the machine "
         "(processes not part of the run)"),
        f"- script wall time {wall / 60:.1f} min",
        *[f"- note: {n}" for n in notes], *([f"- plot: {plot_rel}"] if plot_rel else []), "",
        table(rows, markdown=True), "",
    ]
    append_atomically(Path(a.results), "\n".join(lines), RESULTS_HEADER)


# ---- main --------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace", default=DEFAULT_TRACE)
    p.add_argument("-n", "--max-requests", type=int, default=400, help="replay the first N requests")
    p.add_argument("--start", type=int, default=0, help="skip the trace's first requests (a later window)")
    p.add_argument("--speed", type=float, default=2.0, help="divide the trace's arrival times by this")
    p.add_argument("--max-input-tokens", type=int, default=0, help="cut longer prompts to this (0 = no cap)")
    p.add_argument("--systems", default="turbine,dynamo", help="comma list of turbine, dynamo")
    p.add_argument("--policies", default=",".join(TURBINE_POLICIES), help="Turbine's routing policies")
    p.add_argument("--dynamo-policies", default="kv,round-robin", help=f"of {', '.join(DYNAMO_POLICIES)}")
    p.add_argument("--frontends", default="1",
                   help="comma list of frontend counts per Turbine row (2: two frontends on the same workers, "
                   "requests sent to them in turn)")
    p.add_argument("--no-sim", action="store_true", help="no simulator prediction")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--num-gpu-blocks", type=int, default=16384)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--context-length", type=int, default=262144, help="max prompt + output tokens per request")
    p.add_argument("--vocab-size", type=int, default=4096,
                   help="prompt ids stay below this (Turbine's tiny model: 4096, the Dynamo anchor's: 8192)")
    p.add_argument("--slo-ttft", type=float, default=2000.0, metavar="MS")
    p.add_argument("--slo-itl", type=float, default=100.0, metavar="MS")
    p.add_argument("--turbine-model", default=None, help="model dir (default: Turbine's tiny model)")
    p.add_argument("--dynamo-dir", default=DEFAULT_DYNAMO_DIR)
    p.add_argument("--dynamo-model", default=None, help="model dir (default: DYNAMO_DIR/model)")
    p.add_argument("--no-netns", action="store_true", help="do not enter a loopback-only namespace")
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument("--workdir", default="/tmp/turbine-live-routing")
    p.add_argument("--plot", default=None,
                   help="PNG path (default: bench/plots/live_routing_ttft.png, or ..._from<START>.png)")
    p.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    p.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--note", action="append", default=[], help="a note for RESULTS.md (repeatable)")
    a = p.parse_args(argv)
    if a.plot is None:
        a.plot = str(REPO / "bench" / "plots" / f"live_routing_ttft{f'_from{a.start}' if a.start else ''}.png")
    a.system_list = [s for s in a.systems.split(",") if s]
    a.policy_list = [s for s in a.policies.split(",") if s]
    a.dynamo_policy_list = [s for s in a.dynamo_policies.split(",") if s]
    try:
        a.frontend_counts = [int(s) for s in a.frontends.split(",") if s]
    except ValueError:
        p.error("--frontends: a comma list of counts")
    if not a.frontend_counts or min(a.frontend_counts) < 1:
        p.error("--frontends: counts of at least 1")
    if not set(a.system_list) <= {"turbine", "dynamo"} or not a.system_list:
        p.error("--systems: a comma list of turbine, dynamo")
    if not set(a.policy_list) <= set(TURBINE_POLICIES) or not set(a.dynamo_policy_list) <= set(DYNAMO_POLICIES):
        p.error(f"policies must come from {', '.join(TURBINE_POLICIES)}")
    if a.max_requests < 1 or a.workers < 1 or not a.speed > 0 or a.max_input_tokens < 0 or a.start < 0:
        p.error("-n and --workers must be >= 1, --speed > 0, --start and --max-input-tokens >= 0")
    return a


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    if "dynamo" in a.system_list and want_netns(a.no_netns):
        reexec_in_netns([str(Path(__file__).resolve()), *argv])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    t_start = time.perf_counter()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        reqs, cut = load_requests(a)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    longest = max(r.input_length + r.output_length for r in reqs)
    if longest > a.context_length:
        print(f"error: a request needs {longest} tokens > --context-length {a.context_length}", file=sys.stderr)
        return 2
    notes = list(a.note)
    if cut:
        notes.append(f"{cut} prompts longer than {a.max_input_tokens} tokens were cut to it (live and simulated)")
    plan = [("turbine", p if n == 1 else f"{p} x{n}") for n in a.frontend_counts for p in a.policy_list
            if "turbine" in a.system_list]
    if "dynamo" in a.system_list:
        if why := dynamo_missing(a.dynamo_dir, a.dynamo_model, a.no_netns):
            print(f"[bench] skipping Dynamo: {why}", file=sys.stderr)
            notes.append(f"Dynamo skipped: {why}")
        else:
            plan += [("dynamo", p) for p in a.dynamo_policy_list]
    sims: dict[str, TraceReport] = {}
    if not a.no_sim:
        for policy in dict.fromkeys(p for _, p in plan):
            sims[policy] = run_sim(reqs, policy, a)
            print(f"[bench] sim {policy}: TTFT p50 {sims[policy].ttft_ms.p50 or 0:.0f} ms, hit "
                  f"{100 * (sims[policy].hit_rate or 0):.1f}% ({sims[policy].meta['wall_s']} s)", flush=True)
    rows: list[Row] = []
    starters = {"turbine": start_turbine, "dynamo": start_dynamo}
    for system, policy in plan:
        print(f"[bench] {system} {policy}: {len(reqs)} requests at {a.speed:g}x", flush=True)
        try:
            sys_ = starters[system](policy, a, work)
        except (RuntimeError, OSError) as e:
            lines = [x.strip() for x in str(e).splitlines() if x.strip()] or [repr(e)]
            print(f"[bench] {system} {policy} failed to start: {e}", file=sys.stderr)
            why = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
            rows.append(Row(system, policy, None, sims.get(policy), failure=why[:160]))
            continue
        try:
            row = run_live(sys_, reqs, a)
        except (aiohttp.ClientError, OSError, ValueError) as e:  # the replay could not run at all
            print(f"[bench] {system} {policy} replay failed: {e!r}", file=sys.stderr)
            rows.append(Row(system, policy, None, sims.get(policy), failure=repr(e)[:120]))
            continue
        finally:
            stop_all(sys_.procs)
        row.sim = sims.get(policy)
        rows.append(row)
        rep = row.live
        assert rep is not None
        print(f"[bench] {system} {policy}: {rep.ok}/{rep.requests} ok, TTFT p50 {rep.ttft_ms.p50 or 0:.0f} ms, "
              f"lag p99 {row.lag_s[0]:.3f} s", flush=True)  # type: ignore[index]
        if note := router_note(row):
            print(f"[bench]   {note}", flush=True)
        for err in rep.first_errors[:3]:
            print(f"[bench]   error: {err}", file=sys.stderr)
    if not any(r.live for r in rows):
        if rows:
            print(table(rows, markdown=False))
        print("[bench] nothing measured", file=sys.stderr)
        return 1
    if any(r.system == "dynamo" and r.live is not None and r.live.hit_rate is None for r in rows):
        notes.append("Dynamo reported no usage.prompt_tokens_details.cached_tokens: its hit rate is n/a")
    notes += [n for r in rows if (n := router_note(r))]
    wall = time.perf_counter() - t_start
    print()
    print(table(rows, markdown=False))
    for n in notes:
        print(f"note: {n}")
    (work / "results.json").write_text(json.dumps(
        [{"system": r.system, "policy": r.policy, "live": r.live.to_dict() if r.live else None,
          "sim": r.sim.to_dict() if r.sim else None, "lag_s": r.lag_s, "cpu_pct": r.cpu_pct,
          "router": r.router, "failure": r.failure} for r in rows], indent=2))
    plot_rel = None
    title = (f"Live routing, {a.workers} mocker workers, {len(reqs)} Mooncake requests at {a.speed:g}x: "
             "TTFT p50 per system and policy")
    if why := plot(rows, Path(a.plot), title):
        print(f"[bench] no plot: {why}", file=sys.stderr)
    else:
        plot_rel = os.path.relpath(a.plot, REPO)
        print(f"[bench] plot: {a.plot}")
    if not a.no_results:
        append_results(a, rows, reqs, notes, plot_rel, wall)
        print(f"[bench] appended to {a.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
