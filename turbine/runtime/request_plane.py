"""Request plane: streaming RPC interfaces, errors, and the stream semantics every transport shares.

A call is one request payload answered by a stream of response payloads::

    client.stream(address, "generate", payload)  ──Request──▶  handler(payload, ctx)
          async for chunk in ...                 ◀──Data*───   yield chunk
                                                 ◀──End | Error

Both transports (``tcp.py``, ``inproc.py``) move frames differently but run handlers and deliver
results through the two shared pieces below, so cancellation, deadlines and errors behave the
same on both: ``ServerCore`` runs handlers on the server side, ``client_stream`` is the client's
async generator.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Literal, Protocol

log = logging.getLogger("turbine.runtime")

DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
# How long stop() waits for cancelled handlers to finish their cleanup before giving up on them.
SHUTDOWN_CANCEL_WAIT_S = 5.0

CancelReason = Literal["client", "deadline", "shutdown"]


# --- errors --------------------------------------------------------------------------------------
class RequestPlaneError(Exception):
    """Base of the errors a client raises while iterating a stream. ``code`` is the wire code."""

    code = "error"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


class RemoteError(RequestPlaneError):
    """The handler raised; ``message`` is ``"<ExceptionType>: <text>"`` from the server."""

    code = "remote"


class UnknownEndpoint(RequestPlaneError):
    code = "unknown_endpoint"


class DeadlineExceeded(RequestPlaneError, TimeoutError):
    """The stream's timeout passed; the server has cancelled (or is cancelling) the handler."""

    code = "deadline"


class FrameTooLarge(RequestPlaneError, ValueError):
    """A payload exceeded the transport's max frame size (request or response side)."""

    code = "frame_too_large"


class WorkerUnavailable(RequestPlaneError, ConnectionError):
    """The request never started: connection refused, no such server, or the server is stopping.

    Safe to retry on another worker.
    """

    code = "unavailable"


class StreamBroken(WorkerUnavailable):
    """The connection was lost after the request was sent (the worker died or stopped).

    The handler may have run partially; a retry must account for what was already received.
    """

    code = "broken"


_ERRORS: dict[str, type[RequestPlaneError]] = {
    c.code: c for c in (RemoteError, UnknownEndpoint, DeadlineExceeded, FrameTooLarge, WorkerUnavailable,
                        StreamBroken)
}


def error_from_code(code: str, message: str) -> RequestPlaneError:
    """The client-side exception for an Error frame; unknown codes become RemoteError."""
    return _ERRORS.get(code, RemoteError)(message)


# --- interfaces ----------------------------------------------------------------------------------
class RequestContext:
    """What a handler knows about its call besides the payload.

    ``deadline`` is ``time.monotonic()`` seconds (None = no deadline). Cancellation (client gone,
    deadline passed, server stopping) also cancels the handler's task, so a handler usually only
    needs ``try/finally``; ``cancelled``/``wait_cancelled()`` serve work running elsewhere.
    """

    __slots__ = ("stream_id", "request_id", "endpoint", "deadline", "_reason", "_event")

    def __init__(self, *, stream_id: int, request_id: str, endpoint: str, deadline: float | None) -> None:
        self.stream_id = stream_id  # unique per connection (per client for in-process)
        self.request_id = request_id  # unique per server, for logs
        self.endpoint = endpoint
        self.deadline = deadline
        self._reason: CancelReason | None = None
        self._event: asyncio.Event | None = None

    @property
    def cancelled(self) -> bool:
        return self._reason is not None

    @property
    def cancel_reason(self) -> CancelReason | None:
        return self._reason

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    async def wait_cancelled(self) -> CancelReason:
        if self._reason is None:
            if self._event is None:
                self._event = asyncio.Event()
            await self._event.wait()
        assert self._reason is not None
        return self._reason

    def _cancel(self, reason: CancelReason) -> bool:
        """Record the first reason; True when this call cancelled it."""
        if self._reason is not None:
            return False
        self._reason = reason
        if self._event is not None:
            self._event.set()
        return True

    def __repr__(self) -> str:
        return f"RequestContext(request_id={self.request_id!r}, endpoint={self.endpoint!r}, reason={self._reason})"


Handler = Callable[[bytes, RequestContext], AsyncIterator[bytes]]


class RequestPlaneServer(Protocol):
    def register(self, endpoint: str, handler: Handler) -> None: ...

    async def start(self) -> str: ...

    async def drain(self, grace_s: float) -> None: ...

    async def stop(self, grace_s: float = 0.0) -> None: ...


class RequestPlaneClient(Protocol):
    def stream(self, address: str, endpoint: str, payload: bytes, *,
               timeout: float | None = None) -> AsyncGenerator[bytes, None]: ...

    async def close(self) -> None: ...


# --- server side ---------------------------------------------------------------------------------
class StreamSink(Protocol):
    """Where a running handler's frames go (one per stream)."""

    @property
    def paused(self) -> bool: ...  # the transport's write buffer is over its high-water mark

    async def drain(self) -> None: ...

    def data(self, payload: bytes) -> None: ...  # may raise FrameTooLarge

    def end(self) -> None: ...

    def error(self, code: str, message: str) -> None: ...


