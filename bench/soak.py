#!/usr/bin/env python3
"""Soak: a multi-process fleet under moderate, mixed load for a long time, RSS/fds/tasks sampled.

`turbine frontend` + N `turbine worker --engine mock` processes (file discovery, one process
each, as in production) get a steady open-loop load (Poisson arrivals at --rate) for --duration
seconds (default 30 min): prompts sharing a few system-prompt prefixes, continuations of recent
prompts and a stream of unique ones (so the router's index fills up, then churns as the workers'
KV caches evict), streaming and not, chat and completions, keep-alive and fresh connections,
clients that disconnect mid-stream or before the first token, and malformed requests (4xx).

Every --interval seconds it samples RSS, open fds and threads of every process (/proc) and the
frontend's /metrics (asyncio tasks, HTTP connections, router index size, blocks removed). The
load pauses twice to measure the fleet idle: once after the warm-up (the first --warmup-frac of
the run, extended until the index is full) and once at the end. Verdict per process:

- RSS flat after the warm-up: least-squares slope <= --max-rss-slope MB/h, or growth from the
  first to the last post-warm-up sample <= --rss-noise-mb (a short run's slope is mostly noise);
- idle fds (and, for the frontend, idle tasks and connections) at the end back within a margin
  of the idle values after the warm-up (the start's are shown too: the first requests create
  per-worker connections and tasks that live as long as the worker);
- requests: unexpected failures (anything but 2xx for a well-formed request, 4xx for a bad one,
  or a deliberate disconnect) <= --max-error-rate.

Prints a table and PASS/FAIL (exit 1 on FAIL), writes the samples (WORKDIR/soak_samples.csv,
WORKDIR/soak.json), a plot, and appends an entry to bench/RESULTS.md (--no-record: none).

    python bench/soak.py                                   # 30 min, 2 workers, 8 req/s
    python bench/soak.py --duration 120 --no-record        # a quick check
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import json
import os
import random
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _procs import (
    RESULTS_HEADER,
    System,
    append_atomically,
    free_port,
    fresh_dir,
    machine,
    start_system,
    stop_all,
)

from turbine.bench.cpu import CpuMeter, Target
from turbine.bench.loadgen import first_model, send_request
from turbine.bench.prompts import word_pool
from turbine.bench.stats import render_table

_HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}
_ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
INDEX_FULL = 0.9  # the index counts as full at this fraction of workers x --num-gpu-blocks
MAX_WARMUP_FRAC = 0.5  # the warm-up waits for a full index at most this fraction of the run
IDLE_SAMPLES = 3  # an idle checkpoint is the median of this many samples, 1 s apart


# ---- the fleet ---------------------------------------------------------------------------------------
def start_fleet(a: argparse.Namespace, work: Path) -> System:
    from turbine.launch import default_model_dir

    cmd = [sys.executable, "-m", "turbine"]
    model = Path(a.model) if a.model else default_model_dir()
    disc = str(fresh_dir(work / "discovery"))
    port = free_port()
    worker = cmd + ["worker", "--engine", "mock", "--model", str(model), "--discovery-dir", disc,
                    "--block-size", str(a.block_size), "--num-gpu-blocks", str(a.num_gpu_blocks),
                    "--speedup-ratio", str(a.speedup_ratio)]
    cmds = [("frontend", cmd + ["frontend", "--discovery-dir", disc, "--host", "127.0.0.1", "--port", str(port)])]
    cmds += [(f"worker-{i}", worker) for i in range(a.workers)]
    return start_system(System("turbine", f"http://127.0.0.1:{port}", str(model)), cmds, work / "logs",
                        a.workers, a.ready_timeout)


# ---- the workload ------------------------------------------------------------------------------------
@dataclass
class Req:
    kind: str  # full | disconnect-chunks | disconnect-timer | bad
    method: str
    path: str
    body: bytes
    stream: bool
    fresh_conn: bool
    arg: float = 0.0  # disconnect-chunks: chunks to read; disconnect-timer: seconds before hanging up


def _bad_bodies(model: str) -> list[tuple[str, str, bytes]]:
    """(method, path, body) of requests a server must refuse with a 4xx."""
    msg = [{"role": "user", "content": "hello"}]

    def j(**kw: Any) -> bytes:
        return json.dumps({"model": model, **kw}).encode()

    return [
        ("POST", _ENDPOINTS["chat"], b'{"model": "' + model.encode() + b'", "messages": [{"role": '),  # cut JSON
        ("POST", _ENDPOINTS["chat"], json.dumps({"model": "no-such-model", "messages": msg}).encode()),
        ("POST", _ENDPOINTS["chat"], j()),  # no messages
        ("POST", _ENDPOINTS["chat"], j(messages=msg, max_tokens=-1)),
        ("POST", _ENDPOINTS["chat"], j(messages=msg, max_tokens=10**7)),  # beyond the context
        ("POST", _ENDPOINTS["chat"], j(messages=[{"role": "wizard", "content": "x"}])),
        ("POST", _ENDPOINTS["chat"], j(messages=msg, temperature="hot")),
        ("POST", _ENDPOINTS["chat"], j(messages=msg, seed=2**70)),  # beyond 64 bits
        ("POST", _ENDPOINTS["chat"], b'{"model": "' + model.encode() + b'", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        ("POST", _ENDPOINTS["completions"], j(prompt=[1, 2, 10**9])),  # token id beyond the vocab
        ("GET", "/v1/no-such-endpoint", b""),
        ("PUT", _ENDPOINTS["chat"], j(messages=msg)),
    ]


class Workload:
    """Seeded request mix. Prompts: a shared system prompt + unique question (--shared-frac), a
    continuation of a recent prompt (--continue-frac), or unique text; modes: streamed to the end,
    not streamed, disconnected mid-stream (--disconnect-frac), malformed (--bad-frac)."""

    def __init__(self, a: argparse.Namespace, model: str) -> None:
        self.a, self.model = a, model
        self.rng = random.Random(a.seed)
        self.pool = word_pool()
        self.prefixes = [self._words(a.prefix_words) for _ in range(a.prefixes)]
        self.recent: list[str] = []  # a ring of recent prompts, continued by later requests
        self.bad = _bad_bodies(model)
        self.count = 0

    def _words(self, n: int) -> str:
        return " ".join(self.rng.choices(self.pool, k=n))

    def _prompt(self) -> str:
        a, r = self.a, self.rng.random()
        self.count += 1
        if r < a.shared_frac:
            p = f"{self.rng.choice(self.prefixes)}\n[{self.count}] {self._words(self.rng.randint(*a.suffix_words))}"
        elif r < a.shared_frac + a.continue_frac and self.recent:
            p = f"{self.rng.choice(self.recent)}\n[{self.count}] {self._words(self.rng.randint(16, 64))}"
            if len(p.split()) > 3 * a.prefix_words + 2 * a.suffix_words[1]:  # conversations end
                p = f"[{self.count}] {self._words(a.suffix_words[1])}"
        else:
            p = f"[{self.count}] {self._words(a.prefix_words + self.rng.randint(*a.suffix_words))}"
        if len(self.recent) < 64:
            self.recent.append(p)
        else:
            self.recent[self.rng.randrange(64)] = p
        return p

    def next(self) -> Req:
        a, rng = self.a, self.rng
        fresh = rng.random() < a.fresh_conn_frac
        r = rng.random()
        if r < a.bad_frac:
            method, path, body = rng.choice(self.bad)
            return Req("bad", method, path, body, False, fresh)
        r -= a.bad_frac
        if r < a.disconnect_frac / 2:
            kind, stream, arg = "disconnect-chunks", True, float(rng.randint(1, max(1, a.max_tokens // 2)))
        elif r < a.disconnect_frac:
            kind, stream, arg = "disconnect-timer", True, rng.uniform(0.0, 0.3)
        else:
            kind, stream, arg = "full", rng.random() >= a.no_stream_frac, 0.0
        endpoint = "completions" if rng.random() < a.completions_frac else "chat"
        prompt = self._prompt()
        n = rng.randint(a.min_tokens, a.max_tokens)
        body: dict[str, Any] = {"model": self.model, "max_tokens": n, "stream": stream, "ignore_eos": True,
                                "min_tokens": n}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return Req(kind, "POST", _ENDPOINTS[endpoint], json.dumps(body).encode(), stream, fresh, arg)


# ---- the client ---------------------------------------------------------------------------------------
@dataclass
class Counts:
    sent: int = 0
    ok: int = 0
    disconnected: int = 0  # deliberate client disconnects
    rejected: int = 0  # bad requests answered 4xx, as they should be
    failed: int = 0  # anything else
    shed: int = 0  # not sent: --max-inflight requests were already outstanding
    unfinished: int = 0  # still running --drain-timeout after the load stopped, cancelled
    errors: Counter[str] = field(default_factory=Counter)

    def fail(self, why: str) -> None:
        self.failed += 1
        if why in self.errors or len(self.errors) < 50:  # bounded: the client must not grow either
            self.errors[why] += 1

    @property
    def done(self) -> int:
        return self.ok + self.disconnected + self.rejected + self.failed + self.unfinished


class Client:
    def __init__(self, a: argparse.Namespace, url: str, workload: Workload) -> None:
        self.a, self.url, self.workload = a, url, workload
        self.rng = random.Random(a.seed + 1)
        self.counts = Counts()
        self.inflight = 0
        self.load_s = 0.0  # seconds of load so far

    async def _one(self, session: aiohttp.ClientSession, req: Req) -> None:
        c, url = self.counts, self.url + req.path
        try:
            if req.kind == "full":
                r = await send_request(session, url, req.body, req.stream)
                if r.ok:
                    c.ok += 1
                else:
                    c.fail(f"{req.path}: {r.error or 'error'}"[:120])
            elif req.kind == "bad":
                async with session.request(req.method, url, data=req.body or None, headers=_HEADERS) as resp:
                    await resp.read()
                    if 400 <= resp.status < 500:
                        c.rejected += 1
                    else:
                        c.fail(f"bad request {req.method} {req.path} answered {resp.status}")
            elif req.kind == "disconnect-chunks":
                async with session.post(url, data=req.body, headers=_HEADERS) as resp:
                    if resp.status != 200:
                        c.fail(f"{req.path}: HTTP {resp.status}")
                        return
                    seen = 0
                    async for chunk in resp.content.iter_any():
                        seen += chunk.count(b"data:")
                        if seen >= req.arg:
                            resp.close()  # hang up mid-stream
                            c.disconnected += 1
                            return
                    c.ok += 1  # finished before we hung up
            else:  # disconnect-timer: hang up after a delay, wherever the request is by then
                task = asyncio.ensure_future(send_request(session, url, req.body, req.stream))
                done, _ = await asyncio.wait({task}, timeout=req.arg)
                if not done:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    c.disconnected += 1
                elif task.result().ok:
                    c.ok += 1
                else:
                    c.fail(f"{req.path}: {task.result().error or 'error'}"[:120])
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            c.fail(f"{req.kind} {req.path}: {type(e).__name__}: {e}"[:120])
        finally:
            self.inflight -= 1

    async def drive(self, stop: Callable[[], bool]) -> None:
        """Poisson arrivals at --rate until ``stop()``; then wait for what is in flight and close
        the connections (so the fleet can go idle)."""
        a, loop = self.a, asyncio.get_running_loop()
        timeout = aiohttp.ClientTimeout(total=a.request_timeout)
        keep = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout)
        fresh = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True), timeout=timeout)
        tasks: set[asyncio.Task[None]] = set()
        t0 = loop.time()
        at = t0
        try:
            while not stop():
                at += self.rng.expovariate(a.rate)
                if (d := at - loop.time()) > 0:
                    await asyncio.sleep(d)
                if stop():
                    break
                if self.inflight >= a.max_inflight:
                    self.counts.shed += 1
                    continue
                req = self.workload.next()
                self.counts.sent += 1
                self.inflight += 1
                t = asyncio.create_task(self._one(fresh if req.fresh_conn else keep, req))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            self.load_s += loop.time() - t0
            if tasks:
                _, pending = await asyncio.wait(set(tasks), timeout=a.drain_timeout)
                for t in pending:
                    t.cancel()
                    self.counts.unfinished += 1
                await asyncio.gather(*pending, return_exceptions=True)
        finally:
            for t in list(tasks):
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await keep.close()
            await fresh.close()


# ---- sampling -------------------------------------------------------------------------------------------
def proc_sample(pid: int) -> dict[str, float | None]:
    """RSS (MB) and threads from /proc/<pid>/status, open fds from /proc/<pid>/fd."""
    out: dict[str, float | None] = {"rss_mb": None, "threads": None, "fds": None}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_mb"] = int(line.split()[1]) / 1024
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        pass
    return out


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text: value per metric name, summed over labels (histogram buckets skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        name = name.split("{", 1)[0]
        if name.endswith(("_bucket", "_created")):
            continue
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


FRONTEND_METRICS = {  # column: /metrics name
    "tasks": "turbine_process_asyncio_tasks",
    "connections": "turbine_http_connections",
    "metrics_rss_mb": "process_resident_memory_bytes",
    "server_inflight": "turbine_frontend_inflight_requests",
    "index_blocks": "turbine_router_index_blocks",
    "index_nodes": "turbine_router_index_nodes",
    "blocks_stored": "turbine_router_kv_blocks_stored_total",
    "blocks_removed": "turbine_router_kv_blocks_removed_total",
    "requests_total": "turbine_frontend_requests_total",
}


class Sampler:
    def __init__(self, fleet: System, client: Client, t0: float) -> None:
        self.fleet, self.client, self.t0 = fleet, client, t0
        self.samples: list[dict[str, Any]] = []
        self.phase = "idle"
        self._session: aiohttp.ClientSession | None = None

    async def metrics(self) -> dict[str, float]:
        if self._session is None:  # one connection per scrape: no idle keep-alive left behind
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                                  timeout=aiohttp.ClientTimeout(total=5))
        try:
            async with self._session.get(self.fleet.url + "/metrics") as r:
                return parse_metrics(await r.text()) if r.status == 200 else {}
        except (TimeoutError, aiohttp.ClientError, OSError):
            return {}

    async def take(self, phase: str | None = None) -> dict[str, Any]:
        procs = {p.name: proc_sample(p.popen.pid) for p in self.fleet.procs}  # before the scrape's socket
        m = await self.metrics()
        c = self.client.counts
        s: dict[str, Any] = {"t_s": round(time.monotonic() - self.t0, 2), "phase": phase or self.phase,
                             "sent": c.sent, "ok": c.ok, "disconnected": c.disconnected, "rejected": c.rejected,
                             "failed": c.failed + c.unfinished, "shed": c.shed, "client_inflight": self.client.inflight}
        for name, ps in procs.items():
            for k, v in ps.items():
                s[f"{name}_{k}"] = v
        for col, name in FRONTEND_METRICS.items():
            v = m.get(name)
            s[f"frontend_{col}"] = None if v is None else (v / 2**20 if col == "metrics_rss_mb" else v)
        self.samples.append(s)
        return s

    async def run(self, interval: float) -> None:
        """A sample every ``interval`` seconds on a fixed schedule, until cancelled."""
        nxt = time.monotonic()
        while True:
            await self.take()
            nxt += interval
            await asyncio.sleep(max(0.0, nxt - time.monotonic()))

    async def idle_checkpoint(self, label: str, wait_s: float) -> dict[str, Any]:
        """Wait ``wait_s`` with no load, then the median of IDLE_SAMPLES samples 1 s apart."""
        await asyncio.sleep(wait_s)
        taken = []
        for i in range(IDLE_SAMPLES):
            if i:
                await asyncio.sleep(1.0)
            taken.append(await self.take(label))
        out: dict[str, Any] = {"t_s": taken[-1]["t_s"]}
        for k, v in taken[0].items():
            if isinstance(v, (int, float)) and k != "t_s":
                vals = [s[k] for s in taken if s.get(k) is not None]
                out[k] = statistics.median(vals) if vals else None
        return out

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


# ---- the run ---------------------------------------------------------------------------------------------
@dataclass
class Run:
    samples: list[dict[str, Any]]
    idle: dict[str, dict[str, Any]]  # start, warm (after warm-up), end
    t_resume: float  # when the measured (post-warm-up) load began, s since start
    index_full_s: float | None
    counts: Counts
    load_s: float
    cpu_pct: dict[str, float | None]
    model: str
    pids: dict[str, int]


async def soak(a: argparse.Namespace, fleet: System) -> Run:
    t0 = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(force_close=True)) as s:
        model = await first_model(s, fleet.url)
    client = Client(a, fleet.url, Workload(a, model))
    sampler = Sampler(fleet, client, t0)
    capacity = a.workers * a.num_gpu_blocks
    idle: dict[str, dict[str, Any]] = {}
    meter = CpuMeter([Target(p.name, p.popen.pid) for p in fleet.procs] + [Target("client", os.getpid())])
    idle["start"] = await sampler.idle_checkpoint("idle-start", 1.0)
    meter.start()
    wall0 = time.monotonic()
    periodic = asyncio.create_task(sampler.run(a.interval))
    full_at: list[float] = []

    def index_full() -> bool:
        if not full_at:
            last = next((x for x in reversed(sampler.samples) if x.get("frontend_index_blocks") is not None), None)
            if last and last["frontend_index_blocks"] >= INDEX_FULL * capacity:
                full_at.append(last["t_s"])
        return bool(full_at)

    warm_s, max_warm_s = a.warmup_frac * a.duration, max(a.warmup_frac, MAX_WARMUP_FRAC) * a.duration
    try:
        sampler.phase = "warm-up"
        start = time.monotonic()
        await client.drive(lambda: (el := time.monotonic() - start) >= max_warm_s or (el >= warm_s and index_full()))
        sampler.phase = "idle"
        idle["warm"] = await sampler.idle_checkpoint("idle-warm", a.idle_wait)
        t_resume = time.monotonic() - t0
        remaining = max(a.interval, a.duration - client.load_s)
        sampler.phase = "load"
        start = time.monotonic()
        await client.drive(lambda: time.monotonic() - start >= remaining)
        index_full()
        sampler.phase = "idle"
        idle["end"] = await sampler.idle_checkpoint("idle-end", a.idle_wait)
    finally:
        periodic.cancel()
        await asyncio.gather(periodic, return_exceptions=True)
        await sampler.close()
    used = meter.stop()
    wall = time.monotonic() - wall0
    cpu = {k: None if v is None else 100 * v / wall for k, v in used.items()}
    return Run(sampler.samples, idle, t_resume, full_at[0] if full_at else None, client.counts, client.load_s, cpu,
               model, {p.name: p.popen.pid for p in fleet.procs})


# ---- verdict ------------------------------------------------------------------------------------------------
def slope_per_h(ts: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys over ts (seconds), per hour."""
    if len(ts) < 3:
        return None
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    return None if den == 0 else 3600 * sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / den


