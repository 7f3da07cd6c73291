#!/usr/bin/env python3
"""Frontend overhead, Turbine vs Dynamo 1.6.1, same machine, same workload, same load generator.

Both systems serve 2 mocker workers at speedup 1000 (simulated GPU time ~0), so what is left is
the cost of HTTP, tokenizing, routing, the request plane and detokenizing. Each system gets
~500-token prompts (trimmed with its own tokenizer), 50 output tokens, streaming over keep-alive
connections, closed loop at each concurrency. The frontend's CPU time per request is the
headline number; the table goes to stdout and is appended to bench/RESULTS.md.

Dynamo's ZMQ event plane binds 0.0.0.0 (hard-coded in 1.6.1), so as root the script re-runs
itself in a private network namespace with only loopback (`unshare --net`), as the anchor's
run_anchor.sh does. Every process started runs in its own process group and is stopped in a
`finally` (SIGINT, then SIGKILL after 10 s), also on errors and SIGTERM.

    python bench/frontend_overhead.py                   # both systems, c=16 and c=32
    python bench/frontend_overhead.py --systems dynamo  # one system only
    python bench/frontend_overhead.py --turbine-shape multi   # turbine frontend + 2 workers
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _procs import (  # noqa: E402
    DYNAMO_MODEL_NAME,
    System,
    dynamo_env,
    free_port,
    machine,
    reexec_in_netns,
    start,
    stop_all,
    wait_ready,
    want_netns,
)
from _procs import dynamo_missing as _dynamo_missing  # noqa: E402

from turbine.bench.loadgen import LoadConfig, run_load  # noqa: E402
from turbine.bench.stats import LoadReport, render_table  # noqa: E402


# ---- the two systems ------------------------------------------------------------------------------
def start_turbine(a: argparse.Namespace, work: Path) -> System:
    cmd = shlex.split(a.turbine_cmd) if a.turbine_cmd else [sys.executable, "-m", "turbine"]
    model = Path(a.turbine_model) if a.turbine_model else work / "turbine-model"
    if not (model / "tokenizer.json").exists():
        subprocess.run(cmd + ["make-model", str(model), "--preset", "tiny", "--overwrite"], check=True,
                       cwd=REPO, stdout=subprocess.DEVNULL)
    port = free_port()
    engine = ["--engine", "mock", "--model", str(model), "--speedup-ratio", str(a.speedup),
              "--block-size", str(a.block_size)]
    sys_ = System(f"turbine ({a.turbine_shape})", f"http://127.0.0.1:{port}", str(model))
    try:
        if a.turbine_shape == "serve":
            sys_.procs.append(start("frontend", cmd + ["serve", *engine, "--workers", str(a.workers),
                                    "--host", "127.0.0.1", "--port", str(port)], work / "logs"))
        else:
            disc = work / "turbine-discovery"
            shutil.rmtree(disc, ignore_errors=True)
            disc.mkdir(parents=True)
            sys_.procs.append(start("frontend", cmd + ["frontend", "--discovery-dir", str(disc),
                                    "--host", "127.0.0.1", "--port", str(port)], work / "logs"))
            for i in range(a.workers):
                sys_.procs.append(start(f"worker{i + 1}", cmd + ["worker", *engine, "--discovery-dir",
                                        str(disc)], work / "logs"))
        wait_ready(sys_, a.workers, a.ready_timeout)
    except BaseException:
        stop_all(sys_.procs)
        raise
    return sys_


def start_dynamo(a: argparse.Namespace, work: Path) -> System:
    root = Path(a.dynamo_dir)
    py = root / "venv" / "bin" / "python"
    model = Path(a.dynamo_model) if a.dynamo_model else root / "model"
    kv = work / "dynamo-kv"
    shutil.rmtree(kv, ignore_errors=True)
    kv.mkdir(parents=True)
    env = dynamo_env(kv, root / "venv")
    port = free_port()
    sys_ = System("dynamo 1.6.1", f"http://127.0.0.1:{port}", str(model))
    try:
        sys_.procs.append(start("frontend", [str(py), "-m", "dynamo.frontend", "--http-host", "127.0.0.1",
                                "--http-port", str(port), "--router-mode", "kv"], work / "logs", env, work))
        for i in range(a.workers):
            sys_.procs.append(start(f"worker{i + 1}", [
                str(py), "-m", "dynamo.mocker", "--model-path", str(model), "--model-name",
                DYNAMO_MODEL_NAME, "--block-size", str(a.block_size), "--speedup-ratio", str(a.speedup),
            ], work / "logs", env, work))
        wait_ready(sys_, a.workers, a.ready_timeout)
    except BaseException:
        stop_all(sys_.procs)
        raise
    return sys_


def dynamo_missing(a: argparse.Namespace) -> str | None:
    """Why Dynamo cannot run here, or None."""
    return _dynamo_missing(a.dynamo_dir, a.dynamo_model, a.no_netns)


# ---- measuring ------------------------------------------------------------------------------------
def measure(sys_: System, a: argparse.Namespace) -> list[LoadReport]:
    reports = []
    for c in a.concurrency:
        cfg = LoadConfig(url=sys_.url, concurrency=c, num_requests=a.num_requests, warmup=2 * c,
                         prompt_tokens=a.prompt_tokens, max_tokens=a.max_tokens, stream=True,
                         fresh_conn=a.fresh_conn, seed=a.seed, pids=sys_.pids(),
                         tokenizer=sys_.tokenizer, label=sys_.label, progress=False)
        rep = asyncio.run(run_load(cfg))
        print(f"[bench] {sys_.label} c={c}: {rep.ok}/{rep.requests} ok, {rep.req_per_s:.1f} req/s, "
              f"frontend {rep.cpu_ms_per_request.get('frontend') or 0:.2f} CPU ms/req", flush=True)
        for err in rep.first_errors[:3]:
            print(f"[bench]   error: {err}", file=sys.stderr)
        reports.append(rep)
    return reports


def _f(v: float | None, d: int = 1) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def table(reports: list[LoadReport], *, markdown: bool) -> str:
    head = ["system", "c", "ok/req", "req/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99",
            "frontend CPU ms/req", "workers CPU ms/req", "frontend CPU %", "loadgen CPU %", "prompt tok"]
    rows = []
    for r in reports:
        workers = [v for k, v in r.cpu_ms_per_request.items() if k.startswith("worker")]
        rows.append([r.label, str(r.concurrency), f"{r.ok}/{r.requests}", _f(r.req_per_s),
                     _f(r.ttft_ms.p50), _f(r.ttft_ms.p99), _f(r.itl_ms.p50, 2), _f(r.itl_ms.p99, 2),
                     _f(r.cpu_ms_per_request.get("frontend"), 2),
                     _f(sum(workers), 2) if workers and None not in workers else "-",
                     _f(r.cpu_pct.get("frontend"), 0), _f(r.cpu_pct.get("loadgen"), 0),
                     _f(r.prompt_tokens_mean, 0)])
    return render_table(head, rows, markdown=markdown)


def append_results(path: Path, a: argparse.Namespace, reports: list[LoadReport], notes: list[str]) -> None:
    if not path.exists():
        path.write_text("# Benchmark results\n\nAppended by the scripts in `bench/` (see bench/README.md); "
                        "newest last. Never edit old entries.\n")
    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [
        "", f"## frontend_overhead — {when}", "",
        f"- machine: {machine()}",
        f"- workload: {a.workers} mocker workers at speedup {a.speedup:g}, block size {a.block_size}, "
        f"~{a.prompt_tokens}-token prompts, {a.max_tokens} output tokens, streaming, "
        f"{'fresh connections' if a.fresh_conn else 'keep-alive connections'}, "
        f"{a.num_requests} requests per phase after 2×c warm-up",
        "- CPU columns: ms of CPU (user+sys, all threads) per request; % is of one core",
        *[f"- note: {n}" for n in notes], "",
        table(reports, markdown=True), "",
    ]
    with open(path, "a") as f:
        f.write("\n".join(lines))


# ---- main -----------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--systems", default="turbine,dynamo", help="comma list of turbine, dynamo")
    p.add_argument("--concurrency", default="16,32", help="comma list of closed-loop concurrencies")
    p.add_argument("-n", "--num-requests", type=int, default=400, help="measured requests per phase")
    p.add_argument("--prompt-tokens", type=int, default=500)
    p.add_argument("--max-tokens", type=int, default=50)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--speedup", type=float, default=1000.0, help="mocker --speedup-ratio")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--fresh-conn", action="store_true", help="a new connection per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--turbine-cmd", default=None, help='how to run turbine (default: "python -m turbine")')
    p.add_argument("--turbine-shape", choices=["serve", "multi"], default="serve",
                   help="serve: one process; multi: `turbine frontend` + N `turbine worker` processes")
    p.add_argument("--turbine-model", default=None, help="model dir (default: make-model --preset tiny)")
    p.add_argument("--dynamo-dir", default=os.environ.get("ANCHOR_DIR", "/tmp/dynamo-anchor"))
    p.add_argument("--dynamo-model", default=None, help="model dir (default: DYNAMO_DIR/model)")
    p.add_argument("--no-netns", action="store_true", help="do not enter a loopback-only namespace")
    p.add_argument("--workdir", default="/tmp/turbine-frontend-overhead")
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    p.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    a = p.parse_args(argv)
    a.systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    bad = set(a.systems) - {"turbine", "dynamo"}
    if bad or not a.systems:
        p.error(f"--systems: unknown {sorted(bad)}; choose from turbine, dynamo")
    try:
        a.concurrency = [int(c) for c in a.concurrency.split(",") if c.strip()]
    except ValueError:
        p.error("--concurrency must be a comma list of integers")
    if not a.concurrency or min(a.concurrency) < 1 or a.num_requests < 1 or a.workers < 1:
        p.error("concurrency, --num-requests and --workers must be >= 1")
    return a


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    if "dynamo" in a.systems and want_netns(a.no_netns):
        reexec_in_netns([str(Path(__file__).resolve()), *argv])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    work = Path(a.workdir)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    reports: list[LoadReport] = []
    notes: list[str] = []
    starters = {"turbine": start_turbine, "dynamo": start_dynamo}
    for name in a.systems:
        if name == "dynamo" and (why := dynamo_missing(a)):
            print(f"[bench] skipping Dynamo: {why}", file=sys.stderr)
            notes.append(f"Dynamo skipped: {why}")
            continue
        try:
            sys_ = starters[name](a, work)
        except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
            print(f"[bench] {name} failed to start: {e}", file=sys.stderr)
            lines = [x.strip() for x in str(e).splitlines() if x.strip()]
            notes.append(f"{name} failed to start: {lines[0]} {lines[-1] if len(lines) > 1 else ''}")
            continue
        if name == "turbine" and a.turbine_shape == "serve":
            notes.append("turbine (serve) is one process: its frontend CPU includes the workers")
        try:
            reports += measure(sys_, a)
        finally:
            stop_all(sys_.procs)
    if not reports:
        print("[bench] nothing measured", file=sys.stderr)
        return 1
    print()
    print(table(reports, markdown=False))
    for n in notes:
        print(f"note: {n}")
    (work / "results.json").write_text(json.dumps([r.to_dict() for r in reports], indent=2))
    if not a.no_results:
        append_results(Path(a.results), a, reports, notes)
        print(f"[bench] appended to {a.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