class ActiveStream:
    """One running handler: its context, task and deadline timer."""

    __slots__ = ("ctx", "sink", "task", "timer")

    def __init__(self, ctx: RequestContext, sink: StreamSink) -> None:
        self.ctx = ctx
        self.sink = sink
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None

    def cancel(self, reason: CancelReason) -> None:
        if self.ctx._cancel(reason) and self.task is not None and not self.task.done():
            self.task.cancel()


class ServerCore:
    """Endpoint table and the handler tasks of one server; transports feed it requests."""

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if max_frame_bytes <= 0:
            raise ValueError(f"max_frame_bytes must be positive, got {max_frame_bytes}")
        self.max_frame_bytes = max_frame_bytes
        self.handlers: dict[str, Handler] = {}
        self.active: set[ActiveStream] = set()
        self.draining = False
        self._ids = itertools.count(1)

    def register(self, endpoint: str, handler: Handler) -> None:
        if not isinstance(endpoint, str) or not endpoint:
            raise ValueError(f"endpoint must be a non-empty string, got {endpoint!r}")
        if not callable(handler):
            raise TypeError(f"handler for {endpoint!r} is not callable")
        if endpoint in self.handlers:
            raise ValueError(f"endpoint {endpoint!r} is already registered")
        self.handlers[endpoint] = handler

    def open(self, stream_id: int, endpoint: str, payload: bytes, deadline: float | None,
             sink: StreamSink) -> ActiveStream | None:
        """Start the handler for one request, or answer with an Error frame and return None."""
        handler = self.handlers.get(endpoint)
        if handler is None:
            sink.error(UnknownEndpoint.code, f"no endpoint {endpoint!r} on this server")
            return None
        if self.draining:
            sink.error(WorkerUnavailable.code, "server is shutting down")
            return None
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            sink.error(DeadlineExceeded.code, "deadline passed before the handler started")
            return None
        ctx = RequestContext(stream_id=stream_id, request_id=str(next(self._ids)), endpoint=endpoint,
                             deadline=deadline)
        st = ActiveStream(ctx, sink)
        loop = asyncio.get_running_loop()
        st.task = loop.create_task(_run_handler(handler, payload, ctx, sink))
        if remaining is not None:
            st.timer = loop.call_later(remaining, st.cancel, "deadline")
        self.active.add(st)
        st.task.add_done_callback(lambda _t, st=st: self._finished(st))  # type: ignore[misc]
        return st

    def _finished(self, st: ActiveStream) -> None:
        self.active.discard(st)
        if st.timer is not None:
            st.timer.cancel()

    async def drain(self, grace_s: float) -> None:
        """Refuse new requests (WorkerUnavailable: callers retry elsewhere) and wait up to
        ``grace_s`` for the running ones to finish."""
        self.draining = True
        if grace_s > 0 and self.active:
            await asyncio.wait([s.task for s in self.active if s.task is not None], timeout=grace_s)

    async def shutdown(self, grace_s: float = 0.0) -> None:
        """Refuse new requests, let running ones finish for ``grace_s``, then cancel the rest."""
        await self.drain(grace_s)
        for st in list(self.active):
            st.cancel("shutdown")
        tasks = [s.task for s in self.active if s.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=SHUTDOWN_CANCEL_WAIT_S)
            if pending:
                log.warning("%d request handlers ignored cancellation for %.0f s", len(pending),
                            SHUTDOWN_CANCEL_WAIT_S)


_TERMINAL_ON_CANCEL: dict[str, tuple[str, str] | None] = {
    "client": None,  # nobody is listening any more
    "deadline": (DeadlineExceeded.code, "deadline exceeded"),
    "shutdown": (StreamBroken.code, "server stopped while the request was running"),
}