@dataclass
class ProcVerdict:
    name: str
    pid: int
    cpu_pct: float | None
    rss: dict[str, float | None]  # idle start, first/last/median after warm-up, growth, slope
    fds: tuple[Any, Any, Any]  # idle start, after warm-up, end
    tasks: tuple[Any, Any, Any] | None
    conns: tuple[Any, Any, Any] | None
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def judge(run: Run, a: argparse.Namespace) -> tuple[list[ProcVerdict], list[str]]:
    """Per-process verdicts, and the problems of the request counts."""
    post = [s for s in run.samples if s["phase"] == "load" and s["t_s"] >= run.t_resume]
    out = []
    for name, pid in run.pids.items():
        pts = [(s["t_s"], s[f"{name}_rss_mb"]) for s in post if s.get(f"{name}_rss_mb") is not None]
        ts, ys = [t for t, _ in pts], [y for _, y in pts]
        slope = slope_per_h(ts, ys)
        growth = ys[-1] - ys[0] if ys else None
        rss = {"idle_start": run.idle["start"].get(f"{name}_rss_mb"), "first": ys[0] if ys else None,
               "last": ys[-1] if ys else None, "median": statistics.median(ys) if ys else None,
               "growth": growth, "slope": slope}
        problems = []
        if slope is None or growth is None:
            problems.append(f"RSS: {len(ys)} samples after warm-up, need 3")
        elif slope > a.max_rss_slope and growth > a.rss_noise_mb:
            problems.append(f"RSS slope {slope:.1f} MB/h > {a.max_rss_slope:g} (growth {growth:.1f} MB)")

        def triple(col: str) -> tuple[Any, Any, Any]:
            return tuple(run.idle[k].get(col) for k in ("start", "warm", "end"))  # type: ignore[return-value]

        def back(label: str, vals: tuple[Any, Any, Any], margin: float, problems: list[str] = problems) -> None:
            _, warm, end = vals
            if warm is None or end is None:
                problems.append(f"idle {label}: not measured")
            elif end > warm + margin:
                problems.append(f"idle {label} {end:g} > {warm:g} + {margin:g}")

        fds = triple(f"{name}_fds")
        back("fds", fds, a.fd_margin)
        tasks = conns = None
        if name == "frontend":
            tasks, conns = triple("frontend_tasks"), triple("frontend_connections")
            back("tasks", tasks, a.task_margin)
            back("connections", conns, a.conn_margin)
        out.append(ProcVerdict(name, pid, run.cpu_pct.get(name), rss, fds, tasks, conns, problems))
    c = run.counts
    bad = c.failed + c.unfinished + c.shed
    req_problems = []
    if c.sent == 0:
        req_problems.append("no requests sent")
    elif bad > a.max_error_rate * c.sent:
        req_problems.append(f"{bad} of {c.sent} requests failed, were cut off or not sent "
                            f"(> {100 * a.max_error_rate:g}%)")
    return out, req_problems


