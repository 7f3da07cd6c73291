"""A worker: one engine served as a runtime component.

It serves the ``generate`` endpoint (GenerateRequest in, GenerateDelta stream out), publishes
the engine's KV events (vLLM wire layout, topic ``kv``) and its load (topic ``load``) on the
event plane, and registers its model card in discovery so frontends find it.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator

import msgspec

from turbine.engine.base import Engine
from turbine.protocols.generate import GenerateDelta, GenerateRequest
from turbine.protocols.kv_events import KVEvent, KVEventBatch, KvStateSnapshot
from turbine.protocols.kv_events import enc_hook as kv_enc_hook  # engines' events carry token arrays
from turbine.protocols.kv_transfer import KvRelease
from turbine.protocols.load import WorkerLoad
from turbine.protocols.model_card import ModelCard
from turbine.runtime import tracing
from turbine.runtime.discovery import Discovery, Instance
from turbine.runtime.events import EventPublisher
from turbine.runtime.request_plane import RequestContext, RequestPlaneServer
from turbine.runtime.tasks import cancel_and_wait
from turbine.transfer.manager import KvTransferManager

log = logging.getLogger("turbine.worker")

# Coalesce load updates to one per LOAD_MIN_INTERVAL_S (a heartbeat every LOAD_HEARTBEAT_S regardless).
# Other frontends learn of a frontend's requests only from these: in the simulator (Mooncake, 8
# workers, 4x) two frontends' TTFT p50 is 276 ms with 50 ms reports, 185 ms with 10 ms, 170 ms for one
# frontend. Each report costs every frontend ~16 us to apply (ModelRegistry._on_load, this AMD EPYC)
# plus its receive on the event plane: 8 busy workers at 100 reports/s are ~1-2% of a frontend's core;
# fleets of hundreds of workers raise the interval (--load-interval-ms).
LOAD_MIN_INTERVAL_S = 0.01
LOAD_HEARTBEAT_S = 1.0

_req_decoder = msgspec.msgpack.Decoder(GenerateRequest)
_release_decoder = msgspec.msgpack.Decoder(KvRelease)
_encoder = msgspec.msgpack.Encoder(enc_hook=kv_enc_hook)


def _trace_end(span: tracing.Span, last: GenerateDelta) -> None:
    span.set("turbine.finish_reason", last.finish_reason)
    span.set("turbine.cached_tokens", last.cached_tokens)
    span.set("turbine.completion_tokens", last.completion_tokens)
    if last.error:
        span.error(last.error)


class Worker:
    def __init__(self, engine: Engine, card: ModelCard, *, discovery: Discovery, server: RequestPlaneServer,
                 publisher: EventPublisher | None = None, worker_id: str | None = None,
                 own_server: bool = True, transfer: KvTransferManager | None = None,
                 load_interval_s: float = LOAD_MIN_INTERVAL_S):
        if not (0 < load_interval_s <= LOAD_HEARTBEAT_S):
            raise ValueError(f"load_interval_s must be in (0, {LOAD_HEARTBEAT_S}], got {load_interval_s}")
        self.engine = engine
        self.card = card
        self.discovery = discovery
        self.server = server
        self.publisher = publisher
        self.worker_id = worker_id or f"worker-{uuid.uuid4().hex[:12]}"
        self.own_server = own_server
        self.transfer = transfer  # disaggregation: pulls this worker runs, the KV it holds for peers
        self.load_interval_s = load_interval_s
        self.load_reports = 0  # published (changes and heartbeats)
        self.address = ""
        self._load_dirty = asyncio.Event()
        self._load_task: asyncio.Task[None] | None = None
        self.instance: Instance | None = None
        self._last_seq = -1  # event-plane sequence number of the last batch this worker published

    async def start(self, address: str | None = None) -> Instance:
        await self.engine.start()
        self.server.register("generate", self._generate)
        self.server.register("kv_state", self._kv_state)
        if self.transfer is not None:
            self.server.register("kv_release", self._kv_release)
            self.transfer.backend.serve(self.server, self.engine.held_blocks)  # type: ignore[attr-defined]
        self.address = address or await self.server.start()
        if self.transfer is not None:
            self.transfer.worker_address = self.address
            self.engine.set_kv_transfer(self.transfer)  # type: ignore[attr-defined]
        event_address = None
        if self.publisher is not None:
            event_address = await self.publisher.start()
            self.engine.set_kv_event_sink(self._publish_kv)
            self._load_task = asyncio.get_running_loop().create_task(self._publish_load_loop())
        self.instance = Instance(instance_id=self.worker_id, component="worker", endpoint="generate",
                                 address=self.address, event_address=event_address, model_card=self.card,
                                 metadata={"pid": str(os.getpid())})
        await self.discovery.register(self.instance)
        log.info("worker %s serving %s at %s", self.worker_id, self.card.model_name, self.address)
        return self.instance

    async def drain(self, grace_s: float) -> None:
        """Leave discovery, refuse new requests (callers retry them elsewhere), and give running
        ones ``grace_s`` to finish; what still runs after that is cut off by ``stop()``."""
        with contextlib.suppress(Exception):
            await self.discovery.unregister(self.worker_id)
        if self.own_server:
            running = len(getattr(self.server, "active_streams", ()))
            log.info("worker %s draining: %d requests running, up to %.0f s", self.worker_id, running, grace_s)
            t0 = time.monotonic()
            await self.server.drain(grace_s)
            # a prefill worker's held KV: decode workers may still be copying it (some backends
            # read our memory without a request); wait for their releases, within the grace
            while getattr(self.engine, "num_held", 0) and time.monotonic() - t0 < grace_s:
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Leave discovery first (no new requests), then abort what runs, then close."""
        with contextlib.suppress(Exception):
            await self.discovery.unregister(self.worker_id)
        await self.engine.stop()
        if self._load_task is not None:
            await cancel_and_wait([self._load_task], timeout_s=5.0)
        if self.own_server:
            await self.server.stop()
        if self.transfer is not None:
            await self.transfer.close()
        if self.publisher is not None:
            await self.publisher.close()

    async def _generate(self, payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        try:
            req = _req_decoder.decode(payload)
        except msgspec.DecodeError as e:
            yield _encoder.encode(GenerateDelta(finish_reason="error", error=f"bad generate request: {e}"))
            return
        span = tracing.NOOP_SPAN
        if req.traceparent is not None:  # the frontend traces this request: so does this worker, if it traces
            pull = req.kv_transfer is not None and req.kv_transfer.source is not None
            span = tracing.tracer().start("turbine.worker.generate", req.traceparent, attributes={
                "turbine.worker_id": self.worker_id, "turbine.role": self.card.role,
                "turbine.model": self.card.model_name, "turbine.request_id": req.request_id,
                "turbine.prompt_tokens": len(req.token_ids), "turbine.max_tokens": req.stop.max_tokens,
                "turbine.kv_pull": pull})
            req = msgspec.structs.replace(req, traceparent=span.traceparent)  # the engine's spans are its children
        self._load_dirty.set()
        stream = self.engine.generate(req)
        try:
            async for delta in stream:
                if span is not tracing.NOOP_SPAN and delta.finish_reason is not None:
                    _trace_end(span, delta)
                yield _encoder.encode(delta)
        except ValueError as e:  # the engine refused the request (e.g. it can never fit)
            span.error(str(e))
            yield _encoder.encode(GenerateDelta(finish_reason="error", error=str(e)))
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
            self._load_dirty.set()
            span.end()

    async def _kv_release(self, payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        """A decode worker has pulled a held prefill's KV (or gave up): free its blocks."""
        req = _release_decoder.decode(payload)
        yield b"1" if self.engine.release_kv(req.transfer_id) else b"0"  # type: ignore[attr-defined]

    async def _kv_state(self, payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        """The full prefix-cache state and the sequence number it is current to (one frame)."""
        yield _encoder.encode(KvStateSnapshot(last_seq=self._last_seq, blocks=self.engine.kv_snapshot()))

    # --- event plane ---------------------------------------------------------------------------
    def _publish_kv(self, events: list[KVEvent]) -> None:
        if self.publisher is not None and events:
            self._last_seq = self.publisher.publish("kv", _encoder.encode(KVEventBatch(ts=time.time(), events=events)))
        self._load_dirty.set()

    def current_load(self) -> WorkerLoad:
        s = self.engine.stats()
        return WorkerLoad(worker_id=self.worker_id, model_name=self.card.model_name,
                          kv_active_blocks=s.kv_active_blocks, kv_total_blocks=s.kv_total_blocks,
                          num_running=s.num_running, num_waiting=s.num_waiting, prefill_tokens=s.prefill_tokens,
                          ts=time.time(),
                          tiers=list(s.tiers))

    async def _publish_load_loop(self) -> None:
        """At most every ``load_interval_s``: the load, when it differs from the last one
        published (a decode step that grew no block changes nothing a router reads), and once a
        second regardless (the heartbeat). While requests run or wait the engine's state moves
        without a KV event (a request admitted, one finished): it is read every interval. An idle
        worker sleeps until a request or a KV event marks its load dirty."""
        assert self.publisher is not None
        last: tuple[object, ...] | None = None
        last_sent = 0.0
        while True:
            if last is None or not (last[2] or last[3]):  # idle: nothing moves until something arrives
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(LOAD_HEARTBEAT_S):  # not wait_for: see runtime/tasks.py
                        await self._load_dirty.wait()
            self._load_dirty.clear()
            load = self.current_load()
            seen = (load.kv_active_blocks, load.kv_total_blocks, load.num_running, load.num_waiting,
                    load.prefill_tokens, load.tiers)
            now = time.monotonic()
            if seen != last or now - last_sent >= LOAD_HEARTBEAT_S:
                self._last_seq = self.publisher.publish("load", _encoder.encode(load))
                last, last_sent = seen, now
                self.load_reports += 1
            await asyncio.sleep(self.load_interval_s)
