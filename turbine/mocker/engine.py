"""`MockEngine`: ``MockerCore`` on a real clock, behind the ``Engine`` interface.

One asyncio task per engine runs the step loop:

    idle ──(request)──▶ step ─▶ sleep until deadline += duration ─▶ deliver ─▶ step ...
      ▲                                                               │
      └───────────────────────── no work left ◀───────────────────────┘

Idle engines wait on an event (no polling), so thousands can share one process. Sleeping
until an absolute deadline keeps the simulated rate exact even when one sleep overshoots
(a timer tick is ~1 ms; a step at speedup 1000 is ~16 µs): later steps catch up, up to
``_MAX_LAG_S`` behind; beyond that the loop stalled and the deadline restarts from now.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from turbine.engine.base import EngineStats, KVEventSink
from turbine.engine.streams import KvTransferEndpoints, StreamHub
from turbine.mocker.core import MockerConfig, MockerCore
from turbine.mocker.timing import TimingModel
from turbine.protocols.generate import GenerateDelta, GenerateRequest
from turbine.protocols.kv_events import BlockStored
from turbine.runtime.tasks import cancel_and_wait

__all__ = ["MockEngine", "MockerConfig"]

log = logging.getLogger(__name__)

_MAX_LAG_S = 0.05


class MockEngine(KvTransferEndpoints):
    def __init__(
        self,
        config: MockerConfig,
        *,
        vocab_size: int,
        special_token_ids: tuple[int, ...] | list[int] = (),
        eos_token_ids: tuple[int, ...] | list[int] = (),
        timing: TimingModel | None = None,
    ) -> None:
        self.config = config
        self.block_size = config.block_size
        self.num_kv_blocks = config.num_gpu_blocks
        self.max_num_seqs = config.max_num_seqs
        self.context_length = config.context_length
        self.core = MockerCore(
            config,
            vocab_size=vocab_size,
            special_token_ids=special_token_ids,
            eos_token_ids=eos_token_ids,
            timing=timing,
        )
        self._wake = asyncio.Event()
        self._hub = StreamHub(self.core, lambda: self._wake.set())
        self._hub.onboard = self._onboard
        self._onboards: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self.kv_layout = None  # no KV memory: peers' blocks are "copied" in modelled time only

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is not None and not self._task.done():
            return
        self._wake = asyncio.Event()  # bound to the running loop on first use
        self._task = asyncio.get_running_loop().create_task(self._run(), name="mock-engine-steps")
        self._task.add_done_callback(self._on_loop_done)

    async def stop(self) -> None:
        """Cancel the step loop; every open stream ends with finish_reason "abort"."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                if not task.cancelled():  # stop() itself was cancelled
                    raise
        await cancel_and_wait(self._onboards)
        self._hub.finish_all("abort")

    def set_kv_event_sink(self, sink: KVEventSink | None) -> None:
        self._hub.sink = sink


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
        if self._task is None or self._task.done():
            raise RuntimeError("MockEngine is not running: await start() first")
        return self._hub.generate(request)

    # -- the step loop ------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        core = self.core
        wake = self._wake
        deadline = loop.time()
        while True:
            if not core.has_work():
                wake.clear()
                await self._idle(wake)
                deadline = loop.time()
                continue
            result = core.step()
            if not result.outputs and not core.in_flight:  # nothing could run; wait for the queue to change
                self._hub.deliver(result)
                wake.clear()
                await self._idle(wake)
                deadline = loop.time()
                continue
            deadline += result.duration_s
            now = loop.time()
            if deadline < now - _MAX_LAG_S:
                deadline = now
            await asyncio.sleep(max(deadline - now, 0.0))
            self._hub.deliver(result)

    def _onboard(self, order: Any) -> None:
        """Copy a sequence's blocks up from the host/disk tiers: the modelled time, no bytes."""
        async def run() -> None:
            seconds = self.core.onboard_seconds(order.source)
            await asyncio.sleep(seconds)
            self.core.tiers.onboard_took(order.source, seconds)  # type: ignore[union-attr]
            self._hub.finish_pull(order.request_id, True)

        t = asyncio.get_running_loop().create_task(run())
        self._onboards.add(t)
        t.add_done_callback(self._onboards.discard)

    async def _idle(self, wake: asyncio.Event) -> None:
        """Wait for work; with KV held for peers, no longer than its hold deadline."""
        sched = self.core.scheduler
        deadline = sched.next_hold_deadline()
        if deadline is None:
            await wake.wait()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, deadline - sched.clock()) + 0.001):
                await wake.wait()
        sched.expire_held()

    def _on_loop_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("mock engine step loop crashed", exc_info=exc)
            self._hub.finish_all("error", error=f"engine failure: {exc!r}")
