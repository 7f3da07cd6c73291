"""A small HTTP/1.1 server on httptools + asyncio Protocols, built for streaming SSE cheaply.

Why not a framework: the frontend's hot path is "parse one JSON POST, then write many tiny SSE
chunks". A Protocol that writes straight to the transport costs a few microseconds per chunk;
generic ASGI stacks add an order of magnitude. httptools (the parser uvicorn uses) does the
parsing; this module frames responses, keeps connections alive, applies write back-pressure,
cancels the handler when the client goes away, and bounds what a client may cost:

- every input has a limit checked before it is buffered (``HttpLimits``: URL, header count and
  bytes, body bytes, pipelined requests per connection); over it the client gets a 4xx and the
  connection closes;
- every wait has a timeout, enforced by one sweep per server (not a timer per read): headers must
  arrive within ``header_timeout_s``, an unfinished request may not go silent for longer than
  ``read_timeout_s``, an idle keep-alive connection lives ``keepalive_timeout_s``, and a client
  that stops reading a response is dropped after ``write_timeout_s``;
- connections are capped (``max_connections``, by default from the file-descriptor limit): at
  the cap the longest-idle keep-alive connection is closed to admit a new one, and when every
  connection is busy the newcomer gets a 503 instead of starving on a file descriptor;
- ``drain()`` stops accepting, lets running requests finish (answering them with
  ``connection: close``) and only then closes connections.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus

import httptools

from turbine.frontend.errors import error_body

log = logging.getLogger("turbine.http")

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
SWEEP_S = 0.5  # how often timeouts are checked
DRAIN_IDLE_S = 1.0  # while draining, a keep-alive connection idle this long is closed
FD_RESERVE = 256  # descriptors kept back from the connection cap for workers, events and files


@dataclass(frozen=True)
class HttpLimits:
    """What one client may cost the server. Sizes in bytes, times in seconds."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_url_bytes: int = 8 * 1024
    max_header_bytes: int = 64 * 1024  # request line and headers together
    max_headers: int = 100
    max_pipelined: int = 8  # parsed requests queued behind the running one; reading pauses beyond
    header_timeout_s: float = 15.0
    read_timeout_s: float = 30.0
    keepalive_timeout_s: float = 30.0
    write_timeout_s: float = 60.0
    max_connections: int | None = None  # None: from the process's file-descriptor limit

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_url_bytes", "max_header_bytes", "max_headers", "max_pipelined"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("header_timeout_s", "read_timeout_s", "keepalive_timeout_s", "write_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")