# ---- output ------------------------------------------------------------------------------------------------
def _f(v: Any, d: int = 1) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def _t(vals: tuple[Any, Any, Any] | None) -> str:
    return "-" if vals is None else " / ".join("-" if v is None else f"{v:g}" for v in vals)


HEAD = ["process", "CPU %", "RSS MB idle start", "RSS MB warm → last", "RSS MB median", "growth MB", "slope MB/h",
        "fds idle start / warm / end", "tasks idle start / warm / end", "conns idle start / warm / end", "verdict"]


def table(verdicts: list[ProcVerdict], req_problems: list[str], run: Run, *, markdown: bool) -> str:
    rows = []
    for v in verdicts:
        r = v.rss
        rows.append([v.name, _f(v.cpu_pct), _f(r["idle_start"]), f"{_f(r['first'])} → {_f(r['last'])}",
                     _f(r["median"]), _f(r["growth"]), _f(r["slope"]), _t(v.fds), _t(v.tasks), _t(v.conns),
                     "PASS" if v.ok else "FAIL: " + "; ".join(v.problems)])
    rows.append(["requests (client)", _f(run.cpu_pct.get("client")), "-", "-", "-", "-", "-", "-", "-", "-",
                 "PASS" if not req_problems else "FAIL: " + "; ".join(req_problems)])
    return render_table(HEAD, rows, markdown=markdown)


