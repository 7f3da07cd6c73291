"""Applies KV events to routers' indexes on a thread of its own, off the frontend's event loop.

    event loop (KvEventSync)                   applier thread
      sequence bookkeeping ─▶ submit ─▶ FIFO ─▶ decode ─▶ apply, in slices, holding index.lock
      (a full FIFO: resync)                        │ an unplaceable or undecodable batch
      on_failed(token)  ◀─ loop.call_soon_threadsafe┘

Everything that changes an index goes through the one FIFO: event batches, a worker's reset
from a snapshot, a worker's removal. A worker's changes therefore land in the order the loop
submitted them, and its removal never overtakes its own events.

Sharing the index with the loop, which reads it for every routing decision:
- the thread holds an index's ``lock`` for at most ``slice_s`` of work (a big event, a clear or
  a reset is cut into pieces to keep to that), then lets go of it;
- between slices it sleeps for zero seconds, which hands the GIL to a thread waiting for it (the
  loop, woken by a request). Without this the loop would wait for the interpreter's switch
  interval (``sys.getswitchinterval()``, 5 ms), not for a slice;
- while the FIFO is empty it holds no lock and waits on an event.

The FIFO is bounded by the bytes of undecoded payloads it holds (``max_queued_bytes``):
``submit_events`` refuses a batch that does not fit and the caller resyncs that worker, so
nothing is lost silently. Resets and removals are never refused (there are few of them).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from turbine.protocols.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
)
from turbine.router.kv_event_decoder import KvEventDecoder

if TYPE_CHECKING:
    from turbine.router.router import Router

log = logging.getLogger("turbine.router")

DEFAULT_MAX_QUEUED_BYTES = 64 << 20  # ~300k blocks of 64 tokens: a second or more of a busy fleet's events
DEFAULT_SLICE_S = 0.0002  # longest hold of an index lock (and of the GIL) between two yields
PIECE_BLOCKS = 256  # a BlockStored / BlockRemoved with more blocks is applied in pieces this big
ITEM_BYTES = 64  # what an item costs the bound beyond its payload (an empty payload still counts)

_EVENTS, _RESET, _REMOVE, _STOP = range(4)


class KvEventApplier:
    """One thread, one FIFO of index changes; see the module docstring.

    ``on_failed(token)`` runs on the event loop (through ``call_soon``, by default that loop's
    ``call_soon_threadsafe``) for a batch whose events could not all be placed or decoded:
    the caller resyncs the worker the token names.
    """

    def __init__(self, on_failed: Callable[[object], None], *, max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
                 slice_s: float = DEFAULT_SLICE_S, call_soon: Callable[..., object] | None = None,
                 name: str = "kv-event-applier"):
        if max_queued_bytes <= 0 or slice_s <= 0:
            raise ValueError("max_queued_bytes and slice_s must be positive")
        self.on_failed = on_failed
        self.max_queued_bytes = max_queued_bytes
        self.slice_s = slice_s
        self.name = name
        self.decoder = KvEventDecoder()  # only this thread decodes
        self._call_soon = call_soon
        self._q: deque[tuple[int, Router | None, str, object, object]] = deque()
        self._wake = threading.Event()
        self._drained = threading.Condition()  # notified when the FIFO runs empty
        self._thread: threading.Thread | None = None
        self._closed = False
        self._held: threading.Lock | None = None  # the index lock this thread holds now
        self._slice_t0 = 0.0
        # Each counter has one writer: in by the loop, out and the rest by the thread.
        self._bytes_in = 0
        self._bytes_out = 0
        self.submitted = 0  # items accepted
        self.done = 0  # items finished
        self.refused = 0  # event batches refused by the bound
        self.failed = 0  # batches reported to on_failed
        self.yields = 0  # slices ended to let others at the GIL and the index

    # -- the loop's side ----------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued_bytes(self) -> int:
        return self._bytes_in - self._bytes_out

    def start(self) -> None:
        """Start the thread (idempotent); call on the event loop that ``on_failed`` must run on."""
        if self._closed:
            raise RuntimeError("this KvEventApplier is closed")
        if self._thread is not None:
            return
        if self._call_soon is None:
            self._call_soon = asyncio.get_running_loop().call_soon_threadsafe
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def submit_events(self, router: Router, worker_id: str, payload: bytes, token: object) -> bool:
        """Queue one msgpack KV event batch of ``worker_id``; False (and nothing queued) when the
        FIFO is full: the caller must resync the worker."""
        size = len(payload) + ITEM_BYTES
        if self._bytes_in - self._bytes_out + size > self.max_queued_bytes:
            self.refused += 1
            return False
        self._bytes_in += size
        self._put((_EVENTS, router, worker_id, payload, token))
        return True

    def submit_reset(self, router: Router, worker_id: str, snapshot: Sequence[BlockStored]) -> None:
        """Queue ``router.reset_worker(worker_id, snapshot)`` (never refused)."""
        self._put((_RESET, router, worker_id, snapshot, None))

    def submit_removal(self, router: Router, worker_id: str) -> None:
        """Queue the removal of ``worker_id``'s blocks from ``router``'s index (never refused)."""
        self._put((_REMOVE, router, worker_id, None, None))

    def _put(self, item: tuple[int, Router | None, str, object, object]) -> None:
        if self._closed:
            raise RuntimeError("this KvEventApplier is closed")
        self.submitted += 1
        self._q.append(item)
        self._wake.set()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block the calling thread until everything submitted so far is applied (tests, benches;
        never on the event loop); False if ``timeout`` passed first or the thread is not running."""
        target = self.submitted
        with self._drained:
            return self._drained.wait_for(lambda: self.done >= target or not self.running, timeout) and self.done >= target

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread (what is still queued is dropped) and join it."""
        self._closed = True
        t = self._thread
        if t is None:
            return
        self._q.appendleft((_STOP, None, "", None, None))
        self._wake.set()
        t.join(timeout)
        if t.is_alive():  # pragma: no cover - a slice is far shorter than any timeout
            log.error("the KV event applier thread did not stop within %.1f s", timeout)

    # -- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        q = self._q
        self._slice_t0 = time.perf_counter()
        while True:
            try:
                kind, router, worker_id, data, token = q.popleft()
            except IndexError:
                self._release()
                with self._drained:
                    self._drained.notify_all()
                self._wake.wait()
                self._wake.clear()
                self._slice_t0 = time.perf_counter()
                continue
            if kind == _STOP:
                break
            assert router is not None
            try:
                if kind == _EVENTS:
                    try:
                        self._apply_batch(router, worker_id, data, token)  # type: ignore[arg-type]
                    finally:
                        self._bytes_out += len(data) + ITEM_BYTES  # type: ignore[arg-type]
                elif kind == _RESET:
                    self._hold(router.index.lock)
                    router.reset_worker(worker_id, data, pace=self._pace)  # type: ignore[arg-type]
                else:
                    self._hold(router.index.lock)
                    router.index.remove_worker(worker_id, pace=self._pace)
            except Exception:  # a bug must not stop the thread: log it, resync the worker
                log.exception("KV event applier: applying a change of worker %s failed", worker_id)
                if token is not None:
                    self._fail(token)
            self.done += 1
            self._pace()
        self._release()
        with self._drained:
            self._drained.notify_all()

    def _apply_batch(self, router: Router, worker_id: str, payload: bytes, token: object) -> None:
        try:
            batch = self.decoder.decode(payload)
        except ValueError as e:
            log.warning("worker %s sent an undecodable KV event batch: %s", worker_id, e)
            self._fail(token)
            return
        events = batch.events
        lock = router.index.lock
        ok = True
        if _small(events):
            self._hold(lock)
            ok = router.apply_kv_events(worker_id, events, ts=batch.ts)
        else:
            pieces = list(_pieces(events))
            for i, piece in enumerate(pieces):
                self._hold(lock)
                if type(piece[0]) is AllBlocksCleared:  # clear in pieces first; apply then only counts it
                    router.index.clear_worker(worker_id, pace=self._pace)
                    self._hold(lock)
                ok = router.apply_kv_events(worker_id, piece, ts=batch.ts if i == len(pieces) - 1 else None) and ok
                if i < len(pieces) - 1:
                    self._pace()
        if not ok:
            self._fail(token)

    def _fail(self, token: object) -> None:
        self.failed += 1
        try:
            self._call_soon(self.on_failed, token)  # type: ignore[misc]
        except RuntimeError:  # the loop is closed: nobody is left to resync
            pass

    def _hold(self, lock: threading.Lock) -> None:
        held = self._held
        if held is not lock:
            if held is not None:
                held.release()
            lock.acquire()
            self._held = lock

    def _release(self) -> None:
        if self._held is not None:
            self._held.release()
            self._held = None

    def _pace(self) -> None:
        """End the slice when it has run ``slice_s``: release the index, hand over the GIL."""
        if time.perf_counter() - self._slice_t0 >= self.slice_s:
            self._release()
            time.sleep(0)  # lets a thread waiting for the GIL (the event loop) take it now
            self.yields += 1
            self._slice_t0 = time.perf_counter()


def _small(events: list[KVEvent]) -> bool:
    """All of the batch can be applied in one go (the common case: a few events of few blocks)."""
    blocks = 0
    for ev in events:
        if type(ev) is BlockStored or type(ev) is BlockRemoved:
            blocks += len(ev.block_hashes)
        else:
            return False  # AllBlocksCleared: cleared on its own, between slices
    return blocks <= PIECE_BLOCKS


def _pieces(events: list[KVEvent]):  # type: ignore[no-untyped-def]
    """``events`` as lists of at most ~PIECE_BLOCKS blocks, splitting long events into chains of
    shorter ones that mean the same (each stored piece's parent is the previous piece's last
    block), with an AllBlocksCleared on its own."""
    piece: list[KVEvent] = []
    blocks = 0
    for ev in events:
        if type(ev) is BlockStored or type(ev) is BlockRemoved:
            for part in _split(ev):
                n = len(part.block_hashes)
                if piece and blocks + n > PIECE_BLOCKS:
                    yield piece
                    piece, blocks = [], 0
                piece.append(part)
                blocks += n
        else:
            if piece:
                yield piece
            yield [ev]
            piece, blocks = [], 0
    if piece:
        yield piece


def _split(ev: BlockStored | BlockRemoved) -> list[BlockStored | BlockRemoved]:
    hashes = ev.block_hashes
    if len(hashes) <= PIECE_BLOCKS:
        return [ev]
    k = PIECE_BLOCKS
    if type(ev) is BlockRemoved:
        return [BlockRemoved(block_hashes=hashes[i : i + k], medium=ev.medium) for i in range(0, len(hashes), k)]
    bs = ev.block_size
    toks = ev.token_ids
    locs = ev.local_hashes
    if len(toks) != len(hashes) * bs or (locs is not None and len(locs) != len(hashes)):
        return [ev]  # malformed: let the index reject it whole
    return [BlockStored(block_hashes=hashes[i : i + k], parent_block_hash=ev.parent_block_hash if i == 0 else hashes[i - 1],
                        token_ids=toks[i * bs : (i + k) * bs], block_size=bs, lora_id=ev.lora_id, medium=ev.medium,
                        lora_name=ev.lora_name, local_hashes=None if locs is None else locs[i : i + k])
            for i in range(0, len(hashes), k)]