def connection_cap(limits: HttpLimits) -> int:
    """The connection cap: as configured, or what the descriptor limit leaves after a reserve.

    The soft descriptor limit is raised to the hard one first (servers commonly start with 1024).
    """
    if limits.max_connections is not None:
        return limits.max_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft == resource.RLIM_INFINITY:
        return 65536
    if soft > 2 * FD_RESERVE:
        return min(65536, soft - FD_RESERVE)
    return max(8, soft // 2)


class HttpRequest:
    __slots__ = ("method", "path", "query", "headers", "body", "keep_alive", "http10", "path_arg", "model")

    def __init__(self, method: str, url: bytes, headers: dict[str, str], body: bytes, keep_alive: bool,
                 http10: bool = False):
        self.method = method
        parsed = httptools.parse_url(url)
        self.path = parsed.path.decode("latin-1")
        self.query = parsed.query.decode("latin-1") if parsed.query else ""
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.http10 = http10
        self.path_arg = ""  # the {name} segment of a templated route
        self.model = ""  # the model a request named, once known (for metrics)


Handler = Callable[[HttpRequest, "HttpResponse"], Awaitable[None]]


class ClientDisconnected(ConnectionError):
    """The client closed the connection while we were writing to it."""


class HttpResponse:
    """Writes one response on a connection: either ``send`` whole, or ``start_stream`` + chunks.

    HEAD requests get the head only; HTTP/1.0 clients get a streamed body without chunked
    encoding (which they do not know), delimited by closing the connection.
    """

    __slots__ = ("_conn", "_keep_alive", "_head_only", "_chunked", "started", "finished", "status")

    def __init__(self, conn: _HttpConnection, keep_alive: bool, head_only: bool = False, http10: bool = False):
        self._conn = conn
        self._keep_alive = keep_alive
        self._head_only = head_only
        self._chunked = not http10
        self.started = False
        self.finished = False
        self.status = 0

    @property
    def disconnected(self) -> bool:
        return self._conn.closed

    @property
    def keep_alive(self) -> bool:
        return self._keep_alive and not self._conn.server.draining

    def _head(self, status: int, content_type: str, extra: list[tuple[str, str]] | None, length: int | None) -> bytearray:
        self.status = status
        head = bytearray(b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown")))
        head += b"content-type: " + content_type.encode() + b"\r\n"
        if length is not None:
            head += b"content-length: %d\r\n" % length
        elif self._chunked:
            head += b"transfer-encoding: chunked\r\n"
        else:
            self._keep_alive = False  # an HTTP/1.0 stream ends when the connection does
        if not self.keep_alive:
            self._keep_alive = False
            head += b"connection: close\r\n"
        head += self._conn.server.date_header
        for k, v in extra or ():
            head += k.encode("latin-1") + b": " + v.encode("latin-1") + b"\r\n"
        head += b"\r\n"
        return head

    def send(self, status: int, body: bytes, content_type: str = "application/json",
             headers: list[tuple[str, str]] | None = None) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = self.finished = True
        head = self._head(status, content_type, headers, len(body))
        self._conn.write(bytes(head) if self._head_only else bytes(head + body))

    def start_stream(self, status: int = 200, content_type: str = "text/event-stream",
                     headers: list[tuple[str, str]] | None = None) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        extra = [("cache-control", "no-cache")] + list(headers or ())
        self._conn.write(bytes(self._head(status, content_type, extra, None)))

    def write_chunk(self, data: bytes) -> None:
        """Queue one chunk; call ``drain()`` now and then so a slow client applies back-pressure."""
        if data:
            self._conn.write(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)

    def end_stream(self) -> None:
        if not self.finished:
            self.finished = True
            if self._chunked:
                self._conn.write(b"0\r\n\r\n")

    async def drain(self) -> None:
        await self._conn.drain()


class _HttpConnection(asyncio.Protocol):
    def __init__(self, server: HttpServer):
        self.server = server
        self.limits = server.limits
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self._url = b""
        self._headers: dict[str, str] = {}
        self._n_headers = 0
        self._head_bytes = 0  # bytes received since the request began, until its headers ended
        self._in_head = False
        self._body: list[bytes] = []
        self._body_len = 0
        self._rejecting = False
        self._reject_after: tuple[int, str, list[tuple[str, str]] | None] | None = None
        self._pending: deque[HttpRequest] = deque()
        self._task: asyncio.Task[None] | None = None
        self._paused = False
        self._reading_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        now = time.monotonic()
        self._request_started: float | None = None  # a request is partly received since then
        self._last_read = now
        self._idle_since: float | None = now  # no request running or partly received
        self._paused_since = 0.0

    # --- transport callbacks -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self.server.admit(self):
            self.closed = True
            self.server.refused += 1
            transport.write(self.server.overload_response)  # type: ignore[attr-defined]
            transport.close()
            return
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.forget(self)
        self._pending.clear()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._wake_drain(ClientDisconnected("client disconnected"))

    def data_received(self, data: bytes) -> None:
        if self._rejecting or self.closed:
            return
        self._last_read = time.monotonic()
        if self._request_started is None:
            self._request_started = self._last_read
            self._idle_since = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(400, "protocol upgrade is not supported")
        except httptools.HttpParserError as e:
            self._reject(400, f"malformed HTTP request: {e}")
        if self._in_head and not self._rejecting:
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._reject(431, f"request headers larger than {self.limits.max_header_bytes} bytes")

    def pause_writing(self) -> None:
        self._paused = True
        self._paused_since = time.monotonic()

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drain(None)

    # --- parser callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._n_headers = 0
        self._head_bytes = 0
        self._in_head = True
        self._body = []
        self._body_len = 0
        if self._request_started is None:
            self._request_started = time.monotonic()

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.limits.max_url_bytes:
            self._reject(414, f"request URL longer than {self.limits.max_url_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._n_headers += 1
        if self._n_headers > self.limits.max_headers:
            self._reject(431, f"more than {self.limits.max_headers} request headers")
            return
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._rejecting:
            return
        length = self._headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limits.max_body_bytes:
            self._reject(413, f"request body larger than {self.limits.max_body_bytes} bytes")
            return
        expect = self._headers.get("expect")
        if expect is not None:
            if expect.lower() != "100-continue":
                self._reject(417, f"unsupported expectation {expect!r}")
            elif self.transport is not None and self.parser.get_http_version() != "1.0":
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._rejecting:
            return
        self._body_len += len(body)
        if self._body_len > self.limits.max_body_bytes:
            self._reject(413, f"request body larger than {self.limits.max_body_bytes} bytes")
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._rejecting:
            return
        self._request_started = None
        req = HttpRequest(
            self.parser.get_method().decode("latin-1"),
            self._url,
            self._headers,
            b"".join(self._body),
            self.parser.should_keep_alive(),
            self.parser.get_http_version() == "1.0",
        )
        self._body = []
        self._pending.append(req)
        if self._task is None:
            self._next()
        elif len(self._pending) >= self.limits.max_pipelined and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    # --- request dispatch ----------------------------------------------------------------
    def _next(self) -> None:
        if self.closed:
            self._task = None
            return
        if self._reading_paused and len(self._pending) < self.limits.max_pipelined:
            self._reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        if not self._pending:
            self._task = None
            if self._reject_after is not None:
                self._send_reject(*self._reject_after)
            elif self._request_started is None:
                self._idle_since = time.monotonic()
            return
        req = self._pending.popleft()
        self._idle_since = None
        self._task = asyncio.get_running_loop().create_task(self._run(req))

    async def _run(self, req: HttpRequest) -> None:
        resp = HttpResponse(self, req.keep_alive, head_only=req.method == "HEAD", http10=req.http10)
        try:
            await self.server.handler(req, resp)
        except (asyncio.CancelledError, ClientDisconnected):
            self._close()
            return
        except Exception:  # a bug in a handler must not take the connection silently
            log.exception("unhandled error serving %s %s", req.method, req.path)
            if not resp.started:
                resp.send(500, error_body(500, "internal server error"))
            else:
                self._close()
                return
        if not resp.finished:
            resp.end_stream() if resp.started else resp.send(500, b"")
        if not resp.keep_alive:
            self._close()
            return
        self._next()

    # --- writing ------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise ClientDisconnected("client disconnected")
        self.transport.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise ClientDisconnected("client disconnected")
        if not self._paused:
            return
        self._drain_waiter = asyncio.get_running_loop().create_future()
        await self._drain_waiter

    def _wake_drain(self, exc: Exception | None) -> None:
        w, self._drain_waiter = self._drain_waiter, None
        if w is not None and not w.done():
            w.set_exception(exc) if exc else w.set_result(None)

    def _reject(self, status: int, message: str, headers: list[tuple[str, str]] | None = None) -> None:
        """Answer a request we will not read further (after the running one, if any), then close."""
        if self._rejecting:
            return
        self._rejecting = True
        self._in_head = False
        self.server.rejected[status] = self.server.rejected.get(status, 0) + 1
        if self._task is None and not self._pending:
            self._send_reject(status, message, headers)
        else:  # requests parsed before this one are answered first
            self._reject_after = (status, message, headers)
            if not self._reading_paused and self.transport is not None:
                self._reading_paused = True
                self.transport.pause_reading()

    def _send_reject(self, status: int, message: str, headers: list[tuple[str, str]] | None) -> None:
        if self.transport is not None and not self.closed:
            with contextlib.suppress(ClientDisconnected):
                HttpResponse(self, keep_alive=False).send(status, error_body(status, message), headers=headers)
        self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # --- timeouts (called by the server's sweep) -----------------------------------------
    def check(self, now: float) -> None:
        lim = self.limits
        if self._paused and self._task is not None and now - self._paused_since > lim.write_timeout_s:
            log.info("closing a connection whose client stopped reading for %.0f s", lim.write_timeout_s)
            self.server.timeouts["write"] += 1
            if self.transport is not None:
                self.transport.abort()
            return
        started = self._request_started
        if started is not None and not self._rejecting:
            if self._in_head and now - started > lim.header_timeout_s:
                self.server.timeouts["header"] += 1
                self._reject(408, f"request headers not received within {lim.header_timeout_s:g} s")
            elif now - self._last_read > lim.read_timeout_s:
                self.server.timeouts["read"] += 1
                self._reject(408, f"request not received: no data for {lim.read_timeout_s:g} s")
            return
        idle = self._idle_since
        if idle is not None:
            limit = DRAIN_IDLE_S if self.server.draining else lim.keepalive_timeout_s
            if now - idle > limit:
                if not self.server.draining:
                    self.server.timeouts["keepalive"] += 1
                self._close()


class HttpServer:
    def __init__(self, handler: Handler, *, host: str = "127.0.0.1", port: int = 0,
                 limits: HttpLimits | None = None, reuse_port: bool = False,
                 ssl_context: ssl.SSLContext | None = None):
        self.handler = handler
        self.host = host
        self.port = port
        self.limits = limits or HttpLimits()
        self.reuse_port = reuse_port
        self.ssl_context = ssl_context
        self.max_connections = connection_cap(self.limits)
        self.connections: set[_HttpConnection] = set()
        self.draining = False
        self.refused = 0  # connections turned away at the cap
        self.rejected: dict[int, int] = {}  # requests refused before a handler ran, by status
        self.timeouts = {"header": 0, "read": 0, "keepalive": 0, "write": 0}
        self._server: asyncio.base_events.Server | None = None
        self._sweep_task: asyncio.Task[None] | None = None
        self._emptied: asyncio.Event | None = None
        self.date_header = b""
        self._date_at = 0.0
        self._refresh_date()
        self.overload_response = (
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"retry-after: 1\r\ncontent-length: %d\r\n\r\n%b")
        body = error_body(503, "the server is at its connection limit; retry later")
        self.overload_response = self.overload_response % (len(body), body)

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    def _refresh_date(self) -> None:
        self.date_header = b"date: " + formatdate(usegmt=True).encode() + b"\r\n"

    # --- connection admission -------------------------------------------------------------
    def admit(self, conn: _HttpConnection) -> bool:
        """Room for one more connection: at the cap, close the longest-idle one, or refuse."""
        if len(self.connections) < self.max_connections:
            return True
        idle = [c for c in self.connections if c._idle_since is not None and not c.closed]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c._idle_since)  # type: ignore[arg-type, return-value]
        self.connections.discard(victim)  # its fd is released by close(); admit the newcomer now
        victim._close()
        return True

    def forget(self, conn: _HttpConnection) -> None:
        self.connections.discard(conn)
        if not self.connections and self._emptied is not None:
            self._emptied.set()

    # --- lifecycle --------------------------------------------------------------------------
    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _HttpConnection(self), self.host, self.port,
            reuse_port=self.reuse_port or None, backlog=2048, ssl=self.ssl_context,
            ssl_handshake_timeout=self.limits.header_timeout_s if self.ssl_context else None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweep_task = loop.create_task(self._sweep())
        return self.port

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            now = time.monotonic()
            if now - self._date_at >= 1.0:
                self._date_at = now
                self._refresh_date()
            for c in list(self.connections):
                c.check(now)

    def _stop_listening(self) -> None:
        """Close the listening socket. With SO_REUSEPORT a sibling keeps the port; connections
        already queued on this socket (not yet accepted) are reset by the kernel unless
        net.ipv4.tcp_migrate_req=1 moves them to the sibling."""
        if self._server is not None:
            self._server.close()

    async def drain(self, grace_s: float) -> int:
        """Stop accepting; let requests finish for ``grace_s``; returns how many were cut off."""
        self.draining = True
        self._stop_listening()
        self._emptied = asyncio.Event()  # idle connections close after DRAIN_IDLE_S (the sweep)
        if self.connections:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    await self._emptied.wait()
        busy = sum(1 for c in self.connections if c._task is not None)
        await self.stop()
        return busy

    async def stop(self) -> None:
        self.draining = True
        if self._sweep_task is not None:
            self._sweep_task.cancel()
            with contextlib.suppress(BaseException):
                await self._sweep_task
            self._sweep_task = None
        if self._server is not None:
            self._server.close()
            for c in list(self.connections):
                c._close()
            await self._server.wait_closed()
            self._server = None
