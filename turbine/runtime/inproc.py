"""The in-process request plane: the same servers and clients as TCP, without sockets.

Addresses are ``inproc://<name>``, resolved in a process-wide registry. Payloads are handed over
by reference (no encoding), but everything observable matches TCP: the same ``ServerCore`` runs
handlers and the same ``client_stream`` delivers results, so cancellation, deadlines, errors and
frame-size limits behave identically.
"""
from __future__ import annotations

import itertools
from collections.abc import AsyncGenerator

from turbine.runtime.request_plane import (
    DEFAULT_MAX_FRAME_BYTES,
    ActiveStream,
    FrameTooLarge,
    Handler,
    ServerCore,
    StreamBroken,
    StreamReceiver,
    WorkerUnavailable,
    check_payload,
    client_stream,
    deadline_after,
    error_from_code,
)

SCHEME = "inproc://"
_servers: dict[str, InProcServer] = {}
_names = itertools.count(1)


def parse_address(address: str) -> str:
    if not address.startswith(SCHEME) or len(address) == len(SCHEME):
        raise ValueError(f"malformed in-process address {address!r} (want inproc://name)")
    return address[len(SCHEME):]


class _Stream:
    """One call: the server's sink (output goes straight into the client's receiver) and the
    client's handle (cancel reaches the handler)."""

    __slots__ = ("rx", "client", "max_frame_bytes", "live", "active")
    paused = False

    def __init__(self, rx: StreamReceiver, client: InProcClient, max_frame_bytes: int) -> None:
        self.rx = rx
        self.client = client
        self.max_frame_bytes = max_frame_bytes
        self.live = True
        self.active: ActiveStream | None = None

    async def drain(self) -> None:
        return None

    def data(self, payload: bytes) -> None:
        if len(payload) > self.max_frame_bytes:
            raise FrameTooLarge(f"response payload of {len(payload)} bytes exceeds the "
                                f"{self.max_frame_bytes}-byte frame limit")
        if self.live:
            self.rx.push(payload)

    def end(self) -> None:
        if self.live:
            self.live = False
            self.client._open.discard(self)
            self.rx.finish()

    def error(self, code: str, message: str) -> None:
        if self.live:
            self.live = False
            self.client._open.discard(self)
            self.rx.finish(error_from_code(code, message))

    def cancel(self, deadline: bool) -> None:
        if self.live:
            self.live = False
            self.client._open.discard(self)
            if self.active is not None:
                self.active.cancel("deadline" if deadline else "client")


class InProcServer:
    """Serves registered endpoints at ``inproc://<name>`` (a unique name is chosen if None)."""

    def __init__(self, name: str | None = None, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if name is not None and (not name or "/" in name):
            raise ValueError(f"in-process server name must be non-empty without '/', got {name!r}")
        self.name = name
        self.address: str | None = None
        self._core = ServerCore(max_frame_bytes)
        self._stopped = False

    def register(self, endpoint: str, handler: Handler) -> None:
        self._core.register(endpoint, handler)

    async def start(self) -> str:
        if self.address is not None or self._stopped:
            raise RuntimeError("InProcServer.start() called twice")
        name = self.name
        if name is None:
            name = f"server-{next(_names)}"
            while name in _servers:
                name = f"server-{next(_names)}"
        elif name in _servers:
            raise ValueError(f"an in-process server named {name!r} is already running")
        self.name = name
        _servers[name] = self
        self.address = SCHEME + name
        return self.address

    @property
    def active_streams(self) -> set[ActiveStream]:
        return self._core.active

    async def drain(self, grace_s: float) -> None:
        """Refuse new calls (WorkerUnavailable) and wait up to ``grace_s`` for running ones."""
        await self._core.drain(grace_s)

    async def stop(self, grace_s: float = 0.0) -> None:
        """Unregister (new calls get WorkerUnavailable), let running handlers finish for
        ``grace_s``, then cancel the rest (their callers get StreamBroken)."""
        if self._stopped:
            return
        self._stopped = True
        if self.name is not None and _servers.get(self.name) is self:
            del _servers[self.name]
        await self._core.shutdown(grace_s)

    def _open(self, stream_id: int, endpoint: str, payload: bytes, deadline: float | None,
              rx: StreamReceiver, client: InProcClient) -> _Stream:
        stream = _Stream(rx, client, self._core.max_frame_bytes)
        client._open.add(stream)
        stream.active = self._core.open(stream_id, endpoint, payload, deadline, stream)
        return stream


class InProcClient:
    """Calls ``inproc://`` servers of this process."""

    def __init__(self, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._max_frame_bytes = max_frame_bytes
        self._open: set[_Stream] = set()
        self._ids = itertools.count(1)
        self._closed = False

    def stream(self, address: str, endpoint: str, payload: bytes, *,
               timeout: float | None = None) -> AsyncGenerator[bytes, None]:
        name = parse_address(address)
        payload = check_payload(payload, self._max_frame_bytes)
        deadline = deadline_after(timeout)

        async def open_stream(rx: StreamReceiver) -> _Stream:
            if self._closed:
                raise WorkerUnavailable("client is closed")
            server = _servers.get(name)
            if server is None:
                raise WorkerUnavailable(f"no in-process server at {address}")
            return server._open(next(self._ids), endpoint, payload, deadline, rx, self)

        return client_stream(open_stream, deadline)

    async def close(self) -> None:
        """Cancel every running call; their iterators end with StreamBroken."""
        self._closed = True
        for stream in list(self._open):
            stream.cancel(False)
            stream.rx.finish(StreamBroken("client closed"))
