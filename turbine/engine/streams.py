"""Token streams between a stepping core and the coroutines consuming ``Engine.generate``.

Shared by every engine built on a core with ``add_request``/``abort``/``get`` and step results
of per-sequence outputs (the mocker and the built-in engine): one queue of deltas per request,
the first token delta carries the prefix hit, the last one finish reason and usage, and a
consumer that leaves aborts its request at once.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from turbine.engine.base import KVEventSink
from turbine.engine.request_trace import RequestTrace
from turbine.engine.step import StepResult
from turbine.kvbm.tiered import TierSource
from turbine.protocols.generate import FinishReason, GenerateDelta, GenerateRequest
from turbine.runtime import tracing

log = logging.getLogger(__name__)


class CoreLike(Protocol):
    def add_request(self, request: GenerateRequest, arrival_time: float | None = None) -> Any: ...

    def abort(self, request_id: str) -> bool: ...

    def get(self, request_id: str) -> Any: ...

    def finish_pull(self, request_id: str, ok: bool) -> bool: ...

    def release(self, request_id: str) -> bool: ...

    def held_blocks(self, request_id: str) -> list[int] | None: ...


class KvTransferEndpoints:
    """What a worker's transfer manager and endpoints call on an engine (disaggregation);
    engines over a StreamHub (``self._hub``) share it."""

    _hub: StreamHub

    def set_kv_transfer(self, manager: Any) -> None:
        """The transfer manager that runs this engine's pulls and describes what it holds."""
        self._hub.set_kv_transfer(manager)

    def release_kv(self, transfer_id: str) -> bool:
        """A decode worker has the KV of a held prefill (or gave up on it): free its blocks."""
        return self._hub.release_kv(transfer_id)

    def held_blocks(self, transfer_id: str) -> list[int] | None:
        return self._hub.core.held_blocks(transfer_id)

    @property
    def num_held(self) -> int:
        """Prefills whose KV waits for a decode worker's pull."""
        return len(self._hub.core.scheduler.held)


class _Stream:
    """One request's pending deltas and the consumer's wake-up future."""

    __slots__ = ("deltas", "waiter")

    def __init__(self) -> None:
        self.deltas: deque[GenerateDelta] = deque()  # at most max_tokens + 1 entries
        self.waiter: asyncio.Future[None] | None = None

    def push(self, delta: GenerateDelta) -> None:
        self.deltas.append(delta)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class StreamHub:
    def __init__(self, core: CoreLike, wake: Callable[[], None]):
        self.core = core
        self.wake = wake  # tell the stepping side that the queue changed
        self.streams: dict[str, _Stream] = {}
        self.sink: KVEventSink | None = None
        self.transfer: Any = None  # transfer.KvTransferManager: disaggregation (pulls, held params)
        # copies up from the engine's own KV tiers (kvbm.TierSource orders): the engine's runner
        self.onboard: Callable[[Any], None] | None = None

    # -- disaggregation: the engine side of the transfer manager (core calls are thread-safe) --
    def set_kv_transfer(self, manager: Any) -> None:
        self.transfer = manager
        manager.bind(self.finish_pull)

    def finish_pull(self, request_id: str, ok: bool) -> None:
        self.core.finish_pull(request_id, ok)
        self.wake()

    def release_kv(self, transfer_id: str) -> bool:
        ok = self.core.release(transfer_id)
        self.wake()  # freed blocks may let a stuck queue move
        return ok

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateDelta]:
        rid = request.request_id
        if rid in self.streams:
            raise ValueError(f"request id {rid!r} is already streaming")
        loop = asyncio.get_running_loop()
        self.core.add_request(request, loop.time())  # ValueError: this engine can never serve it
        trace = None  # engine spans (queue, KV transfer, prefill, decode) of a traced request
        if request.traceparent is not None and tracing.tracer().enabled:
            trace = RequestTrace(request, self.core.get(rid))
        stream = self.streams[rid] = _Stream()  # before any delivery: those run as later loop callbacks
        self.wake()
        finished = False
        reason = None
        try:
            while True:
                deltas = stream.deltas
                while deltas:
                    delta = deltas.popleft()
                    reason = delta.finish_reason
                    finished = reason is not None
                    if trace is not None and delta.token_ids:
                        trace.saw_tokens()
                    yield delta
                    if finished:
                        return
                stream.waiter = loop.create_future()
                await stream.waiter
        finally:
            if self.streams.get(rid) is stream:
                del self.streams[rid]
            if not finished and self.core.abort(rid):
                self.wake()  # freed blocks may let a stuck queue move
            if trace is not None and trace.seq is not None:
                trace.emit(tracing.tracer(), reason if finished else "abort")

    def deliver(self, result: StepResult) -> None:
        """KV events to the sink first (a router sees blocks before their tokens), then deltas."""
        if result.kv_events and self.sink is not None:
            try:
                self.sink(result.kv_events)
            except Exception:
                log.exception("KV event sink failed; events of this step are lost")
        if result.pulls:
            peer = []
            for order in result.pulls:
                if isinstance(order.source, TierSource):
                    if self.onboard is not None:
                        self.onboard(order)
                    else:
                        self.finish_pull(order.request_id, False)
                else:
                    peer.append(order)
            if peer and self.transfer is not None:
                self.transfer.submit(peer)
            elif peer:  # no transfer configured: every pulling sequence is prefilled here
                for order in peer:
                    if order.local_blocks:
                        self.finish_pull(order.request_id, False)
        streams = self.streams
        for out in result.outputs:
            token, reason = out.token_id, out.finish_reason
            if token is None and reason is None:
                continue
            stream = streams.get(out.request_id)
            if stream is None:  # the consumer left while the step ran (a held prefill expires)
                continue
            if reason is None:
                if out.completion_tokens == 1:  # the first token tells the frontend the prefix hit
                    stream.push(GenerateDelta(token_ids=[token], prompt_tokens=out.prompt_tokens,
                                              cached_tokens=out.cached_tokens,
                                              kv_pulled_blocks=out.pulled_blocks or None))
                else:
                    stream.push(GenerateDelta(token_ids=[token]))  # type: ignore[list-item]
            else:
                delta = GenerateDelta(token_ids=[token] if token is not None else [], finish_reason=reason,
                                      prompt_tokens=out.prompt_tokens, cached_tokens=out.cached_tokens,
                                      completion_tokens=out.completion_tokens,
                                      kv_pulled_blocks=out.pulled_blocks or None)
                if out.held_kv is not None and self.transfer is not None:
                    delta.kv_transfer = self.transfer.params(out.request_id, out.held_kv, out.held_kv.hold_s)
                stream.push(delta)

    def finish_all(self, reason: FinishReason, error: str | None = None) -> None:
        """End every open stream with ``reason`` and free its request's blocks."""
        streams, self.streams = self.streams, {}
        for rid, stream in streams.items():
            seq = self.core.get(rid)
            delta = GenerateDelta(finish_reason=reason, error=error)
            if seq is not None:
                delta.prompt_tokens = seq.num_prompt_tokens
                delta.cached_tokens = seq.num_cached_tokens
                delta.completion_tokens = seq.num_output_tokens
            self.core.abort(rid)
            stream.push(delta)
