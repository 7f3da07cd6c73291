"""Worker processes on this machine: `turbine worker` started and drained by the planner.

Scaling down sends the newest worker SIGTERM. A Turbine worker then leaves discovery, refuses new
requests (the frontend retries them elsewhere), finishes what it runs and exits; the connector
waits up to ``drain_timeout_s`` (plus a grace) before SIGKILL, which it logs as a failure of the
drain. Each child asks the kernel for SIGTERM when the planner's process dies
(PR_SET_PDEATHSIG), so a killed planner leaves no orphan: its workers drain and exit.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("turbine.planner.local")

KILL_GRACE_S = 10.0


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class _Proc:
    pool: str
    proc: asyncio.subprocess.Process
    log_path: Path
    draining: bool = False


def worker_command(pool: str, args: Sequence[str], *, discovery_dir: str | Path) -> list[str]:
    """argv of one `turbine worker` of ``pool`` (``args``: its model/engine options);
    ``discovery_dir``: a directory, or a discovery URL (``etcd://...``, ``file:///...``)."""
    role = {"agg": "agg", "prefill": "prefill", "decode": "decode"}[pool]
    where = ["--discovery", str(discovery_dir)] if "://" in str(discovery_dir) else ["--discovery-dir", str(discovery_dir)]
    return [sys.executable, "-m", "turbine", "worker", *where, "--role", role, *args]


class LocalProcessConnector:
    def __init__(self, commands: dict[str, list[str]], *, drain_timeout_s: float = 30.0,
                 log_dir: str | Path | None = None, env: dict[str, str] | None = None) -> None:
        """``commands[pool]``: argv of one worker process of that pool (see `worker_command`)."""
        self.commands = commands
        self.drain_timeout_s = drain_timeout_s
        self._tmp = tempfile.TemporaryDirectory(prefix="turbine-workers-") if log_dir is None else None
        self.log_dir = Path(log_dir if log_dir is not None else self._tmp.name)  # type: ignore[union-attr]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **(env or {})}
        self._procs: list[_Proc] = []
        self._reapers: set[asyncio.Task[None]] = set()
        self._seq = 0
        self.kills = 0  # drains that ran out of time (each logged)
        self.started = 0
        self.drained = 0

    async def current(self) -> dict[str, int]:
        out = dict.fromkeys(self.commands, 0)
        for p in self._procs:
            if not p.draining and p.proc.returncode is None:
                out[p.pool] += 1
        return out

    def processes(self) -> list[tuple[str, int, bool]]:
        """(pool, pid, draining) of every child still running."""
        return [(p.pool, p.proc.pid, p.draining) for p in self._procs if p.proc.returncode is None]

    async def scale(self, pool: str, replicas: int) -> None:
        if pool not in self.commands:
            raise ValueError(f"no worker command for pool {pool!r}")
        if replicas < 0:
            raise ValueError("replicas must be >= 0")
        self._procs = [p for p in self._procs if p.proc.returncode is None or p.draining]
        live = [p for p in self._procs if p.pool == pool and not p.draining and p.proc.returncode is None]
        for _ in range(replicas - len(live)):
            await self._start(pool)
        for p in reversed(live[replicas:] if replicas < len(live) else []):
            self._drain(p)

    async def _start(self, pool: str) -> None:
        self._seq += 1
        path = self.log_dir / f"{pool}-{self._seq}.log"
        with open(path, "wb") as out:
            proc = await asyncio.create_subprocess_exec(*self.commands[pool], stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=out, stderr=asyncio.subprocess.STDOUT, env=self.env,
                                                        preexec_fn=_die_with_parent)
        self._procs.append(_Proc(pool, proc, path))
        self.started += 1
        log.info("started %s worker pid %d (log %s)", pool, proc.pid, path)

    def _drain(self, p: _Proc) -> None:
        p.draining = True
        with contextlib.suppress(ProcessLookupError):
            p.proc.send_signal(signal.SIGTERM)
        log.info("draining %s worker pid %d", p.pool, p.proc.pid)
        task = asyncio.ensure_future(self._reap(p))
        self._reapers.add(task)
        task.add_done_callback(self._reapers.discard)

    async def _reap(self, p: _Proc) -> None:
        try:
            async with asyncio.timeout(self.drain_timeout_s + KILL_GRACE_S):
                await p.proc.wait()
            self.drained += 1
            log.info("%s worker pid %d drained and exited (%s)", p.pool, p.proc.pid, p.proc.returncode)
        except TimeoutError:
            self.kills += 1
            log.error("%s worker pid %d still running %.0f s after SIGTERM: killed (its log: %s)", p.pool,
                      p.proc.pid, self.drain_timeout_s + KILL_GRACE_S, p.log_path)
            with contextlib.suppress(ProcessLookupError):
                p.proc.kill()
            await p.proc.wait()
        finally:
            with contextlib.suppress(ValueError):
                self._procs.remove(p)

    async def wait_drained(self, timeout_s: float) -> None:
        """Until every draining worker has exited."""
        if self._reapers:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*list(self._reapers), return_exceptions=True)

    async def close(self) -> None:
        for p in list(self._procs):
            if not p.draining and p.proc.returncode is None:
                self._drain(p)
        with contextlib.suppress(TimeoutError):
            await self.wait_drained(self.drain_timeout_s + 2 * KILL_GRACE_S)
        if self._tmp is not None:
            self._tmp.cleanup()


__all__ = ["LocalProcessConnector", "worker_command"]
