"""The interface every engine presents to a worker (mocker, built-in engine, adapters)."""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple, Protocol

from turbine.protocols.generate import GenerateDelta, GenerateRequest
from turbine.protocols.kv_events import BlockStored, KVEvent

KVEventSink = Callable[[list[KVEvent]], None]


class EngineStats(NamedTuple):
    kv_active_blocks: int  # referenced by running requests
    kv_total_blocks: int
    num_running: int
    num_waiting: int
    tiers: tuple[Any, ...] = ()  # protocols.load.TierLoad of each KV tier below the GPU cache
    prefill_tokens: int = 0  # prompt tokens not computed yet (0 where the engine does not say)


class Engine(Protocol):
    block_size: int
    num_kv_blocks: int
    max_num_seqs: int
    context_length: int

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateDelta]:
        """Stream token deltas; the last delta carries finish_reason and usage.

        Closing the iterator early (``aclose()`` or cancelling the consuming task) aborts the
        request and frees its KV blocks before returning.
        """
        ...

    def set_kv_event_sink(self, sink: KVEventSink | None) -> None:
        """Receive the KV events each engine step produced, in order, after the step."""
        ...

    def stats(self) -> EngineStats: ...

    def kv_snapshot(self) -> list[BlockStored]:
        """BlockStored events that rebuild the engine's prefix cache now (parents first)."""
        ...
