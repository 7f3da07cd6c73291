"""Server-sent events to dashboard pages: a bounded set of clients, each with a bounded queue.

    publish(event) ─▶ every client's queue (put_nowait)
                      a full queue: the client fell ``max_queued`` events behind (it stopped
                      reading, or reads slower than events come): it is dropped, its handler
                      task cancelled, its connection closed. Nothing buffers without bound.
    serve(resp)    ─▶ the first event (a snapshot), then the queue, until the client goes

A client that disconnects cancels its handler (the HTTP server does), which unsubscribes it.
``close()`` (the frontend drains or stops) ends every stream, so no page holds a drain open.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from turbine.frontend.errors import ApiError
from turbine.frontend.http_server import HttpResponse

log = logging.getLogger("turbine.dashboard")

DEFAULT_MAX_CLIENTS = 32
DEFAULT_MAX_QUEUED = 16  # events (one a second): a client this far behind is dropped
_CLOSE = b""


class SseClient:
    __slots__ = ("queue", "task", "dropped")

    def __init__(self, max_queued: int, task: asyncio.Task[object] | None) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=max_queued)
        self.task = task
        self.dropped = False


class SseHub:
    def __init__(self, max_clients: int = DEFAULT_MAX_CLIENTS, max_queued: int = DEFAULT_MAX_QUEUED) -> None:
        if max_clients < 1 or max_queued < 1:
            raise ValueError("max_clients and max_queued must be >= 1")
        self.max_clients = max_clients
        self.max_queued = max_queued
        self.clients: set[SseClient] = set()
        self.dropped = 0  # clients dropped for falling behind
        self.closed = False

    def __len__(self) -> int:
        return len(self.clients)

    def subscribe(self) -> SseClient:
        """A new client for the running task; 503 at the cap or once closed."""
        if self.closed:
            raise ApiError(503, "the server is shutting down", headers=[("retry-after", "1")])
        if len(self.clients) >= self.max_clients:
            raise ApiError(503, f"the dashboard has its maximum of {self.max_clients} live clients; retry later",
                           headers=[("retry-after", "5")])
        c = SseClient(self.max_queued, asyncio.current_task())
        self.clients.add(c)
        return c

    def unsubscribe(self, c: SseClient) -> None:
        self.clients.discard(c)

    def publish(self, event: bytes) -> None:
        for c in list(self.clients):
            try:
                c.queue.put_nowait(event)
            except asyncio.QueueFull:
                self._drop(c)

    def _drop(self, c: SseClient) -> None:
        self.clients.discard(c)
        c.dropped = True
        self.dropped += 1
        log.info("dropping a dashboard client %d events behind", self.max_queued)
        if c.task is not None and c.task is not asyncio.current_task():
            c.task.cancel()

    def close(self) -> None:
        """End every stream (their handlers return once they read the close marker)."""
        self.closed = True
        for c in list(self.clients):
            self.clients.discard(c)
            try:
                c.queue.put_nowait(_CLOSE)
            except asyncio.QueueFull:
                if c.task is not None and c.task is not asyncio.current_task():
                    c.task.cancel()

    async def serve(self, resp: HttpResponse, first: Callable[[], bytes]) -> None:
        """Stream to one client: ``first()`` (built after subscribing, so no event falls between
        it and the queue), then every published event, until the client or the hub goes."""
        c = self.subscribe()
        try:
            resp.start_stream(200, headers=[("x-accel-buffering", "no")])
            resp.write_chunk(b"retry: 2000\n\n" + first())
            await resp.drain()
            while True:
                event = await c.queue.get()
                if event is _CLOSE or not event:
                    return
                resp.write_chunk(event)
                await resp.drain()
        finally:
            self.unsubscribe(c)


def sse_event(data: bytes, event: str | None = None) -> bytes:
    """One SSE event of one-line ``data`` (JSON from msgspec has no raw newline)."""
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + data + b"\n\n"


__all__ = ["SseClient", "SseHub", "sse_event"]
