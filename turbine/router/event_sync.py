"""Keeps a router's KV index in step with each worker's event stream.

Every worker numbers its event-plane messages (all topics, one counter). Per worker:

    joined ──▶ syncing ──snapshot(last_seq=S)──▶ live ──gap or unplaceable event──▶ syncing
                 │  events are buffered;             apply events in order
                 └─ after the snapshot, buffered events with seq > S are applied on top

A snapshot comes from the worker's ``kv_state`` endpoint. Applying an event twice is harmless
(stores and removals are idempotent in the index), so a snapshot that already includes a
buffered event does no damage. Load events bypass all of this: each is a complete reading.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from turbine.protocols.kv_events import KvStateSnapshot
from turbine.router.kv_event_decoder import decode_kv_event_batch
from turbine.router.router import Router
from turbine.runtime.events import ReceivedEvent
from turbine.runtime.request_plane import RequestPlaneClient, RequestPlaneError

log = logging.getLogger("turbine.router")

MAX_BUFFERED = 100_000  # events held while a snapshot is fetched; past this, start over
RESYNC_BACKOFF_S = (0.05, 0.2, 0.5, 1.0, 2.0)

_snapshot_decoder = msgspec.msgpack.Decoder(KvStateSnapshot)


@dataclass
class _Peer:
    event_address: str
    worker_id: str
    request_address: str
    router: Router
    last_seq: int | None = None
    syncing: bool = True
    buffer: list[ReceivedEvent] = field(default_factory=list)
    task: asyncio.Task[None] | None = None


class KvEventSync:
    def __init__(self, client: RequestPlaneClient, on_load: Callable[[bytes], None] | None = None):
        self.client = client
        self.on_load = on_load
        self.peers: dict[str, _Peer] = {}  # by event-plane address
        self.resyncs = 0

    def add_worker(self, event_address: str, worker_id: str, request_address: str, router: Router) -> None:
        self.remove_worker(event_address)
        peer = self.peers[event_address] = _Peer(event_address, worker_id, request_address, router)
        self._start_resync(peer)

    def remove_worker(self, event_address: str) -> None:
        peer = self.peers.pop(event_address, None)
        if peer is not None and peer.task is not None:
            peer.task.cancel()

    async def close(self) -> None:
        tasks = [p.task for p in self.peers.values() if p.task is not None]
        self.peers.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t

    # --- the event path ------------------------------------------------------------------
    def on_event(self, ev: ReceivedEvent) -> None:
        if ev.topic == "load" and self.on_load is not None:
            self.on_load(ev.payload)
        peer = self.peers.get(ev.address)
        if peer is None:
            return
        if peer.syncing:
            if len(peer.buffer) >= MAX_BUFFERED:
                peer.buffer.clear()
                peer.last_seq = None
            peer.buffer.append(ev)
            return
        if not self._apply(peer, ev):
            self._start_resync(peer)

    def _apply(self, peer: _Peer, ev: ReceivedEvent) -> bool:
        """Apply one event in sequence; False = the index fell out of step with the worker."""
        if peer.last_seq is not None:
            if ev.seq <= peer.last_seq:
                return True  # already covered (a snapshot included it)
            if ev.seq != peer.last_seq + 1:
                log.info("worker %s: events %d..%d lost; resyncing", peer.worker_id, peer.last_seq + 1, ev.seq - 1)
                peer.buffer.append(ev)
                return False
        peer.last_seq = ev.seq
        if ev.topic != "kv":
            return True
        try:
            batch = decode_kv_event_batch(ev.payload)
        except ValueError as e:
            log.warning("worker %s sent an undecodable KV event batch: %s", peer.worker_id, e)
            return False
        return peer.router.apply_kv_events(peer.worker_id, batch.events, ts=batch.ts)

    # --- resync ----------------------------------------------------------------------------------
    def _start_resync(self, peer: _Peer) -> None:
        peer.syncing = True
        if peer.task is None or peer.task.done():
            peer.task = asyncio.get_running_loop().create_task(self._resync(peer))

    async def _resync(self, peer: _Peer) -> None:
        attempt = 0
        while self.peers.get(peer.event_address) is peer:
            try:
                snap = await self._fetch(peer)
            except (RequestPlaneError, msgspec.DecodeError) as e:
                delay = RESYNC_BACKOFF_S[min(attempt, len(RESYNC_BACKOFF_S) - 1)]
                log.info("worker %s: KV snapshot failed (%s); retrying in %.2f s", peer.worker_id, e, delay)
                attempt += 1
                await asyncio.sleep(delay)
                continue
            self.resyncs += 1
            peer.router.reset_worker(peer.worker_id, snap.blocks)
            peer.last_seq = snap.last_seq
            pending, peer.buffer = sorted(peer.buffer, key=lambda e: e.seq), []
            peer.syncing = False
            for i, ev in enumerate(pending):
                if not self._apply(peer, ev):
                    peer.buffer.extend(pending[i + 1:])
                    break
            else:
                return
            peer.syncing = True  # a gap right after the snapshot: fetch again
            attempt = 0

    async def _fetch(self, peer: _Peer) -> KvStateSnapshot:
        frames = [f async for f in self.client.stream(peer.request_address, "kv_state", b"", timeout=10.0)]
        if len(frames) != 1:
            raise msgspec.DecodeError(f"expected one snapshot frame, got {len(frames)}")
        return _snapshot_decoder.decode(frames[0])
