"""One worker's side of disaggregation: runs the pulls its engine's scheduler orders, tells the
engine how each ended, releases the peer's blocks, and describes its own held blocks.

    scheduler admits a sequence ──PullOrder──▶ manager.submit ──task──▶ backend.pull (timeout)
                                                     │ ok / failed ──▶ engine.finish_pull(id, ok)
                                                     └──▶ kv_release(transfer_id) on the peer

A failed pull is not an error for the client: the engine prefills the sequence itself. The
peer is released in every case (it would also free the blocks at its hold deadline). Pulls run
on the event loop as tasks this manager owns; at most ``max_concurrent`` at once, the rest wait.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from turbine.engine.scheduler import HeldKv, PullOrder
from turbine.protocols.kv_transfer import KvTransferParams
from turbine.runtime.tasks import cancel_and_wait
from turbine.runtime.request_plane import RequestPlaneClient
from turbine.transfer.base import TransferBackend, TransferError, send_release

log = logging.getLogger("turbine.transfer")



class TransferStats:
    __slots__ = ("pulls", "failures", "blocks", "bytes", "seconds", "releases", "release_failures")

    def __init__(self) -> None:
        self.pulls = self.failures = self.blocks = self.bytes = self.releases = self.release_failures = 0
        self.seconds = 0.0


class KvTransferManager:
    def __init__(self, backend: TransferBackend, client: RequestPlaneClient, *, worker_address: str = "",
                 block_bytes: int = 0, timeout_s: float = 30.0, max_concurrent: int = 16) -> None:
        if timeout_s <= 0 or max_concurrent < 1:
            raise ValueError("timeout_s must be positive and max_concurrent at least 1")
        self.backend = backend
        self.client = client
        self.worker_address = worker_address  # ours, for the params of what we hold
        self.block_bytes = block_bytes
        self.timeout_s = timeout_s
        self.stats = TransferStats()
        self._finish_pull: Callable[[str, bool], None] | None = None
        self._slots = asyncio.Semaphore(max_concurrent)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def bind(self, finish_pull: Callable[[str, bool], None]) -> None:
        """The engine's callback (thread-safe on its side) for a pull that ended."""
        self._finish_pull = finish_pull

    # --- prefill side --------------------------------------------------------------------------
    def params(self, transfer_id: str, held: HeldKv, hold_s: float) -> KvTransferParams:
        return KvTransferParams(transfer_id=transfer_id, worker_address=self.worker_address,
                                agent=self.backend.agent_info(), block_ids=held.block_ids,
                                block_hashes=held.block_hashes, num_tokens=held.num_tokens, hold_s=hold_s)

    # --- decode side ---------------------------------------------------------------------------
    def submit(self, orders: list[PullOrder]) -> None:
        loop = asyncio.get_running_loop()
        for order in orders:
            if self._closed:
                self._done(order, False)
                continue
            t = loop.create_task(self._run(order))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _run(self, order: PullOrder) -> None:
        ok = not order.local_blocks  # nothing to copy: the local cache had it all
        try:
            if order.local_blocks:
                if order.source.agent.backend != self.backend.name:
                    raise TransferError(f"the peer offers its KV over {order.source.agent.backend!r}, this worker "
                                        f"reads over {self.backend.name!r} (give both the same --kv-transfer)")
                async with self._slots:
                    t0 = time.perf_counter()
                    async with asyncio.timeout(self.timeout_s):
                        await self.backend.pull(order.source, order.remote_blocks, order.local_blocks)
                    s = self.stats
                    s.pulls += 1
                    s.blocks += len(order.local_blocks)
                    s.bytes += len(order.local_blocks) * self.block_bytes
                    s.seconds += time.perf_counter() - t0
                    ok = True
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure means: prefill it here
            self.stats.failures += 1
            log.warning("pulling %d blocks of %s from %s failed (%s): prefilling locally", len(order.local_blocks),
                        order.source.transfer_id, order.source.worker_address, e)
        finally:
            if order.local_blocks:
                self._done(order, ok)
            await self._release(order.source)

    def _done(self, order: PullOrder, ok: bool) -> None:
        if self._finish_pull is not None:
            try:
                self._finish_pull(order.request_id, ok)
            except Exception:  # noqa: BLE001
                log.exception("finish_pull(%s) failed", order.request_id)

    async def _release(self, source: KvTransferParams) -> None:
        if await send_release(self.client, source):
            self.stats.releases += 1
        else:  # the peer frees the blocks at its hold deadline anyway
            self.stats.release_failures += 1
            log.info("releasing transfer %s at %s failed; it expires there", source.transfer_id,
                     source.worker_address)

    async def close(self) -> None:
        """Cancel running pulls (their sequences are told: failed) and close the backend."""
        self._closed = True
        await cancel_and_wait(self._tasks)
        await self.backend.close()
