"""Keeps a router's KV index in step with each worker's event stream.

Every worker numbers its event-plane messages (all topics, one counter). Per worker:

    joined ──▶ syncing ──snapshot(last_seq=S)──▶ live ──gap, unplaceable event, full queue──▶ syncing
                 │  events are buffered;             events submitted in order
                 └─ after the snapshot, buffered events with seq > S are submitted on top

A snapshot comes from the worker's ``kv_state`` endpoint. Applying an event twice is harmless
(stores and removals are idempotent in the index), so a snapshot that already includes a
buffered event does no damage. Load events bypass all of this: each is a complete reading.

The event loop only keeps this bookkeeping: decoding and applying run on the
``KvEventApplier``'s thread (kv_event_applier.py), whose one FIFO also carries each reset and
each removal of a worker, so they stay in order with the worker's events. A batch the thread
could not place comes back (``_failed``) tagged with the worker's *epoch*, which every reset
bumps: a failure of a batch submitted before the latest reset is moot.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from turbine.protocols.kv_events import KvStateSnapshot
from turbine.router.kv_event_applier import KvEventApplier
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
    epoch: int = 0  # resets submitted so far
    buffer: list[ReceivedEvent] = field(default_factory=list)
    task: asyncio.Task[None] | None = None


class KvEventSync:
    def __init__(self, client: RequestPlaneClient, on_load: Callable[[bytes], None] | None = None,
                 applier: KvEventApplier | None = None):
        """``applier``: the thread that applies events (one is made if not given; it starts
        with the first worker and stops in ``close``)."""
        self.client = client
        self.on_load = on_load
        self.applier = applier if applier is not None else KvEventApplier(self._failed)
        self.peers: dict[str, _Peer] = {}  # by event-plane address
        self.resyncs = 0
        self.overflows = 0  # batches the applier's full queue refused (each resyncs its worker)
        self._closed = False

    def add_worker(self, event_address: str, worker_id: str, request_address: str, router: Router) -> None:
        if self._closed:
            return  # shutting down: a record that arrives now is not followed
        self.applier.start()
        self.remove_worker(event_address)
        peer = self.peers[event_address] = _Peer(event_address, worker_id, request_address, router)
        self._start_resync(peer)

    def remove_worker(self, event_address: str) -> None:
        peer = self.peers.pop(event_address, None)
        if peer is not None and peer.task is not None:
            peer.task.cancel()

    def worker_removed(self, router: Router, worker_id: str) -> None:
        """The worker left: ``router`` forgets it now, its index blocks after its events already
        queued (it may have no event address: then nothing is queued for it, and order is moot)."""
        if self.applier.running:
            router.worker_removed(worker_id, index=False)
            self.applier.submit_removal(router, worker_id)
        else:
            router.worker_removed(worker_id)

    async def close(self) -> None:
        self._closed = True
        tasks = [p.task for p in self.peers.values() if p.task is not None]
        self.peers.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        self.applier.close()  # stops after the slice in hand: a blocking join of at most ~a slice

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
        if not self._submit(peer, ev):
            self._start_resync(peer)

    def _submit(self, peer: _Peer, ev: ReceivedEvent) -> bool:
        """Hand one event to the applier in sequence; False = the index fell out of step with
        the worker (events lost, or the applier's queue is full)."""
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
        if self.applier.submit_events(peer.router, peer.worker_id, ev.payload, (peer, peer.epoch)):
            return True
        self.overflows += 1
        log.warning("worker %s: the KV event queue is full (%d bytes); resyncing", peer.worker_id,
                    self.applier.queued_bytes)
        return False

    def _failed(self, token: object) -> None:
        """On the loop: the applier could not place or decode a batch of the worker ``token`` names."""
        peer, epoch = token  # type: ignore[misc]
        if self.peers.get(peer.event_address) is not peer or peer.epoch != epoch or peer.syncing:
            return  # gone, or a reset submitted after that batch supersedes it
        log.info("worker %s: a KV event batch could not be applied; resyncing", peer.worker_id)
        self._start_resync(peer)

    # --- resync ----------------------------------------------------------------------------------
    def _start_resync(self, peer: _Peer) -> None:
        peer.syncing = True
        if peer.task is None or peer.task.done():
            peer.task = asyncio.get_running_loop().create_task(self._resync(peer))

    async def _resync(self, peer: _Peer) -> None:
        attempt = 0
        while self.peers.get(peer.event_address) is peer:
            if self.applier.queued_bytes > self.applier.max_queued_bytes // 2:
                # a snapshot applied behind a long queue is stale before it lands: let it drain
                await asyncio.sleep(RESYNC_BACKOFF_S[min(attempt, len(RESYNC_BACKOFF_S) - 1)])
                attempt += 1
                continue
            try:
                snap = await self._fetch(peer)
            except (RequestPlaneError, msgspec.DecodeError) as e:
                delay = RESYNC_BACKOFF_S[min(attempt, len(RESYNC_BACKOFF_S) - 1)]
                log.info("worker %s: KV snapshot failed (%s); retrying in %.2f s", peer.worker_id, e, delay)
                attempt += 1
                await asyncio.sleep(delay)
                continue
            self.resyncs += 1
            peer.epoch += 1
            self.applier.submit_reset(peer.router, peer.worker_id, snap.blocks)
            peer.last_seq = snap.last_seq
            pending, peer.buffer = sorted(peer.buffer, key=lambda e: e.seq), []
            peer.syncing = False
            for i, ev in enumerate(pending):
                if not self._submit(peer, ev):
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
