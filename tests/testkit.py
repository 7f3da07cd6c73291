"""Helpers shared by the test suites: in-thread servers and multi-process deployments."""
from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp


class ServerThread:
    """An all-in-one Turbine deployment on its own event loop thread, for sync test clients."""

    def __init__(self, model_dir: Path, *, workers: int = 2, speedup: float = 50.0, **mocker_kw: object):
        self.model_dir = model_dir
        self.workers = workers
        self.speedup = speedup
        self.mocker_kw = mocker_kw
        from turbine.frontend.service import FrontendConfig

        frontend_kw = {k: mocker_kw.pop(k) for k in list(mocker_kw) if k in FrontendConfig.__dataclass_fields__}
        self.frontend = FrontendConfig(port=0, **frontend_kw)  # type: ignore[arg-type]
        self.engine = mocker_kw.pop("engine", "mock")
        self.prefill_workers = int(mocker_kw.pop("prefill_workers", 0))  # type: ignore[call-overload]
        self.decode_workers = int(mocker_kw.pop("decode_workers", 0))  # type: ignore[call-overload]
        self.kv_transfer = str(mocker_kw.pop("kv_transfer", "auto"))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.dep = None

    def __enter__(self) -> ServerThread:
        from turbine.engine.builtin_config import BuiltinConfig
        from turbine.launch import WorkerOptions, start_all_in_one
        from turbine.mocker.engine import MockerConfig

        self.thread.start()
        if self.engine == "builtin":
            opts = WorkerOptions(model_dir=self.model_dir, model_name="tiny", engine="builtin",
                                 builtin=BuiltinConfig(device="cpu", **self.mocker_kw),  # type: ignore[arg-type]
                                 kv_transfer=self.kv_transfer)
        else:
            opts = WorkerOptions(model_dir=self.model_dir, model_name="tiny",
                                 mocker=MockerConfig(speedup_ratio=self.speedup, **self.mocker_kw))
        fut = asyncio.run_coroutine_threadsafe(
            start_all_in_one(opts, workers=self.workers, frontend=self.frontend, prefill_workers=self.prefill_workers,
                             decode_workers=self.decode_workers), self.loop)
        self.dep = fut.result(timeout=60)
        return self

    @property
    def url(self) -> str:
        assert self.dep is not None and self.dep.frontend is not None
        return self.dep.frontend.url

    def call(self, fn):  # type: ignore[no-untyped-def]
        """Run a plain function on the server's loop thread (to read state safely)."""
        async def run():  # type: ignore[no-untyped-def]
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=10)

    def __exit__(self, *exc: object) -> None:
        if self.dep is not None:
            fut = asyncio.run_coroutine_threadsafe(self.dep.stop(grace_s=0), self.loop)
            try:
                fut.result(timeout=30)
            except TimeoutError:
                _dump_stacks(self.loop)  # where shutdown hangs: every thread, and the loop's tasks
                raise
        pending = asyncio.run_coroutine_threadsafe(_pending_tasks(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()
        assert not pending, f"tasks left running after shutdown: {pending}"


def _dump_stacks(loop: asyncio.AbstractEventLoop) -> None:
    import faulthandler
    import io

    faulthandler.dump_traceback(sys.stderr, all_threads=True)
    for t in list(asyncio.all_tasks(loop)):  # read from another thread: a best-effort picture
        buf = io.StringIO()
        t.print_stack(file=buf)
        print(buf.getvalue(), file=sys.stderr)


async def _pending_tasks() -> list[str]:
    await asyncio.sleep(0.05)
    me = asyncio.current_task()
    return [repr(t.get_coro()) for t in asyncio.all_tasks() if t is not me and not t.done()]


def metric_values(text: str, name: str) -> list[float]:
    """All sample values of one Prometheus series family in /metrics text."""
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            out.append(float(line.rsplit(" ", 1)[1]))
    return out


# --- multi-process deployments ---------------------------------------------------------------
_EPHEMERAL = (32768, 60999)  # Linux's default ip_local_port_range


def free_port() -> int:
    """A port free now, below the ephemeral range: a port the kernel hands out for bind(0) could
    be handed to another process (a vLLM engine's ZMQ sockets) before ours binds it."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = _EPHEMERAL[0]
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(url: str) -> dict:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return json.loads(r.read())
    except OSError:
        return {}


def wait_workers(url: str, n: int, timeout: float) -> float:
    """Until ``tiny`` has ``n`` workers and can serve (its tokenizer loaded: else requests get 503)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        h = health(url)
        if len(h.get("models", {}).get("tiny", [])) == n and "tiny" not in h.get("loading", []):
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"expected {n} workers within {timeout} s, health={health(url)}")


def spawn(procs: list, *args: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "turbine", "--log-level", "WARNING", *args],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    procs.append(p)
    return p


def load_bench(name: str, module_name: str | None = None):  # type: ignore[no-untyped-def]
    """Import ``bench/<name>.py`` (not a package) as a module, registered in sys.modules."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(module_name or f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


# --- closed-loop streaming load that counts every failure ----------------------------------------
MAX_TOKENS = 40  # tokens every Load request asks for (ignore_eos)


@dataclass
class LoadStats:
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    retried: int = 0


def assert_clean(stats: LoadStats, at_least: int) -> None:
    """Every stream completed with all its tokens, and at least ``at_least`` of them."""
    assert not stats.failed, stats.failed[:5]
    assert not stats.truncated, stats.truncated[:5]
    assert stats.ok >= at_least, stats


class Load:
    """``concurrency`` clients sending streaming chat requests until stopped, on their own loop."""

    def __init__(self, url: str, concurrency: int = 6, prompt_words: int = 6) -> None:
        self.url = url
        self.concurrency = concurrency
        self.prompt_words = prompt_words
        self.stats = LoadStats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> LoadStats:
        self._stop.set()
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the load did not finish within 60 s"
        return self.stats

    def wait_ok(self, n: int, timeout: float = 20.0) -> None:
        target = self.stats.ok + n
        deadline = time.monotonic() + timeout
        while self.stats.ok < target:
            assert time.monotonic() < deadline, f"load stalled: {self.stats}"
            time.sleep(0.05)

    async def _main(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            await asyncio.gather(*(self._client(session, i) for i in range(self.concurrency)))

    async def _client(self, session: aiohttp.ClientSession, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            await self._one(session, f"client {i} request {n}: " + "tell me a story " * (self.prompt_words // 4))

    async def _one(self, session: aiohttp.ClientSession, prompt: str) -> None:
        body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        for _ in range(20):
            got_bytes = False
            try:
                async with session.post(self.url + "/v1/chat/completions", json=body) as resp:
                    got_bytes = True
                    if resp.status != 200:
                        self.stats.failed.append(f"HTTP {resp.status}: {(await resp.text())[:200]}")
                        return
                    chunks, finish, usage, done = 0, None, None, False
                    async for line in resp.content:
                        line = line.strip()
                        if not line.startswith(b"data: "):
                            continue
                        if line == b"data: [DONE]":
                            done = True
                            continue
                        ev = json.loads(line[6:])
                        if "error" in ev:
                            self.stats.failed.append(f"in-band error: {ev['error']}")
                            return
                        for c in ev.get("choices", []):
                            if c["delta"].get("content"):
                                chunks += 1
                            finish = c.get("finish_reason") or finish
                        usage = ev.get("usage") or usage
                    if not done or finish != "length" or not usage or usage["completion_tokens"] != MAX_TOKENS:
                        self.stats.truncated.append(f"done={done} finish={finish} usage={usage} chunks={chunks}")
                    else:
                        self.stats.ok += 1
                    return
            except (aiohttp.ClientConnectionError, ConnectionError) as e:
                if got_bytes:
                    self.stats.failed.append(f"{type(e).__name__}: {e}")
                    return
                self.stats.retried += 1  # never reached a server that took it
                await asyncio.sleep(0.05)
        self.stats.failed.append("connection refused 20 times")
