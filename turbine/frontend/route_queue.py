"""Requests that no worker admits right now wait here, oldest first, instead of piling onto one.

A router with a per-worker queue limit (``--router-max-queued``) declines a request when every
worker already has that many waiting for their first token. The request then joins this queue:

    arrive ─▶ queue empty and route() admits ─▶ go
          └─▶ otherwise wait at the back ─▶ at the head, try again on every capacity kick
                                             (a first token, a finished request, a new worker,
                                             a load report showing less queued)

Only the head tries, so a newcomer never overtakes a request already waiting, and leaving the
queue (admitted, timed out, or cancelled by a disconnecting client) hands the turn to the next.
Bounded: a full queue turns requests away at once (503 with Retry-After), and a wait ends at the
request's deadline (504).
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from turbine.frontend.errors import ApiError
from turbine.router.metrics import RouterStats

T = TypeVar("T")
DEFAULT_QUEUE_SIZE = 1024


class RouteQueue:
    def __init__(self, max_waiting: int = DEFAULT_QUEUE_SIZE, stats: RouterStats | None = None):
        """``stats``: the model's router counters, where waits and rejections are counted."""
        if max_waiting < 0:
            raise ValueError(f"the route queue size must be >= 0, got {max_waiting}")
        self.max_waiting = max_waiting
        self.stats = stats if stats is not None else RouterStats()
        self._waiters: deque[asyncio.Event] = deque()

    def __len__(self) -> int:
        return len(self._waiters)

    def kick(self) -> None:
        """Capacity may have freed up: let the head try again."""
        if self._waiters:
            self._waiters[0].set()

    async def admit(self, attempt: Callable[[], T | None], deadline: float | None) -> T:
        """``attempt()``'s first non-None result, in arrival order among waiting requests.

        ``deadline``: ``time.monotonic()`` time by which to give up (504)."""
        if not self._waiters:
            got = attempt()
            if got is not None:
                return got
        if len(self._waiters) >= self.max_waiting:
            self.stats.queue_rejected += 1
            raise ApiError(503, "every worker is at its queue limit and the frontend's queue is full; retry shortly",
                           headers=[("retry-after", "1")])
        ev = asyncio.Event()
        self._waiters.append(ev)
        self.stats.queued += 1
        try:
            while True:
                if self._waiters[0] is ev:
                    got = attempt()
                    if got is not None:
                        return got
                ev.clear()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise ApiError(504, "the request timed out waiting for a worker to admit it")
                try:
                    async with asyncio.timeout(remaining):  # not wait_for: see runtime/tasks.py
                        await ev.wait()
                except TimeoutError:
                    raise ApiError(504, "the request timed out waiting for a worker to admit it") from None
        finally:
            head = self._waiters[0] is ev
            self._waiters.remove(ev)
            if head and self._waiters:
                self._waiters[0].set()  # the next in line tries: capacity may remain