def summary_lines(run: Run, a: argparse.Namespace) -> list[str]:
    c = run.counts
    post = [s for s in run.samples if s["phase"] == "load" and s["t_s"] >= run.t_resume]
    loaded = [s for s in run.samples if s["phase"] in ("warm-up", "load")]

    def med(col: str, rows: list[dict[str, Any]]) -> str:
        vals = [s[col] for s in rows if s.get(col) is not None]
        return _f(statistics.median(vals), 0) if vals else "-"

    idx = [s["frontend_index_blocks"] for s in run.samples if s.get("frontend_index_blocks") is not None]
    removed = [s["frontend_blocks_removed"] for s in post if s.get("frontend_blocks_removed") is not None]
    full = (f"full (>= {100 * INDEX_FULL:.0f}% of {a.workers} x {a.num_gpu_blocks} blocks) at {run.index_full_s:.0f} s"
            if run.index_full_s is not None else f"never reached {100 * INDEX_FULL:.0f}% of {a.workers * a.num_gpu_blocks}")
    errs = "; ".join(f"{n}x {e}" for e, n in c.errors.most_common(3))
    return [
        (f"requests: {c.sent} sent in {run.load_s:.0f} s of load ({c.sent / max(run.load_s, 1e-9):.1f} req/s): "
         f"{c.ok} ok, {c.disconnected} disconnected on purpose, {c.rejected} bad ones refused with 4xx, "
         f"{c.failed} failed, {c.unfinished} unfinished, {c.shed} not sent (client cap)" + (f"; errors: {errs}" if errs else "")),
        (f"router index: {full}; max {max(idx) if idx else 0:,.0f} (worker, block) pairs, "
         f"{(removed[-1] - removed[0]) if len(removed) > 1 else 0:,.0f} blocks removed after the warm-up"),
        (f"under load (medians): frontend {med('frontend_tasks', loaded)} asyncio tasks, "
         f"{med('frontend_connections', loaded)} HTTP connections, {med('frontend_server_inflight', loaded)} requests in flight; "
         f"measured window from {run.t_resume:.0f} s, {len(post)} samples"),
    ]