async def _run_handler(handler: Handler, payload: bytes, ctx: RequestContext, sink: StreamSink) -> None:
    """Drive one handler; always ends the stream with exactly one End or Error (or nothing if the
    client cancelled) and always closes the handler's generator."""
    agen: Any = None
    outcome: tuple[str, str] | None = None
    try:
        agen = handler(payload, ctx)
        async for chunk in agen:
            if ctx._reason is not None:
                break  # the handler swallowed its cancellation; aclose() below stops it at this yield
            if type(chunk) is not bytes:
                if not isinstance(chunk, (bytearray, memoryview)):
                    raise TypeError(f"handler for {ctx.endpoint!r} yielded {type(chunk).__name__}, expected bytes")
                chunk = bytes(chunk)
            sink.data(chunk)
            if sink.paused:
                await sink.drain()
        if ctx._reason is None:
            sink.end()
            return
    except asyncio.CancelledError:
        if ctx._reason is None:
            raise  # not ours (the loop is shutting down)
    except (FrameTooLarge, DeadlineExceeded) as e:
        outcome = (e.code, str(e))
    except Exception as e:  # noqa: BLE001 - any handler failure goes back to the caller
        log.debug("handler %s failed", ctx.endpoint, exc_info=True)
        outcome = (RemoteError.code, f"{type(e).__name__}: {e}")
    finally:
        if ctx._reason is not None:
            outcome = _TERMINAL_ON_CANCEL[ctx._reason]
        if outcome is not None:
            sink.error(*outcome)
        aclose = getattr(agen, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:  # noqa: BLE001
                log.warning("handler %s failed while closing", ctx.endpoint, exc_info=True)


# --- client side ---------------------------------------------------------------------------------
class StreamHandle(Protocol):
    def cancel(self, deadline: bool) -> None:
        """Tell the server to stop this stream and forget it locally (idempotent)."""
        ...


class StreamReceiver:
    """Client-side buffer of one stream: the transport pushes, the consumer awaits."""

    __slots__ = ("items", "error", "done", "_waiter", "_timer", "handle")

    def __init__(self) -> None:
        self.items: deque[bytes] = deque()
        self.error: RequestPlaneError | None = None
        self.done = False
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.handle: StreamHandle | None = None

    def push(self, payload: bytes) -> None:
        self.items.append(payload)
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def finish(self, error: RequestPlaneError | None = None) -> None:
        """End of stream (``error`` None) or failure; frames after this are ignored."""
        if self.done:
            return
        self.done = True
        self.error = error
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    async def wait(self) -> None:
        w = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await w
        finally:
            self._waiter = None

    def arm(self, deadline: float | None) -> None:
        if deadline is not None:
            delay = max(0.0, deadline - time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(delay, self._expire)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        if not self.done:
            self.finish(DeadlineExceeded("deadline exceeded"))
            if self.handle is not None:
                self.handle.cancel(True)


async def client_stream(open_stream: Callable[[StreamReceiver], Awaitable[StreamHandle]],
                        deadline: float | None) -> AsyncGenerator[bytes, None]:
    """The async generator behind every transport's ``stream()``.

    The request is sent on the first iteration. Buffered payloads are delivered before an end or
    error. Leaving early (aclose, break + GC, task cancellation, deadline) cancels the server side.
    """
    if deadline is not None and deadline <= time.monotonic():
        raise DeadlineExceeded("deadline passed before the request was sent")
    rx = StreamReceiver()
    rx.handle = await open_stream(rx)
    rx.arm(deadline)
    items = rx.items
    try:
        while True:
            if items:
                yield items.popleft()
            elif rx.done:
                if rx.error is not None:
                    raise rx.error
                return
            else:
                await rx.wait()
    finally:
        rx.disarm()
        if not rx.done:
            rx.done = True
            rx.handle.cancel(False)


def deadline_after(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if timeout != timeout or timeout < 0:  # NaN or negative
        raise ValueError(f"timeout must be None or >= 0, got {timeout}")
    return time.monotonic() + timeout


def check_payload(payload: Any, max_frame_bytes: int) -> bytes:
    """The request payload as bytes, or a clear error before anything is sent."""
    if type(payload) is not bytes:
        if not isinstance(payload, (bytearray, memoryview)):
            raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
        payload = bytes(payload)
    if len(payload) > max_frame_bytes:
        raise FrameTooLarge(f"request payload of {len(payload)} bytes exceeds the {max_frame_bytes}-byte frame limit")
    return payload


# --- scheme dispatch -----------------------------------------------------------------------------
class SchemeClient:
    """One client for every address scheme: ``tcp://`` via TcpClient, ``inproc://`` via InProcClient."""

    def __init__(self, **tcp_options: Any) -> None:
        self._tcp_options = tcp_options
        self._clients: dict[str, RequestPlaneClient] = {}

    def stream(self, address: str, endpoint: str, payload: bytes, *,
               timeout: float | None = None) -> AsyncGenerator[bytes, None]:
        scheme = address.partition("://")[0]
        client = self._clients.get(scheme)
        if client is None:
            if scheme == "tcp":
                from turbine.runtime.tcp import TcpClient
                client = TcpClient(**self._tcp_options)
            elif scheme == "inproc":
                from turbine.runtime.inproc import InProcClient
                client = InProcClient()
            else:
                raise ValueError(f"unsupported request-plane address {address!r} (want tcp:// or inproc://)")
            self._clients[scheme] = client
        return client.stream(address, endpoint, payload, timeout=timeout)

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            await c.close()


def make_client(**tcp_options: Any) -> SchemeClient:
    return SchemeClient(**tcp_options)


def make_server(kind: Literal["tcp", "inproc"] = "tcp", *, host: str = "127.0.0.1", port: int = 0,
                name: str | None = None, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                token: str | None = None) -> RequestPlaneServer:
    if kind == "tcp":
        from turbine.runtime.tcp import TcpServer
        return TcpServer(host=host, port=port, max_frame_bytes=max_frame_bytes, token=token)
    if kind == "inproc":
        from turbine.runtime.inproc import InProcServer
        return InProcServer(name, max_frame_bytes=max_frame_bytes)
    raise ValueError(f"unknown request-plane kind {kind!r} (want 'tcp' or 'inproc')")
