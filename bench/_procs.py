"""Process handling shared by the bench scripts that start live servers (Turbine, Dynamo 1.6.1).

Every server runs in its own session (process group) with output to a log file, and is stopped
with SIGINT (Dynamo's frontend ignores SIGTERM), then SIGKILL of the whole group after 10 s.
Scripts call `stop_all` in a ``finally`` and turn SIGTERM into ``SystemExit`` so that it runs.

Dynamo 1.6.1 binds its ZMQ event plane on ``0.0.0.0`` (hard-coded), so scripts that start it
re-run themselves in a private network namespace with only loopback (`reexec_in_netns`), as
../shared/anchors/dynamo/run_anchor.sh does.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NETNS_ENV = "TURBINE_BENCH_NETNS"
DYNAMO_MODEL_NAME = "tiny-llama"
DEFAULT_DYNAMO_DIR = os.environ.get("ANCHOR_DIR", "/tmp/dynamo-anchor")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path


@dataclass
class System:
    """One server deployment under test: its processes, URL, tokenizer and CPU targets."""

    label: str
    url: str
    tokenizer: str | None
    procs: list[Proc] = field(default_factory=list)
    extra_urls: list[str] = field(default_factory=list)  # more frontends in front of the same workers

    def pids(self) -> str:
        # "+": count descendants too, in case a server forks helpers
        return ",".join(f"{p.name}={p.popen.pid}+" for p in self.procs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name: str, cmd: list[str], logs: Path, env: dict[str, str] | None = None,
          cwd: Path = REPO) -> Proc:
    """Start ``cmd`` in its own session (process group), output to ``logs/<name>.log``."""
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    with open(log, "wb") as f:
        popen = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True, cwd=cwd)
    print(f"[bench] started {name} pid {popen.pid}: {shlex.join(cmd)}", flush=True)
    return Proc(name, popen, log)


def stop_all(procs: list[Proc]) -> None:
    """SIGINT every process group (Dynamo's frontend ignores SIGTERM), SIGKILL after 10 s."""
    for p in procs:
        if p.popen.poll() is None:
            try:
                os.killpg(p.popen.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"[bench] {p.name} ignored SIGINT; SIGKILL", file=sys.stderr)
        try:  # the whole group: also any helper the process left behind
            os.killpg(p.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        p.popen.wait()


def start_system(sys_: System, cmds: list[tuple[str, list[str]]], logs: Path, workers: int, timeout_s: float,
                 env: dict[str, str] | None = None, cwd: Path = REPO) -> System:
    """Start each ``(name, cmd)`` into ``sys_`` and wait until it serves ``workers`` workers; on
    any failure stop what was started and re-raise."""
    try:
        for name, cmd in cmds:
            sys_.procs.append(start(name, cmd, logs, env, cwd))
        wait_ready(sys_, workers, timeout_s)
    except BaseException:
        stop_all(sys_.procs)
        raise
    return sys_


def fresh_dir(path: Path) -> Path:
    """An empty directory at ``path`` (discovery state of a previous run removed)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=2) as r:
        return json.loads(r.read())


def count_workers(health: object) -> int:
    """Registered workers from /health: Dynamo lists instances, Turbine lists models → workers."""
    if not isinstance(health, dict):
        return 0
    if isinstance(health.get("instances"), list):
        return sum(1 for i in health["instances"] if i.get("endpoint") == "generate")
    if isinstance(health.get("models"), dict):
        return sum(len(w) for w in health["models"].values())
    return 0


def wait_ready(sys_: System, workers: int, timeout_s: float) -> None:
    """Until /health shows ``workers`` workers, a model is listed, and a request succeeds."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        for p in sys_.procs:
            if p.popen.poll() is not None:
                tail = p.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{p.name} exited with {p.popen.returncode} before ready:\n{tail}")
        try:
            n = count_workers(get_json(sys_.url + "/health"))
            models = [m["id"] for m in get_json(sys_.url + "/v1/models")["data"]]  # type: ignore[index]
            if n >= workers and models:
                body = json.dumps({"model": models[0], "max_tokens": 4,
                                   "messages": [{"role": "user", "content": "Hello!"}]}).encode()
                req = urllib.request.Request(sys_.url + "/v1/chat/completions", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=10) as r:
                    if r.status == 200:
                        return
            last = f"{n} workers, models {models}"
        except Exception as e:  # noqa: BLE001 - not up yet: any failure means "retry"
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.25)
    raise RuntimeError(f"{sys_.label} not ready after {timeout_s:.0f} s ({last})")


def prometheus_sums(url: str, prefix: str) -> dict[str, float] | None:
    """Samples of ``url``/metrics whose name starts with ``prefix``, keyed by the name without
    it and summed over labels (histogram buckets skipped); None if unreadable or none match."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        name, _, value = line.rpartition(" ")
        name = name.split("{", 1)[0].removeprefix(prefix)
        if not name.endswith(("_bucket", "_created")):
            try:
                out[name] = out.get(name, 0.0) + float(value)
            except ValueError:
                continue
    return out or None


# ---- Dynamo 1.6.1 ---------------------------------------------------------------------------------
def dynamo_env(kv_dir: Path, venv: Path) -> dict[str, str]:
    """run_anchor.sh's settings: no etcd/NATS (file discovery, TCP request plane, ZMQ events)."""
    env = dict(os.environ)
    env.update(
        DYN_DISCOVERY_BACKEND="file", DYN_FILE_KV=str(kv_dir), DYN_REQUEST_PLANE="tcp",
        DYN_EVENT_PLANE="zmq", DYN_TCP_RPC_HOST="127.0.0.1", DYN_TCP_RESPONSE_STREAM_HOST="127.0.0.1",
        DYN_EVENT_PLANE_HOST="127.0.0.1", DYN_SYSTEM_HOST="127.0.0.1", HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1", DYN_LOG=os.environ.get("DYN_LOG", "warn"), VIRTUAL_ENV=str(venv),
        PATH=f"{venv / 'bin'}:{os.environ.get('PATH', '')}",
    )
    env.pop("PYTHONPATH", None)  # Dynamo's venv must not see this repo's packages
    return env


def dynamo_missing(dynamo_dir: str | Path, model: str | Path | None, no_netns: bool) -> str | None:
    """Why Dynamo cannot run here, or None."""
    py = Path(dynamo_dir) / "venv" / "bin" / "python"
    if not py.exists():
        return (f"no Dynamo venv at {py.parent.parent} (install it with "
                f"/work/shared/anchors/dynamo/setup.sh, or pass --dynamo-dir)")
    model = Path(model) if model else Path(dynamo_dir) / "model"
    if not (model / "tokenizer.json").exists():
        return f"no model at {model} (setup.sh builds it)"
    if os.environ.get(NETNS_ENV) != "1" and not no_netns:
        return "not in a loopback-only network namespace (run as root, or pass --no-netns)"
    return None


def want_netns(no_netns: bool) -> bool:
    """Whether to re-exec in a loopback-only namespace: root, tools present, not already in one."""
    return (not no_netns and os.environ.get(NETNS_ENV) != "1" and os.geteuid() == 0
            and shutil.which("unshare") is not None and shutil.which("ip") is not None)


def reexec_in_netns(argv: list[str]) -> None:
    """Re-run this script in a new network namespace with only loopback up (never returns)."""
    inner = "ip link set lo up && exec \"$0\" \"$@\""
    os.environ[NETNS_ENV] = "1"
    os.execvp("unshare", ["unshare", "--net", "sh", "-c", inner, sys.executable, *argv])


# ---- reporting --------------------------------------------------------------------------------------
def machine(load_average: bool = False) -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = f"{platform.machine()}, {model}, {os.cpu_count()} cores"
    if load_average:
        out += "; load average {:.2f} {:.2f} {:.2f} (1/5/15 min)".format(*os.getloadavg())
    return out


def machine_busy_s() -> float:
    """CPU seconds all cores of this machine have spent busy since boot (/proc/stat: everything
    but idle and iowait); compared with a run's own processes it shows what else was running."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def append_atomically(path: Path, text: str, header: str) -> None:
    """Append ``text`` in one O_APPEND write (other scripts may append concurrently); a new file
    first gets ``header``."""
    data = (("" if path.exists() else header) + text).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


RESULTS_HEADER = ("# Benchmark results\n\nAppended by the scripts in `bench/` (see bench/README.md); "
                  "newest last. Never edit old entries.\n")

__all__ = [
    "DEFAULT_DYNAMO_DIR",
    "DYNAMO_MODEL_NAME",
    "NETNS_ENV",
    "REPO",
    "RESULTS_HEADER",
    "Proc",
    "System",
    "append_atomically",
    "count_workers",
    "dynamo_env",
    "dynamo_missing",
    "free_port",
    "fresh_dir",
    "get_json",
    "machine",
    "machine_busy_s",
    "prometheus_sums",
    "reexec_in_netns",
    "start",
    "start_system",
    "stop_all",
    "wait_ready",
    "want_netns",
]