def write_raw(run: Run, verdicts: list[ProcVerdict], req_problems: list[str], a: argparse.Namespace,
              work: Path) -> tuple[Path, Path]:
    cols: list[str] = []
    for s in run.samples:
        cols += [k for k in s if k not in cols]
    csv_path, json_path = work / "soak_samples.csv", work / "soak.json"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(run.samples)
    c = run.counts
    json_path.write_text(json.dumps({
        "args": {k: v for k, v in vars(a).items()}, "model": run.model, "pids": run.pids,
        "t_resume_s": run.t_resume, "index_full_s": run.index_full_s, "load_s": run.load_s, "cpu_pct": run.cpu_pct,
        "requests": {"sent": c.sent, "ok": c.ok, "disconnected": c.disconnected, "rejected": c.rejected,
                     "failed": c.failed, "unfinished": c.unfinished, "shed": c.shed, "errors": dict(c.errors)},
        "idle": run.idle,
        "verdict": {"pass": all(v.ok for v in verdicts) and not req_problems,
                    "processes": {v.name: {"pass": v.ok, "problems": v.problems, "rss": v.rss, "fds": v.fds,
                                           "tasks": v.tasks, "connections": v.conns, "cpu_pct": v.cpu_pct}
                                  for v in verdicts},
                    "requests": {"pass": not req_problems, "problems": req_problems}},
        "samples": run.samples,
    }, indent=1, default=str))
    return csv_path, json_path


