"""A fleet across hosts (network namespaces joined by a bridge, tests/multihost/hosts.py), measured.

    etcd on h0 · frontend on h1 · one worker process on h2 and one on h3 (mock engine)
    this script on the bridge: it drives the frontend, watches etcd and pulls the faults

Measures, with etcd discovery at its defaults (lease TTL 5 s, frontend stall timeout 10 s):

- etcd put latency, put -> watch event latency, lease keep-alive latency (p50/p99), from this
  host to etcd's across the bridge;
- registration-to-routable: a worker's key appears in etcd -> the frontend lists it (and
  process start -> routable, for scale);
- a SIGKILLed worker: kill -> gone from the frontend's discovery; requests failed meanwhile;
- a cut host (its link down, no FIN): cut -> gone; requests failed meanwhile (its streams move
  after the stall timeout);
- etcd itself SIGKILLed and restarted: requests failed meanwhile (serving does not need etcd).

A steady load runs through every fault: ``--clients`` streaming requests of ``--max-tokens``
tokens at a time, each counted as failed unless it ends with all its tokens. Root only (network
namespaces); etcd from Debian's etcd-server (installed on demand, as the tests do).

    sudo python bench/multihost_bench.py [--reps 3] [--no-record]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "multihost"), str(REPO / "bench")]

from etcdkit import EtcdServer, etcd_binary  # noqa: E402
from hosts import Hosts, unavailable  # noqa: E402

ETCD, FRONTEND, WORKER_A, WORKER_B = range(4)
TOKEN = "multihost-bench-token"
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


class Load:
    """``n`` client threads, each streaming one completion after another; counts outcomes."""

    def __init__(self, url: str, n: int, max_tokens: int) -> None:
        self.url, self.n, self.max_tokens = url, n, max_tokens
        self.ok = self.failed = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def _run(self, i: int) -> None:
        k = 0
        while not self._stop.is_set():
            k += 1
            body = {"model": "tiny", "prompt": f"client {i} request {k}", "max_tokens": self.max_tokens,
                    "stream": True, "stream_options": {"include_usage": True}}
            req = urllib.request.Request(self.url + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"content-type": "application/json"})
            usage = None
            try:
                with _direct.open(req, timeout=120) as r:
                    for line in r:
                        if line.startswith(b"data: {"):
                            usage = json.loads(line[6:]).get("usage") or usage
                if usage and usage["completion_tokens"] == self.max_tokens:
                    self.ok += 1
                else:
                    self.failed += 1
                    self.errors.append(f"short stream: {usage}")
            except Exception as e:  # noqa: BLE001 - a failed request is what we count
                self.failed += 1
                self.errors.append(repr(e)[:200])


class Bench:
    def __init__(self, a: argparse.Namespace, hosts: Hosts, etcd: EtcdServer, work: Path, model: Path) -> None:
        self.a, self.hosts, self.etcd, self.work, self.model = a, hosts, etcd, work, model
        self.discovery = f"etcd://{hosts.addr(ETCD)}:2379"
        self.url = f"http://{hosts.addr(FRONTEND)}:8000"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, host: int, name: str, *args: str) -> subprocess.Popen[bytes]:
        with open(self.work / f"{name}.log", "ab") as log:
            p = subprocess.Popen([*self.hosts.cmd(host), sys.executable, "-m", "turbine", "--log-level", "WARNING",
                                  *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = p
        return p

    def common(self) -> list[str]:
        return ["--discovery", self.discovery, "--discovery-ttl", str(self.a.ttl), "--cluster-token", TOKEN]

    def start_frontend(self) -> None:
        self.spawn(FRONTEND, "frontend", "frontend", *self.common(), "--host", self.hosts.addr(FRONTEND),
                   "--port", "8000", "--stall-timeout", str(self.a.stall_timeout))

    def start_worker(self, host: int) -> subprocess.Popen[bytes]:
        return self.spawn(host, f"worker-h{host}", "worker", *self.common(), "--advertise-host", self.hosts.addr(host),
                          "--engine", "mock", "--model", str(self.model), "--model-name", "tiny",
                          "--speedup-ratio", str(self.a.speedup))

    def workers(self) -> dict[str, str]:
        try:
            with _direct.open(self.url + "/health", timeout=2) as r:
                return {w: v["address"] for w, v in json.loads(r.read()).get("workers", {}).items()}
        except OSError:
            return {}

    def wait(self, cond, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if cond():
                return time.monotonic()
            time.sleep(0.005)
        raise RuntimeError(f"{what} within {timeout:g} s (logs in {self.work})")

    def on_host(self, host: int) -> list[str]:
        return [w for w, a in self.workers().items() if f"//{self.hosts.addr(host)}:" in a]

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# --- etcd latencies ---------------------------------------------------------------------------
async def etcd_latencies(endpoint: tuple[str, int], n: int) -> dict[str, list[float]]:
    import aetcd

    host, port = endpoint
    writer, watcher = aetcd.Client(host=host, port=port, timeout=5), aetcd.Client(host=host, port=port, timeout=5)
    prefix = b"/bench/latency/"
    sent: dict[bytes, float] = {}
    seen: dict[bytes, float] = {}
    done = asyncio.Event()
    try:
        watch = await watcher.watch_prefix(prefix)

        async def follow() -> None:
            async for ev in watch:
                seen[bytes(ev.kv.key)] = time.perf_counter()
                if len(seen) == n:
                    done.set()

        task = asyncio.create_task(follow())
        puts = []
        for i in range(n):
            key = prefix + b"%06d" % i
            t0 = time.perf_counter()
            sent[key] = t0
            await writer.put(key, b"x" * 200)
            puts.append(time.perf_counter() - t0)
        await asyncio.wait_for(done.wait(), 30)
        watches = [seen[k] - sent[k] for k in sent]
        lease = await writer.lease(30)
        keepalives = []
        for _ in range(n // 4):
            t0 = time.perf_counter()
            await writer.refresh_lease(lease.id)
            keepalives.append(time.perf_counter() - t0)
        await writer.revoke_lease(lease.id)
        await writer.delete_prefix(prefix)
        await watch.cancel()
        task.cancel()
        return {"put": puts, "put -> watch event": watches, "lease keep-alive": keepalives}
    finally:
        await writer.close()
        await watcher.close()


# --- faults -----------------------------------------------------------------------------------
def registration(b: Bench, host: int) -> tuple[float, float]:
    """Start a worker on ``host``: (its key in etcd -> routable, process start -> routable)."""
    import aetcd

    before = set(b.workers())

    async def key_seen() -> float:
        client = aetcd.Client(host=b.hosts.addr(ETCD), port=2379, timeout=5)
        try:
            watch = await client.watch_prefix(b"/turbine/instances/")
            started.set()
            async for ev in watch:
                if ev.kind == aetcd.EventKind.PUT and bytes(ev.kv.key).decode().rsplit("/", 1)[1] not in before:
                    t = time.monotonic()
                    await watch.cancel()
                    return t
            raise RuntimeError("watch ended")
        finally:
            await client.close()

    started = threading.Event()
    result: list[float] = []
    th = threading.Thread(target=lambda: result.append(asyncio.run(key_seen())))
    th.start()
    started.wait(10)
    t_spawn = time.monotonic()
    b.start_worker(host)
    t_routable = b.wait(lambda: len(set(b.workers()) - before) == 1, 120, "a new worker routable")
    th.join(30)
    return t_routable - result[0], t_routable - t_spawn


def fault(b: Bench, kind: str) -> dict[str, float]:
    """One fault under load; returns its timings and the load's outcome."""
    a = b.a
    with Load(b.url, a.clients, a.max_tokens) as load:
        time.sleep(2.0)  # streams running on both workers
        out: dict[str, float] = {}
        if kind == "sigkill":
            victim = b.procs[f"worker-h{WORKER_B}"]
            ids = b.on_host(WORKER_B)
            t0 = time.monotonic()
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            out["leave_s"] = b.wait(lambda: not set(ids) & set(b.workers()), 60, "the killed worker leaves") - t0
        elif kind == "cut":
            ids = b.on_host(WORKER_B)
            t0 = time.monotonic()
            b.hosts.cut(WORKER_B)
            try:
                out["leave_s"] = b.wait(lambda: not set(ids) & set(b.workers()), 60, "the cut worker leaves") - t0
                time.sleep(max(0.0, a.stall_timeout + 1 - (time.monotonic() - t0)))  # its streams have moved
            finally:
                b.hosts.restore(WORKER_B)
                t_back = time.monotonic()
            out["cut_s"] = t_back - t0
            out["back_s"] = b.wait(lambda: set(ids) <= set(b.workers()), 60, "the restored worker returns") - t_back
        elif kind == "etcd":
            t0 = time.monotonic()
            b.etcd.kill()
            time.sleep(a.etcd_down)
            b.etcd.start()
            out["etcd_down_s"] = time.monotonic() - t0
            time.sleep(a.ttl + 1)  # leases checked again
            out["workers_after"] = len(b.workers())
        time.sleep(1.0)
    out["ok"], out["failed"] = load.ok, load.failed
    if load.errors:
        print(f"  {kind}: {load.failed} failed, e.g. {load.errors[:2]}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each fault")
    ap.add_argument("--ttl", type=float, default=5.0, help="--discovery-ttl (the default)")
    ap.add_argument("--stall-timeout", type=float, default=10.0, help="the frontend's --stall-timeout (the default)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent streaming clients during the faults")
    ap.add_argument("--max-tokens", type=int, default=150, help="tokens per request of the load")
    ap.add_argument("--speedup", type=float, default=1.0, help="mock workers' --speedup-ratio")
    ap.add_argument("--etcd-down", type=float, default=5.0, help="seconds etcd stays down in the etcd fault")
    ap.add_argument("--latency-samples", type=int, default=1000)
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    a = ap.parse_args()
    why = unavailable()
    if why:
        raise SystemExit(f"multihost_bench: {why}")
    binary, why = etcd_binary()
    if binary is None:
        raise SystemExit(f"multihost_bench: {why}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    t_start = time.monotonic()
    from turbine.model_maker.make_model import make_model

    work = Path(tempfile.mkdtemp(prefix="turbine-multihost-"))
    model = make_model(work / "tiny", preset="tiny")
    rows: list[tuple[str, str, str]] = []
    with Hosts(4) as hosts:
        etcd = EtcdServer(binary, work / "etcd-data", host=hosts.addr(ETCD), client_port=2379, peer_port=2380,
                          prefix_cmd=hosts.cmd(ETCD))
        b = Bench(a, hosts, etcd, work, model)
        try:
            etcd.start()
            lat = asyncio.run(etcd_latencies((hosts.addr(ETCD), 2379), a.latency_samples))
            for name, xs in lat.items():
                ms = [x * 1000 for x in xs]
                rows.append((f"etcd {name} (n={len(ms)})", f"p50 {pct(ms, 50):.2f} ms, p99 {pct(ms, 99):.2f} ms", ""))
            b.start_frontend()
            regs = [registration(b, WORKER_A)]
            regs.append(registration(b, WORKER_B))
            kills, cuts, etcds = [], [], []
            for _ in range(a.reps):
                kills.append(fault(b, "sigkill"))
                regs.append(registration(b, WORKER_B))  # its replacement
            for _ in range(a.reps):
                cuts.append(fault(b, "cut"))
            for _ in range(a.reps):
                etcds.append(fault(b, "etcd"))
        finally:
            b.stop_all()
            etcd.kill()

    def stat(xs: list[float], unit: str = "s") -> str:
        if len(xs) == 1:
            return f"{xs[0]:.2f} {unit}"
        return f"median {statistics.median(xs):.2f} {unit} (min {min(xs):.2f}, max {max(xs):.2f}, n={len(xs)})"

    def failed(rs: list[dict[str, float]]) -> str:
        return f"{sum(int(r['failed']) for r in rs)} of {sum(int(r['ok'] + r['failed']) for r in rs)}"

    rows.append(("registration -> routable (key in etcd -> frontend lists it)", stat([r[0] for r in regs]), ""))
    rows.append(("worker process start -> routable", stat([r[1] for r in regs]), "Python start, engine, register"))
    rows.append(("SIGKILLed worker -> gone from the frontend", stat([r["leave_s"] for r in kills]),
                 f"requests failed: {failed(kills)}"))
    rows.append(("cut host (link down) -> gone from the frontend", stat([r["leave_s"] for r in cuts]),
                 f"requests failed: {failed(cuts)}"))
    rows.append(("cut host: link back -> its worker routable again", stat([r["back_s"] for r in cuts]),
                 f"same process, new lease; link was down {stat([r['cut_s'] for r in cuts])}"))
    rows.append((f"etcd SIGKILLed, down {a.etcd_down:g} s, restarted", stat([r["etcd_down_s"] for r in etcds]),
                 f"requests failed: {failed(etcds)}; workers after: "
                 f"{', '.join(str(int(r['workers_after'])) for r in etcds)}"))
    table = "\n".join(["| measurement | value | notes |", "|---|---|---|",
                       *(f"| {m} | {v} | {n} |" for m, v, n in rows)])
    print("\n" + table)
    if not a.no_record:
        from _procs import RESULTS_HEADER, append_atomically, machine

        text = (f"\n## multihost — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine(load_average=True)}\n\n"
                f"Hosts are network namespaces joined by a Linux bridge (bench/multihost_bench.py): etcd 3.4 "
                f"(Debian) on h0, `turbine frontend` on h1, one `turbine worker --engine mock` process on each of "
                f"h2 and h3, this script on the bridge; `--discovery etcd://`, lease TTL {a.ttl:g} s, frontend "
                f"stall timeout {a.stall_timeout:g} s (the defaults), the fleet's token on both planes. During "
                f"each fault {a.clients} clients stream {a.max_tokens}-token completions back to back (speed-up "
                f"{a.speedup:g}); a request fails unless it ends with all its tokens. {a.reps} repetitions per "
                f"fault; script wall time {(time.monotonic() - t_start) / 60:.1f} min.\n\n{table}\n")
        append_atomically(REPO / "bench" / "RESULTS.md", text, RESULTS_HEADER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
