"""aetcd, made safe to stop: one client at a time over a list of endpoints, and teardown that is
bounded even where aetcd or Python 3.11's asyncio drop a cancellation.

- ``Connection``: the current aetcd client of a list of endpoints; ``failed()`` drops it (a new
  client has a new gRPC channel and watcher: aetcd's watcher is never reused after its stream
  broke) and moves to the next endpoint.
- ``close_bounded``: a client's close runs in a task of its own, waited for at most a given
  time. aetcd's watcher catches the CancelledError of the stream task it awaits on close, so a
  timeout around the close could be swallowed and the caller would wait on nothing.
- Tasks that wait on aetcd stop through ``runtime.tasks.cancel_and_wait`` (cancel until done):
  Python 3.11's ``asyncio.wait_for`` in aetcd's watch creation drops a cancellation that lands
  as its inner wait completes.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import aetcd
import aetcd.exceptions

log = logging.getLogger("turbine.runtime")

# gRPC channel: reconnect within 1 s of etcd coming back; ping an open stream every 10 s (etcd
# refuses pings more often than every 5 s) so a peer that vanished without a FIN is noticed.
_CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 0,
    "grpc.http2.max_pings_without_data": 0,
}
ERRORS = (aetcd.exceptions.ClientError, asyncio.TimeoutError, OSError)  # etcd out of reach, or refusing


teardowns: set[asyncio.Task[None]] = set()  # client closes that outlived their wait (kept referenced)


async def close_bounded(client: aetcd.Client, timeout_s: float) -> None:
    """Close an aetcd client, waiting at most ``timeout_s``. The close runs in a task of its own:
    aetcd's watcher swallows a CancelledError while it waits for its stream task, so a close
    cancelled by a timeout could go on waiting on nothing; a close that outlives the wait is
    cancelled and left to finish in the background."""
    task = asyncio.ensure_future(client.close())
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except BaseException:
        done = set()
        raise
    finally:
        if not done:
            task.cancel()
            teardowns.add(task)
            task.add_done_callback(_forget)
    if done and not task.cancelled() and task.exception() is not None:
        log.debug("etcd: closing a client: %r", task.exception())


def _forget(task: asyncio.Task[None]) -> None:
    teardowns.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: a close that failed late is of no interest


class Connection:
    """One aetcd client at a time over a list of endpoints. ``failed()`` drops the client (a new
    one, with a new channel and watcher, replaces it) and moves to the next endpoint."""

    def __init__(self, endpoints: Sequence[tuple[str, int]], timeout_s: float) -> None:
        self.endpoints = list(endpoints)
        self.timeout_s = timeout_s
        self._i = 0
        self._client: aetcd.Client | None = None

    @property
    def endpoint(self) -> str:
        host, port = self.endpoints[self._i]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def get(self) -> aetcd.Client:
        if self._client is None:
            host, port = self.endpoints[self._i]
            self._client = aetcd.Client(host=f"[{host}]" if ":" in host else host, port=port,
                                        timeout=self.timeout_s, options=dict(_CHANNEL_OPTIONS))
        return self._client

    async def failed(self) -> None:
        await self.close()
        self._i = (self._i + 1) % len(self.endpoints)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await close_bounded(client, max(1.0, self.timeout_s))


def lease_not_found(e: BaseException) -> bool:
    return isinstance(e, aetcd.exceptions.ClientError) and "lease not found" in str(e)


def text(e: BaseException) -> str:
    """An error as one short line for the log."""
    if isinstance(e, TimeoutError):
        return "timed out"
    return f"{type(e).__name__}: {e}"[:300]