def plot(run: Run, path: Path) -> str | None:
    """RSS, fds and frontend tasks over time, warm-up shaded; None, or why there is no plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plotting needs matplotlib"
    names = list(run.pids)
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    ts = [s["t_s"] / 60 for s in run.samples]
    for name in names:
        axes[0].plot(ts, [s.get(f"{name}_rss_mb") for s in run.samples], label=name)
        axes[1].plot(ts, [s.get(f"{name}_fds") for s in run.samples], label=name)
    axes[2].plot(ts, [s.get("frontend_tasks") for s in run.samples], label="frontend asyncio tasks")
    axes[2].plot(ts, [s.get("frontend_connections") for s in run.samples], label="frontend HTTP connections")
    ax2 = axes[2].twinx()
    ax2.plot(ts, [s.get("frontend_index_blocks") for s in run.samples], color="C7", ls="--", label="index blocks")
    ax2.set_ylabel("router index (blocks)")
    for ax, lab in zip(axes, ("RSS (MB)", "open fds", "count")):
        ax.set_ylabel(lab)
        ax.axvspan(0, run.t_resume / 60, color="0.9", zorder=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    ax2.legend(fontsize=7, loc="upper right")
    axes[2].set_xlabel("minutes (shaded: warm-up)")
    axes[0].set_title("soak: RSS, fds and tasks sampled under load (idle checkpoints after warm-up and at the end)",
                      fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def thresholds(a: argparse.Namespace) -> str:
    return (f"RSS slope after warm-up <= {a.max_rss_slope:g} MB/h (or growth <= {a.rss_noise_mb:g} MB); at the end, "
            f"idle fds <= after-warm-up idle + {a.fd_margin:g}, frontend idle asyncio tasks <= + {a.task_margin:g}, "
            f"idle connections <= + {a.conn_margin:g}; unexpected request failures <= {100 * a.max_error_rate:g}%")


def append_results(a: argparse.Namespace, text_table: str, summary: list[str], ok: bool, raw: list[Path],
                   plot_rel: str | None, wall: float) -> None:
    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [
        "", f"## soak — {when}", "",
        f"- machine: {machine(load_average=True)} (when the run ended); the fleet and the client share these cores",
        (f"- fleet: `turbine frontend` + {a.workers} x `turbine worker --engine mock` (separate processes, file "
         f"discovery), block size {a.block_size}, {a.num_gpu_blocks} KV blocks/worker, speedup {a.speedup_ratio:g}"),
        (f"- load: {a.duration / 60:g} min open loop at {a.rate:g} req/s (Poisson), {a.min_tokens}-{a.max_tokens} "
         f"output tokens; {100 * a.shared_frac:g}% on {a.prefixes} shared ~{a.prefix_words}-word prefixes, "
         f"{100 * a.continue_frac:g}% continuing a recent prompt, the rest unique; {100 * a.bad_frac:g}% malformed "
         f"(4xx expected), {100 * a.disconnect_frac:g}% disconnected mid-stream or before the first token, "
         f"{100 * a.no_stream_frac:g}% of full ones not streamed, {100 * a.completions_frac:g}% /v1/completions, "
         f"{100 * a.fresh_conn_frac:g}% on fresh connections; seed {a.seed}"),
        (f"- sampling every {a.interval:g} s: RSS, fds (/proc), frontend asyncio tasks and connections (/metrics); "
         f"warm-up {100 * a.warmup_frac:g}% of the run or until the router index is full; idle values are medians "
         f"of {IDLE_SAMPLES} samples {a.idle_wait:g} s after the load stops (after warm-up and at the end)"),
        f"- thresholds: {thresholds(a)}",
        *[f"- {s}" for s in summary],
        f"- verdict: {'PASS' if ok else 'FAIL'}; script wall time {wall / 60:.1f} min; raw samples: "
        + ", ".join(str(p) for p in raw),
        *[f"- note: {n}" for n in a.note], *([f"- plot: {plot_rel}"] if plot_rel else []), "",
        text_table, "",
    ]
    append_atomically(Path(a.results), "\n".join(lines), RESULTS_HEADER)


# ---- main ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--duration", type=float, default=1800.0, help="seconds of load (the idle pauses come on top)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--warmup-frac", type=float, default=0.2,
                   help="the first part of the load not judged (extended until the index is full, up to half)")
    p.add_argument("--idle-wait", type=float, default=5.0, help="seconds idle before an idle checkpoint")
    p.add_argument("--workers", type=int, default=2, help="worker processes (one mocker worker each)")
    p.add_argument("--rate", type=float, default=8.0, help="requests/s (Poisson arrivals)")
    p.add_argument("--min-tokens", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prefixes", type=int, default=16, help="shared system prompts")
    p.add_argument("--prefix-words", type=int, default=200)
    p.add_argument("--suffix-words", type=int, nargs=2, default=[50, 300], metavar=("MIN", "MAX"))
    p.add_argument("--shared-frac", type=float, default=0.5)
    p.add_argument("--continue-frac", type=float, default=0.2)
    p.add_argument("--bad-frac", type=float, default=0.1)
    p.add_argument("--disconnect-frac", type=float, default=0.15)
    p.add_argument("--no-stream-frac", type=float, default=0.3, help="of the requests read to the end")
    p.add_argument("--completions-frac", type=float, default=0.25)
    p.add_argument("--fresh-conn-frac", type=float, default=0.1)
    p.add_argument("--max-inflight", type=int, default=256, help="client-side cap on outstanding requests")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--drain-timeout", type=float, default=60.0, help="wait for in-flight requests when pausing")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--num-gpu-blocks", type=int, default=1024,
                   help="KV blocks per worker: small, so caches (and the router index) fill and churn early")
    p.add_argument("--speedup-ratio", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-rss-slope", type=float, default=20.0, metavar="MB_PER_H")
    p.add_argument("--rss-noise-mb", type=float, default=4.0, help="growth below this passes whatever the slope")
    p.add_argument("--fd-margin", type=float, default=2.0)
    p.add_argument("--task-margin", type=float, default=2.0)
    p.add_argument("--conn-margin", type=float, default=0.0)
    p.add_argument("--max-error-rate", type=float, default=0.001)
    p.add_argument("--model", default=None, help="model dir (default: Turbine's tiny model)")
    p.add_argument("--ready-timeout", type=float, default=120.0)
    p.add_argument("--workdir", default="/tmp/turbine-soak")
    p.add_argument("--plot", default=None, help="PNG (default: bench/plots/soak.png, or WORKDIR/soak.png with --no-record)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    p.add_argument("--no-record", "--no-results", dest="no_record", action="store_true",
                   help="do not append to RESULTS.md")
    p.add_argument("--note", action="append", default=[], help="a note for RESULTS.md (repeatable)")
    a = p.parse_args(argv)
    fracs = (a.warmup_frac, a.shared_frac, a.continue_frac, a.bad_frac, a.disconnect_frac, a.no_stream_frac,
             a.completions_frac, a.fresh_conn_frac, a.max_error_rate)
    if not all(0 <= f <= 1 for f in fracs) or a.shared_frac + a.continue_frac > 1 or a.bad_frac + a.disconnect_frac > 1:
        p.error("fractions must lie in [0, 1], shared + continue <= 1 and bad + disconnect <= 1")
    if not (a.duration > 0 and a.interval > 0 and a.rate > 0) or a.workers < 1 or a.idle_wait < 0:
        p.error("--duration, --interval and --rate must be > 0, --workers >= 1, --idle-wait >= 0")
    if not 1 <= a.min_tokens <= a.max_tokens or not 1 <= a.suffix_words[0] <= a.suffix_words[1]:
        p.error("need 1 <= --min-tokens <= --max-tokens and 1 <= MIN <= MAX of --suffix-words")
    if a.plot is None:
        a.plot = str(Path(a.workdir) / "soak.png") if a.no_record else str(REPO / "bench" / "plots" / "soak.png")
    return a


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    t_start = time.perf_counter()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        fleet = start_fleet(a, work)
    except (RuntimeError, OSError) as e:
        print(f"[bench] the fleet did not start: {e}", file=sys.stderr)
        return 2
    print(f"[bench] soak: {a.duration:g} s at {a.rate:g} req/s, {a.workers} workers, a sample every "
          f"{a.interval:g} s; logs in {work / 'logs'}", flush=True)
    try:
        run = asyncio.run(soak(a, fleet))
    finally:
        stop_all(fleet.procs)
    verdicts, req_problems = judge(run, a)
    ok = all(v.ok for v in verdicts) and not req_problems
    summary = summary_lines(run, a)
    raw = list(write_raw(run, verdicts, req_problems, a, work))
    print()
    print(table(verdicts, req_problems, run, markdown=False))
    for line in summary:
        print(line)
    print(f"thresholds: {thresholds(a)}")
    plot_rel = None
    if not a.no_plot:
        if why := plot(run, Path(a.plot)):
            print(f"[bench] no plot: {why}", file=sys.stderr)
        else:
            plot_rel = os.path.relpath(a.plot, REPO)
            print(f"[bench] plot: {a.plot}")
    print(f"[bench] samples: {raw[0]}, {raw[1]}")
    print(f"verdict: {'PASS' if ok else 'FAIL'}")
    if not a.no_record:
        append_results(a, table(verdicts, req_problems, run, markdown=True), summary, ok, raw, plot_rel,
                       time.perf_counter() - t_start)
        print(f"[bench] appended to {a.results}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
