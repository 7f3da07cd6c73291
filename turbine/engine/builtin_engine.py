"""`BuiltinEngine`: ``BuiltinCore`` behind the ``Engine`` interface, stepping on its own thread.

    event loop                                  step thread ("turbine-engine-steps")
    generate(): core.add_request ──wake──▶      while running:
    stream.aclose(): core.abort                    idle? wait for wake
                                                   result = core.step()        (forward: GIL released)
    _deliver(result) ◀──call_soon_threadsafe──     at most _MAX_PENDING results undelivered
      KV events to the sink, then one delta per sequence that produced a token

The forward never runs on the event loop; steps follow each other back to back without a round
trip through it. ``add_request``/``abort`` take the core's lock only around scheduling, never
across the forward, so the loop waits at most for a scheduling pass.

Tensor parallelism: when a rank dies or a collective fails (the core's executor says so, from
its watchdog or from the step thread), the engine is done for good: every open stream and every
later request ends with "abort" (the frontend continues them on another worker) and
``on_fatal`` runs on the loop (the worker process leaves discovery and exits non-zero).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import traceback
from collections.abc import AsyncIterator, Callable
from typing import Any

from turbine.engine.base import EngineStats, KVEventSink
from turbine.engine.builtin_core import BuiltinConfig, BuiltinCore, StepResult
from turbine.engine.streams import KvTransferEndpoints, StreamHub
from turbine.protocols.generate import GenerateDelta, GenerateRequest
from turbine.protocols.kv_events import BlockStored
from turbine.protocols.kv_transfer import KvLayout

__all__ = ["BuiltinConfig", "BuiltinEngine"]

log = logging.getLogger(__name__)

_MAX_PENDING = 4  # step results the loop has not delivered yet before the step thread waits
# Before launching, the step thread lets the loop hand out the last step's tokens (at most this
# long; the device still runs the step in flight meanwhile): see BuiltinEngine._run.
_SETTLE_WAIT_S = 0.01
_STOP_WAIT_S = 120.0  # a step in flight (a long prefill, a graph capture) ends well within this


class BuiltinEngine(KvTransferEndpoints):
    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        device: str | None = None,
        dtype: str | None = None,
        block_size: int = 16,
        num_gpu_blocks: int | None = None,
        gpu_memory_utilization: float = 0.85,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        context_length: int | None = None,
        seed: int | None = 0,
        decode_kernel: str = "auto",
    ) -> None:
        """Load ``model_dir`` (blocking: seconds to minutes) and size the KV cache."""
        config = BuiltinConfig(
            block_size=block_size, num_gpu_blocks=num_gpu_blocks, gpu_memory_utilization=gpu_memory_utilization,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching, enable_chunked_prefill=enable_chunked_prefill,
            context_length=context_length, device=device, dtype=dtype, seed=seed, decode_kernel=decode_kernel,
        )
        self._init(BuiltinCore.load(model_dir, config))

    @classmethod
    def from_core(cls, core: BuiltinCore) -> BuiltinEngine:
        """An engine over an already built core (a model loaded elsewhere, or a test model)."""
        self = cls.__new__(cls)
        self._init(core)
        return self

    def _init(self, core: BuiltinCore) -> None:
        self.core = core
        self.config = core.config
        self.block_size = core.config.block_size
        self.num_kv_blocks = core.num_kv_blocks
        self.max_num_seqs = core.config.max_num_seqs
        self.context_length = core.context_length
        self._hub = StreamHub(core, lambda: self._wake.set())
        if core.tier_store is not None:
            self._hub.onboard = self._onboard
        self._onboards: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._pending = threading.Semaphore(_MAX_PENDING)
        self._settled = threading.Event()  # the loop has run the consumers of every posted result
        self._settled.set()
        self.settle_wait_s = _SETTLE_WAIT_S
        self.failure: str | None = None  # why a tensor-parallel rank took this engine down
        self.on_fatal: Callable[[BaseException], None] | None = None  # called once, on the loop, after it
        if core.executor is not None:
            core.executor.on_failure(self._rank_failed)

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._loop = asyncio.get_running_loop()
        self._stopping.clear()
        self._pending = threading.Semaphore(_MAX_PENDING)
        self._thread = threading.Thread(target=self._run, name="turbine-engine-steps", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop the step thread (after its current step); every open stream ends with "abort"."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping.set()
            self._wake.set()
            # after a rank failure the step thread may sit in a broken collective until its timeout
            limit = 10.0 if self.failure is not None else _STOP_WAIT_S
            if not await _joined(thread, limit):
                log.error("the engine's step thread did not stop within %.0f s; leaving it (and the KV cache "
                          "it may still use) to the process's exit", limit)
                self._hub.finish_all("abort")
                return
        for t in list(self._onboards):
            with contextlib.suppress(BaseException):
                await t  # a copy in flight finishes (threads cannot be cancelled)
        self._hub.finish_all("abort")
        if self.core.tier_store is not None:
            await asyncio.to_thread(self.core.tier_store.close)
        await asyncio.to_thread(self.core.close)

    def set_kv_event_sink(self, sink: KVEventSink | None) -> None:
        self._hub.sink = sink

    # -- disaggregation -------------------------------------------------------------------------------
    @property
    def kv_layout(self) -> KvLayout:
        return self.core.kv_layout

    @property
    def kv_data(self) -> Any:
        """The paged KV cache tensor ``[layers, 2, blocks, block_size, kv_heads, head_dim]`` that
        transfer backends read and write (None under tensor parallelism: rank 0 holds only its
        heads, so this engine takes no part in disaggregation)."""
        return self.core.kv_cache.data if self.core.executor is None else None

    def _onboard(self, order: Any) -> None:
        """Copy a sequence's blocks up from the host/disk tiers on a thread; a corrupt disk block
        fails it (the sequence is recomputed) and is forgotten."""
        from turbine.kvbm.store import CorruptBlock

        async def run() -> None:
            ok = False
            bad: CorruptBlock | None = None
            try:
                await asyncio.to_thread(self.core.onboard, order.source, order.local_blocks)
                ok = True
            except CorruptBlock as e:
                bad = e
                log.warning("KV tier: %s; recomputing %s", e, order.request_id)
            except Exception:  # noqa: BLE001 - recompute rather than serve doubtful KV
                log.exception("onboarding %s failed; recomputing it", order.request_id)
            self._hub.finish_pull(order.request_id, ok)
            if bad is not None:
                self.core.drop_tier_entry(bad.tier, bad.hash)

        t = asyncio.get_running_loop().create_task(run())
        self._onboards.add(t)
        t.add_done_callback(self._onboards.discard)

    def stats(self) -> EngineStats:
        return self.core.stats()

    def kv_snapshot(self) -> list[BlockStored]:
        """BlockStored events that rebuild this engine's prefix cache (for a router's resync)."""
        return self.core.kv_snapshot()

    # -- requests ---------------------------------------------------------------------------------
    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateDelta]:
        """One delta per step that produced a token; the last carries finish_reason and usage.

        Raises ValueError for a request this engine can never serve, RuntimeError if stopped.
        Closing or cancelling the stream aborts the request and frees its blocks at once.
        """
        if self.failure is not None:
            return _aborted()
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("BuiltinEngine is not running: await start() first")
        return self._hub.generate(request)

    # -- tensor-parallel failure ---------------------------------------------------------------------
    def _rank_failed(self, reason: str) -> None:
        """The executor's failure callback (any thread): finish on the loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._fatal, reason)
            except RuntimeError:  # the loop closed meanwhile
                pass

    def _fatal(self, reason: str) -> None:
        if self.failure is not None:
            return
        self.failure = reason
        self._stopping.set()
        self._wake.set()
        self._hub.finish_all("abort")  # the frontend continues these streams on another worker
        if self.on_fatal is not None:
            from turbine.engine.parallel.executor import RankFailure

            self.on_fatal(RankFailure(reason))

    # -- the step thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        core = self.core
        loop = self._loop
        assert loop is not None
        try:
            while not self._stopping.is_set():
                if not core.has_work():
                    self._wait_for_wake()
                    continue
                if self.settle_wait_s:
                    self._settled.wait(self.settle_wait_s)
                result = core.step()
                self._settled.clear()
                if not self._post(loop, result):
                    return
                if not result.outputs and not core.in_flight:  # nothing could run; wait for the queue to change
                    self._wait_for_wake()
        except BaseException as exc:
            if core.executor is not None:  # a broken collective, a dead rank: the group is done
                log.error("builtin engine step failed under tensor parallelism: %r", exc)
                core.executor.step_failed(exc)
                return
            log.error("builtin engine step thread crashed", exc_info=exc)
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._hub.finish_all, "error", f"engine failure: {exc!r}")

    def _wait_for_wake(self) -> None:
        """Sleep until woken; with KV held for peers, no longer than its hold deadline."""
        deadline = self.core.next_hold_deadline()
        if deadline is None:
            self._wake.wait()
        else:
            self._wake.wait(max(0.0, deadline - self.core.scheduler.clock()) + 0.001)
            self.core.expire_held()
        self._wake.clear()

    def _post(self, loop: asyncio.AbstractEventLoop, result: StepResult) -> bool:
        """Hand a result to the loop; False when the engine stops or the loop is gone."""
        while not self._pending.acquire(timeout=0.1):
            if self._stopping.is_set() or loop.is_closed():
                return False
        try:
            loop.call_soon_threadsafe(self._deliver, result)
        except RuntimeError:  # the loop closed
            return False
        return True

    def _deliver(self, result: StepResult) -> None:
        self._pending.release()
        self._hub.deliver(result)
        # after the consumers this delivery woke (FIFO): then the step thread may launch again
        self._loop.call_soon(self._settled.set)  # type: ignore[union-attr]


async def _joined(thread: threading.Thread, limit_s: float, report_s: float | None = None) -> bool:
    """Join a thread for at most ``limit_s``; each ``report_s`` it is still running, log where it is
    (a step that does not end is a bug to find, not a hang to sit in)."""
    report_s = report_s or min(10.0, limit_s / 2)
    waited = 0.0
    while waited < limit_s:
        chunk = min(report_s, limit_s - waited)
        await asyncio.to_thread(thread.join, chunk)
        if not thread.is_alive():
            return True
        waited += chunk
        frame = sys._current_frames().get(thread.ident or -1)
        log.warning("engine step thread still running after %.0f s of stop:\n%s", waited,
                    "".join(traceback.format_stack(frame)) if frame is not None else "(no frame)")
    return False


async def _aborted() -> AsyncIterator[GenerateDelta]:
    """The stream of a request that arrives after the engine failed: "abort" at once (the
    frontend sends it to another worker)."""
    yield GenerateDelta(finish_reason="abort")
