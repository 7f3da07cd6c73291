#!/usr/bin/env python3
"""What Turbine adds in front of vLLM: vLLM's own OpenAI server vs Turbine frontend + one vLLM worker.

Both stacks run the same vLLM engine (same checkpoint, same engine arguments) and get the same
workload from Turbine's load generator: streamed /v1/completions, ~``--prompt-tokens`` prompts
(exact with the model's tokenizer), exactly ``--max-tokens`` outputs (ignore_eos), closed loop at
each concurrency. Both stacks are up together and measured in alternating phases (round r runs
vLLM first when r is even, Turbine first when odd), so slow drift hits both; the table reports
the median over rounds. Turbine's overhead = its TTFT minus vLLM's, and its throughput loss.
Each (concurrency, round) draws fresh random prompts (both stacks get the same ones), so no phase
hits prefixes cached by an earlier one; within a phase prompts do not repeat.

    python bench/vllm_overhead.py                        # tiny model, c=1 and c=8, 3 rounds
    python bench/vllm_overhead.py --model DIR --concurrency 1 4 16 -n 64

Needs the vllm extra (`pip install -e '.[vllm]'`). Every process runs in its own process group
and is stopped in a ``finally`` (SIGINT, then SIGKILL). The table goes to stdout and is appended
to bench/RESULTS.md (one write) with the machine and date.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from turbine.bench.cpu import CpuMeter, Target  # noqa: E402
from turbine.bench.loadgen import LoadConfig, run_load  # noqa: E402
from turbine.bench.stats import LoadReport, format_table, render_table  # noqa: E402

ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_HOST_IP": "127.0.0.1",
       "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


@dataclass
class Stack:
    label: str
    url: str = ""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def targets(self) -> list[Target]:
        return [Target(name, p.pid, tree=True) for name, p in self.procs.items()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(stack: Stack, name: str, cmd: list[str], logs: Path) -> None:
    log = logs / f"{name}.log"
    with open(log, "wb") as f:
        stack.procs[name] = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                             env={**os.environ, **ENV}, cwd=REPO)
    stack.logs[name] = log
    print(f"[bench] {name} pid {stack.procs[name].pid}: {shlex.join(cmd)}", flush=True)


def stop(stacks: list[Stack]) -> None:
    procs = [p for s in stacks for p in s.procs.values()]
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGINT)
    deadline = time.monotonic() + 20
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def ready(url: str, workers: bool) -> bool:
    try:
        with urllib.request.urlopen(url + ("/health" if workers else "/v1/models"), timeout=2) as r:
            body = r.read().decode()
    except OSError:
        return False
    return '"tiny"' in body if workers else True


def wait_ready(stacks: list[Stack], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(ready(s.url, s.label == "turbine") for s in stacks):
        dead = [(s.label, n) for s in stacks for n, p in s.procs.items() if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            tails = "\n".join(f"--- {n}\n{log.read_text()[-2000:]}" for s in stacks for n, log in s.logs.items())
            raise SystemExit(f"[bench] not ready (exited: {dead})\n{tails}")
        time.sleep(0.5)


def idle_cpu_pct(stacks: list[Stack], seconds: float = 3.0) -> dict[str, float]:
    meter = CpuMeter([t for s in stacks for t in s.targets()])
    meter.start()
    time.sleep(seconds)
    return {k: 100.0 * (v or 0.0) / seconds for k, v in meter.stop().items()}


def machine() -> str:
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()}, {model}, {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.2f}"


def versions() -> str:
    out = []
    for mod in ("vllm", "torch"):
        try:
            out.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001 - informational only
            out.append(f"{mod} ?")
    return ", ".join(out)


def median(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def _f(v: float | None, d: int = 1) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def _s(v: float | None, d: int = 1) -> str:
    return "-" if v is None else f"{v:+.{d}f}"


def overhead_table(results: dict[tuple[str, int], list[LoadReport]], concurrencies: list[int],
                   markdown: bool) -> tuple[str, list[str]]:
    head = ["c", "vLLM tok/s", "Turbine tok/s", "throughput", "vLLM TTFT p50", "Turbine TTFT p50", "TTFT Δms",
            "vLLM ITL p50", "Turbine ITL p50", "ITL Δms", "vLLM E2E p50", "Turbine E2E p50"]
    rows, verdicts = [], []
    for c in concurrencies:
        v, t = results[("vllm", c)], results[("turbine", c)]
        vt, tt = median([r.output_tokens_per_s for r in v]), median([r.output_tokens_per_s for r in t])
        v_ttft, t_ttft = median([r.ttft_ms.p50 for r in v]), median([r.ttft_ms.p50 for r in t])
        v_itl, t_itl = median([r.itl_ms.p50 for r in v]), median([r.itl_ms.p50 for r in t])
        loss = None if not vt or tt is None else 100.0 * (tt - vt) / vt
        d_ttft = None if v_ttft is None or t_ttft is None else t_ttft - v_ttft
        d_itl = None if v_itl is None or t_itl is None else t_itl - v_itl
        rows.append([str(c), _f(vt, 0), _f(tt, 0), f"{_s(loss)}%", _f(v_ttft), _f(t_ttft), _s(d_ttft),
                     _f(v_itl, 2), _f(t_itl, 2), _s(d_itl, 2), _f(median([r.e2e_ms.p50 for r in v]), 0),
                     _f(median([r.e2e_ms.p50 for r in t]), 0)])
        ok_tp = loss is not None and loss > -5.0
        ok_ttft = d_ttft is not None and d_ttft < 2.0
        verdicts.append(f"c={c}: throughput {_s(loss)}% (goal > -5%: {'met' if ok_tp else 'MISSED'}), "
                        f"TTFT {_s(d_ttft, 2)} ms (goal < +2 ms: {'met' if ok_ttft else 'MISSED'})")
    return render_table(head, rows, markdown=markdown), verdicts


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help="HF model dir (default: a generated tiny model)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("-n", "--num-requests", type=int, default=48, help="measured requests per phase")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--engine-args", default="--block-size 32 --enforce-eager --max-num-seqs 16 --max-model-len 2048 "
                   "--dtype float32 --distributed-executor-backend uni --seed 0",
                   help="vLLM engine arguments, the same for both stacks")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md")
    p.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    p.add_argument("--note", default="", help="a line added under the table in RESULTS.md")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("[bench] vLLM is not installed: pip install -e '.[vllm]'", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="turbine-vllm-bench-"))
    model = a.model
    if model is None:
        from turbine.model_maker.make_model import make_model

        model = make_model(work / "tiny", preset="tiny")
    eargs = shlex.split(a.engine_args)
    vllm_stack, turbine_stack = Stack("vllm"), Stack("turbine")
    stacks = [vllm_stack, turbine_stack]
    try:
        port = free_port()
        vllm_stack.url = f"http://127.0.0.1:{port}"
        start(vllm_stack, "vllm", [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                                   "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
                                   *eargs], work)
        port = free_port()
        turbine_stack.url = f"http://127.0.0.1:{port}"
        turbine = [sys.executable, "-m", "turbine", "--log-level", "WARNING"]
        start(turbine_stack, "frontend", [*turbine, "frontend", "--discovery-dir", str(work / "disc"), "--port",
                                          str(port), "--router", "kv"], work)
        start(turbine_stack, "worker", [*turbine, "worker", "--engine", "vllm", "--model", str(model), "--model-name",
                                        "tiny", "--discovery-dir", str(work / "disc"), "--", *eargs], work)
        t0 = time.monotonic()
        wait_ready(stacks, timeout_s=300)
        print(f"[bench] both stacks ready in {time.monotonic() - t0:.1f} s", flush=True)
        idle = idle_cpu_pct(stacks)
        print("[bench] idle CPU %: " + ", ".join(f"{k} {v:.1f}" for k, v in idle.items()), flush=True)
        results: dict[tuple[str, int], list[LoadReport]] = {}
        for c in a.concurrency:
            for r in range(a.rounds):
                for s in (stacks if r % 2 == 0 else stacks[::-1]):
                    cfg = LoadConfig(url=s.url, model="tiny", num_requests=a.num_requests, concurrency=c,
                                     prompt_tokens=a.prompt_tokens, max_tokens=a.max_tokens, completions=True,
                                     tokenizer=str(model), warmup=max(c, 4), seed=1000 * c + r, pids=s.targets(),
                                     label=f"{s.label} r{r}", progress=False)
                    rep = asyncio.run(run_load(cfg))
                    if rep.errors:
                        raise SystemExit(f"[bench] {s.label} c={c}: {rep.errors} errors: {rep.first_errors}")
                    results.setdefault((s.label, c), []).append(rep)
                    print(format_table([rep]).splitlines()[-1], flush=True)
    finally:
        stop(stacks)
    every = [rep for reps in results.values() for rep in reps]
    print("\n" + format_table(every))
    table, verdicts = overhead_table(results, a.concurrency, markdown=False)
    print("\n" + table + "\n" + "\n".join(verdicts))
    if not a.no_results:
        md, _ = overhead_table(results, a.concurrency, markdown=True)
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        text = (f"\n## vllm_overhead — {now}\n\n"
                f"- machine: {machine()}; {versions()}\n"
                f"- workload: streamed /v1/completions, {a.prompt_tokens}-token prompts, {a.max_tokens} output tokens "
                f"(ignore_eos), {a.num_requests} requests per phase, closed loop, median of {a.rounds} alternating "
                f"rounds; vLLM engine args `{a.engine_args}`; env {' '.join(f'{k}={v}' for k, v in ENV.items())}\n"
                f"- (a) `python -m vllm.entrypoints.openai.api_server`; (b) `turbine frontend --router kv` + "
                f"`turbine worker --engine vllm`\n"
                f"- idle CPU % before the load: {', '.join(f'{k} {v:.1f}' for k, v in idle.items())}\n\n"
                f"{md}\n\n" + "".join(f"- {v}\n" for v in verdicts)
                + "\nAll phases:\n\n" + format_table(every, markdown=True) + "\n"
                + (f"\n{a.note}\n" if a.note else ""))
        with open(a.results, "a") as f:
            f.write(text)
        print(f"[bench] appended to {a.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
