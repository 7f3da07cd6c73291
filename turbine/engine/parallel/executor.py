"""Rank 0's side of a tensor-parallel engine: start ranks 1..N-1, agree with them on the KV
cache, hand each of them every step, and notice when one dies.

Rank 0 is the engine process itself (``BuiltinCore``: the scheduler, the block manager and rank
0's runner), so a TP=1 engine is unchanged, the sampled tokens are already where the scheduler
reads them (no hop back), and async scheduling's on-device token hand-off between steps works
as on one GPU. Ranks 1..N-1 are spawned processes (parallel/rank.py) running the same runner
over their shards.

    start():        spawn ranks ─▶ Hello from each ─▶ join the group (TCPStore + gloo/NCCL)
    (all ranks)     load the shard ─▶ size the KV cache ─▶ Sized ─▶ Build(min) ─▶ graphs ─▶ Ready
    every step:     publish(step) = ONE encoded message, written to each rank's pipe, then rank 0
                    launches the step itself; the forward's collectives meet across ranks
    watchdog:       a thread waits on the ranks' process sentinels; a rank that exits fails the
                    executor: the others are stopped, ``on_failure`` callbacks run once

A failure is final: the engine ends its streams with "abort" (the frontend moves them to another
worker) and its process exits non-zero (turbine/launch.py). Nothing waits without a bound: the
start-up handshakes wait on the pipes and the sentinels together, collectives have the group's
timeout, and a dead rank breaks rank 0's pending collective (gloo) or is killed with the rest.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np
import torch

from turbine.engine.builtin_config import BuiltinConfig
from turbine.engine.packed_step import PackedStep
from turbine.engine.parallel.group import TPGroup, make_store
from turbine.engine.parallel.protocol import (
    Build,
    Failed,
    Hello,
    RankSpec,
    Ready,
    RunStep,
    Shutdown,
    Sized,
    encoder,
    report_decoder,
)

__all__ = ["RankFailure", "TPExecutor"]

log = logging.getLogger(__name__)

_JOIN_S = 5.0  # a rank's orderly exit after Shutdown, before it is terminated
# A start-up report may take long (a rank loading a large shard); a rank that dies meanwhile is seen
# at once through its sentinel, so this bound only catches a rank that hangs while starting.
_START_S = 1800.0
_WATCH_S = 0.5  # the watchdog's poll of the closing flag between sentinel waits


class RankFailure(RuntimeError):
    """A tensor-parallel rank died, failed, or stopped answering: the group is unusable."""


class _Rank:
    __slots__ = ("conn", "error", "proc", "rank")

    def __init__(self, rank: int, proc: Any, conn: mpc.Connection) -> None:
        self.rank, self.proc, self.conn = rank, proc, conn
        self.error: str | None = None  # what it reported (Failed) before dying


class TPExecutor:
    def __init__(self, config: BuiltinConfig, ranks: list[_Rank], store: Any) -> None:
        self.config = config
        self.size = config.tensor_parallel_size
        self.ranks = ranks
        self._store = store  # rank 0 serves the rendezvous store for the group's lifetime
        self.group: TPGroup = None  # type: ignore[assignment]  (set by start)
        self.failure: str | None = None
        self._callbacks: list[Callable[[str], None]] = []
        self._lock = threading.Lock()
        self._closing = False
        self._watchdog: threading.Thread | None = None

    # -- start-up ---------------------------------------------------------------------------------
    @classmethod
    def start(cls, model_dir: str | os.PathLike[str], config: BuiltinConfig, device: torch.device) -> TPExecutor:
        """Spawn ranks 1..N-1 and join the group as rank 0 on ``device`` (they use the next ones)."""
        from turbine.engine.parallel.rank import rank_main
        from turbine.engine.runner_setup import rank_device

        size = config.tensor_parallel_size
        store = make_store(size, config.tp_timeout_s)
        ctx = mp.get_context("spawn")  # CUDA and threads: never fork the engine process
        ranks = []
        for r in range(1, size):
            ours, theirs = ctx.Pipe(duplex=True)
            spec = RankSpec(model_dir=str(model_dir), config=config, rank=r, size=size, port=store.port,
                            device=str(rank_device(device, r, size)))
            proc = ctx.Process(target=rank_main, args=(spec, theirs), name=f"turbine-tp-rank{r}", daemon=True)
            proc.start()
            theirs.close()
            ranks.append(_Rank(r, proc, ours))
        self = cls(config, ranks, store)
        try:
            for rk in ranks:
                self._recv(rk, Hello)
            self.group = self._bounded(lambda: TPGroup.connect(rank=0, size=size, device=device, port=store.port,
                                                               timeout_s=config.tp_timeout_s, store=store),
                                       "joining the tensor-parallel group")
        except BaseException:
            self.close()
            raise
        log.info("tensor parallelism: %d ranks (pids %s) joined on %s", size,
                 ", ".join(str(rk.proc.pid) for rk in ranks), device)
        return self

    def agree_num_blocks(self, own: int) -> int:
        """Every rank sized its KV cache (``own``: rank 0's room); all build the smallest."""
        sizes = [own] + [self._recv(rk, Sized).num_blocks for rk in self.ranks]
        n = min(sizes)
        msg = encoder.encode(Build(num_blocks=n))
        for rk in self.ranks:
            rk.conn.send_bytes(msg)
        return n

    def wait_ready(self, runner: Any) -> None:
        """Every rank built its runner (graphs captured): from now on each step rank 0's
        ``runner`` launches is published to them first, and the watchdog runs."""
        for rk in self.ranks:
            self._recv(rk, Ready)
        runner.publish = self.publish
        self._watchdog = threading.Thread(target=self._watch, name="turbine-tp-watchdog", daemon=True)
        self._watchdog.start()

    def _recv(self, rk: _Rank, kind: type) -> Any:
        """The next report of rank ``rk``, which must be a ``kind``; raises RankFailure if the rank
        fails, dies, or says nothing for ``_START_S``."""
        deadline = time.monotonic() + _START_S
        while True:
            ready = mpc.wait([rk.conn, rk.proc.sentinel], max(0.0, deadline - time.monotonic()))
            if rk.conn in ready:
                try:
                    msg = report_decoder.decode(rk.conn.recv_bytes())
                except (EOFError, OSError):
                    msg = None
                if isinstance(msg, kind):
                    return msg
                if isinstance(msg, Failed):
                    rk.error = msg.error
                    raise RankFailure(f"tensor-parallel rank {rk.rank} failed: {msg.error}")
                if msg is not None:
                    raise RankFailure(f"tensor-parallel rank {rk.rank} sent {type(msg).__name__}, "
                                      f"expected {kind.__name__}")
            if not ready:
                raise RankFailure(f"tensor-parallel rank {rk.rank} sent no {kind.__name__} within {_START_S:.0f} s")
            if rk.proc.sentinel in ready or not rk.proc.is_alive():
                rk.proc.join(1.0)
                raise RankFailure(f"tensor-parallel rank {rk.rank} exited with code {rk.proc.exitcode} "
                                  "while starting")

    def _bounded(self, fn: Callable[[], Any], what: str) -> Any:
        """``fn()`` on a helper thread, given up on when a rank dies (fn may block in C++ until
        the group's timeout: the daemon thread is left to it)."""
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                box["error"] = e

        t = threading.Thread(target=run, name="turbine-tp-connect", daemon=True)
        t.start()
        while t.is_alive():
            t.join(0.1)
            for rk in self.ranks:
                if not rk.proc.is_alive():
                    self._collect_error(rk)
                    raise RankFailure(f"tensor-parallel rank {rk.rank} exited with code {rk.proc.exitcode} while "
                                      f"{what}" + (f": {rk.error}" if rk.error else ""))
        if "error" in box:
            raise box["error"]
        return box["value"]

    def explain(self, err: BaseException) -> BaseException:
        """A start-up error of rank 0, or, when rank 0 only saw a collective break (a RuntimeError),
        the first failure another rank reported (the root cause)."""
        if isinstance(err, RankFailure) or not isinstance(err, RuntimeError):
            return err
        for rk in self.ranks:
            self._collect_error(rk)
            if rk.error:
                return RankFailure(f"tensor-parallel rank {rk.rank} failed: {rk.error} (rank 0: {err!r})")
        return err

    def _collect_error(self, rk: _Rank) -> None:
        try:
            while rk.error is None and rk.conn.poll(0.2):
                msg = report_decoder.decode(rk.conn.recv_bytes())
                if isinstance(msg, Failed):
                    rk.error = msg.error
        except (EOFError, OSError, msgspec.DecodeError):
            pass

    # -- serving ----------------------------------------------------------------------------------
    def publish(self, step: PackedStep, ints: np.ndarray) -> None:
        """Hand one step to every other rank (one message); called by rank 0's runner as it
        launches the step, in launch order."""
        if self.failure is not None:
            raise RankFailure(self.failure)
        msg = encoder.encode(RunStep(step=step, ints=memoryview(np.ascontiguousarray(ints)).cast("B")))  # type: ignore[arg-type]
        for rk in self.ranks:
            try:
                rk.conn.send_bytes(msg)
            except OSError as e:  # BrokenPipeError: the rank is gone
                self.fail(f"tensor-parallel rank {rk.rank} is unreachable ({e!r})")
                raise RankFailure(self.failure) from None

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` once when the group fails (from whichever thread noticed)."""
        self._callbacks.append(callback)
        if self.failure is not None:
            callback(self.failure)

    def fail(self, reason: str) -> None:
        """The group is broken: stop the other ranks and tell the callbacks (idempotent)."""
        with self._lock:
            if self.failure is not None or self._closing:
                return
            self.failure = reason
        log.error("tensor parallelism failed: %s", reason)
        self._stop_ranks(orderly=False)
        if self.group is not None:
            self.group.abort()
        for cb in list(self._callbacks):
            try:
                cb(reason)
            except Exception:
                log.exception("tensor-parallel failure callback raised")

    def step_failed(self, err: BaseException) -> None:
        """Rank 0's step raised (a collective broke): fail, naming the rank that died when one did
        (its process usually ends a moment after its socket closes)."""
        dead = self._dead(1.0)
        if dead:
            self.fail(self._death(dead[0], f"; rank 0's step failed: {err!r}"))
        else:
            self.fail(f"rank 0's step failed: {err!r}")

    def _dead(self, timeout: float | None) -> list[_Rank]:
        """Ranks whose process has ended (waiting up to ``timeout`` for one). Sentinels, not
        ``is_alive``: two threads reaping one child race in ``waitpid``."""
        by_sentinel = {rk.proc.sentinel: rk for rk in self.ranks}
        return [by_sentinel[s] for s in mpc.wait(list(by_sentinel), timeout)]  # type: ignore[index]

    def _death(self, rk: _Rank, detail: str = "") -> str:
        self._collect_error(rk)
        code = rk.proc.exitcode
        why = f": {rk.error}" if rk.error else detail
        return (f"tensor-parallel rank {rk.rank} (pid {rk.proc.pid}) exited"
                + (f" with code {code}" if code is not None else "") + why)

    def _watch(self) -> None:
        while not self._closing:
            dead = self._dead(_WATCH_S)
            if self._closing:
                return
            if dead:
                self.fail(self._death(dead[0]))
                return

    # -- shutdown ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every rank (Shutdown, then terminate what lingers); idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self._stop_ranks(orderly=self.failure is None)
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(2 * _WATCH_S)
        for rk in self.ranks:
            rk.conn.close()

    def _stop_ranks(self, *, orderly: bool) -> None:
        if orderly:
            msg = encoder.encode(Shutdown())
            for rk in self.ranks:
                try:
                    rk.conn.send_bytes(msg)
                except OSError:
                    pass
            deadline = time.monotonic() + _JOIN_S
            for rk in self.ranks:
                rk.proc.join(max(0.0, deadline - time.monotonic()))
        for rk in self.ranks:
            if rk.proc.is_alive():
                rk.proc.terminate()
        for rk in self.ranks:
            rk.proc.join(2.0)
            if rk.proc.is_alive():
                rk.proc.kill()
                rk.proc.join(1.0)
