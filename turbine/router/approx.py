"""Approximate KV-aware routing for workers that publish no KV events.

The router remembers which prompt prefixes it sent to which worker and assumes each stays cached
for ``ttl_s`` after the last request that used it. The memory is a ``KvIndexer`` like the exact
one (same ``find_matches``), with the prefix's path id standing in for the engine's block hash:

    record(w, [L0, L1, L2])  ->  index.store(w, None, [L0, L1, L2], path_ids)   expires now + ttl
    expire(now)              ->  index.remove(w, path ids whose newest expiry is <= now)

A request that reuses a prefix refreshes every block of it, so a block never expires before a
block below it: children always leave first (or together), as a real LRU cache evicts.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from turbine.router.indexer import IndexIntegrityError, KvIndexer

DEFAULT_TTL_S = 120.0


class ApproxIndexer:
    def __init__(self, block_size: int, ttl_s: float = DEFAULT_TTL_S,
                 clock: Callable[[], float] = time.monotonic):
        if not ttl_s > 0:
            raise ValueError(f"approx TTL must be positive, got {ttl_s}")
        self.index = KvIndexer(block_size)
        self.ttl_s = ttl_s
        self.clock = clock
        self._expiry: dict[str, dict[int, float]] = {}  # worker -> path id -> expires at
        self._queue: deque[tuple[float, str, list[int]]] = deque()  # in expiry order (clock is monotonic)

    def record(self, worker_id: str, local_hashes: Sequence[int]) -> None:
        """The router just sent a prompt with these full blocks to ``worker_id``."""
        if not local_hashes:
            return
        now = self.clock()
        self.expire(now)
        ids = self.index.path_ids(local_hashes)
        self.index.store(worker_id, None, local_hashes, ids)
        t = now + self.ttl_s
        exp = self._expiry.setdefault(worker_id, {})
        for i in ids:
            exp[i] = t
        self._queue.append((t, worker_id, ids))

    def expire(self, now: float | None = None) -> int:
        """Drop every block whose TTL ran out; returns how many went."""
        if now is None:
            now = self.clock()
        q = self._queue
        gone_total = 0
        while q and q[0][0] <= now:
            t, w, ids = q.popleft()
            exp = self._expiry.get(w)
            if exp is None:  # the worker was removed
                continue
            gone = [i for i in ids if exp.get(i) == t]  # not refreshed by a later request
            if gone:
                for i in gone:
                    del exp[i]
                gone.reverse()  # leaves first
                gone_total += self.index.remove(w, gone)
        return gone_total

    def find_matches(self, local_hashes: Iterable[int], workers: Iterable[str] | None = None) -> dict[str, int]:
        self.expire()
        return self.index.find_matches(local_hashes, workers)

    def remove_worker(self, worker_id: str) -> None:
        self.index.remove_worker(worker_id)
        self._expiry.pop(worker_id, None)

    @property
    def num_blocks(self) -> int:
        return self.index.num_blocks

    def check_integrity(self) -> None:
        self.index.check_integrity()
        for w, exp in self._expiry.items():
            if len(exp) != self.index.worker_blocks(w):
                raise IndexIntegrityError(f"worker {w!r}: {len(exp)} expiry entries for "
                                     f"{self.index.worker_blocks(w)} indexed blocks")
