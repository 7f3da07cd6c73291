"""A small HTTP/1.1 server on httptools + asyncio Protocols, built for streaming SSE cheaply.

Why not a framework: the frontend's hot path is "parse one JSON POST, then write many tiny SSE
chunks". A Protocol that writes straight to the transport costs a few microseconds per chunk;
generic ASGI stacks add an order of magnitude. httptools (the parser uvicorn uses) does the
parsing; this module only frames responses, keeps connections alive, enforces a body limit,
applies write back-pressure, and cancels the handler when the client goes away.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus

import httptools

log = logging.getLogger("turbine.http")

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


class HttpRequest:
    __slots__ = ("method", "path", "query", "headers", "body", "keep_alive")

    def __init__(self, method: str, url: bytes, headers: dict[str, str], body: bytes, keep_alive: bool):
        self.method = method
        parsed = httptools.parse_url(url)
        self.path = parsed.path.decode("latin-1")
        self.query = parsed.query.decode("latin-1") if parsed.query else ""
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive


Handler = Callable[[HttpRequest, "HttpResponse"], Awaitable[None]]


class ClientDisconnected(ConnectionError):
    """The client closed the connection while we were writing to it."""


class HttpResponse:
    """Writes one response on a connection: either ``send`` whole, or ``start_stream`` + chunks."""

    __slots__ = ("_conn", "_keep_alive", "started", "finished")

    def __init__(self, conn: _HttpConnection, keep_alive: bool):
        self._conn = conn
        self._keep_alive = keep_alive
        self.started = False
        self.finished = False

    @property
    def disconnected(self) -> bool:
        return self._conn.closed

    def _head(self, status: int, content_type: str, extra: list[tuple[str, str]] | None, length: int | None) -> bytearray:
        head = bytearray(b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown")))
        head += b"content-type: " + content_type.encode() + b"\r\n"
        if length is None:
            head += b"transfer-encoding: chunked\r\n"
        else:
            head += b"content-length: %d\r\n" % length
        if not self._keep_alive:
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
        self._conn.write(bytes(head + body))

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
            self._conn.write(b"%x\r\n%b\r\n" % (len(data), data))

    def end_stream(self) -> None:
        if not self.finished:
            self.finished = True
            self._conn.write(b"0\r\n\r\n")

    async def drain(self) -> None:
        await self._conn.drain()


class _HttpConnection(asyncio.Protocol):
    def __init__(self, server: HttpServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_len = 0
        self._rejecting = False
        self._pending: deque[HttpRequest] = deque()
        self._task: asyncio.Task[None] | None = None
        self._paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    # --- transport callbacks -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self._pending.clear()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._wake_drain(ClientDisconnected("client disconnected"))

    def data_received(self, data: bytes) -> None:
        if self._rejecting:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject(400, "protocol upgrade is not supported")
        except httptools.HttpParserError as e:
            self._reject(400, f"malformed HTTP request: {e}")

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drain(None)

    # --- parser callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []
        self._body_len = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        length = self._headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.server.max_body_bytes:
            self._reject(413, f"request body larger than {self.server.max_body_bytes} bytes")

    def on_body(self, body: bytes) -> None:
        if self._rejecting:
            return
        self._body_len += len(body)
        if self._body_len > self.server.max_body_bytes:
            self._reject(413, f"request body larger than {self.server.max_body_bytes} bytes")
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._rejecting:
            return
        req = HttpRequest(
            self.parser.get_method().decode("latin-1"),
            self._url,
            self._headers,
            b"".join(self._body),
            self.parser.should_keep_alive(),
        )
        self._pending.append(req)
        if self._task is None:
            self._next()

    # --- request dispatch ----------------------------------------------------------------
    def _next(self) -> None:
        if self.closed or not self._pending:
            self._task = None
            return
        req = self._pending.popleft()
        self._task = asyncio.get_running_loop().create_task(self._run(req))

    async def _run(self, req: HttpRequest) -> None:
        resp = HttpResponse(self, req.keep_alive)
        try:
            await self.server.handler(req, resp)
        except (asyncio.CancelledError, ClientDisconnected):
            self._close()
            return
        except Exception:  # a bug in a handler must not take the connection silently
            log.exception("unhandled error serving %s %s", req.method, req.path)
            if not resp.started:
                resp.send(500, b'{"error":{"message":"internal server error","type":"server_error","param":null,"code":500}}')
            else:
                self._close()
                return
        if not resp.finished:
            resp.end_stream() if resp.started else resp.send(500, b"")
        if not req.keep_alive:
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

    def _reject(self, status: int, message: str) -> None:
        """Answer a request we will not parse further, then close the connection."""
        self._rejecting = True
        if self.transport is not None and not self.closed and self._task is None:
            from turbine.frontend.errors import error_body  # local: keeps this module standalone

            resp = HttpResponse(self, keep_alive=False)
            resp.send(status, error_body(status, message))
        self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class HttpServer:
    def __init__(self, handler: Handler, *, host: str = "127.0.0.1", port: int = 8000,
                 max_body_bytes: int = 32 * 1024 * 1024, reuse_port: bool = False):
        self.handler = handler
        self.host = host
        self.port = port
        self.max_body_bytes = max_body_bytes
        self.reuse_port = reuse_port
        self.connections: set[_HttpConnection] = set()
        self._server: asyncio.base_events.Server | None = None
        self._date_task: asyncio.Task[None] | None = None
        self.date_header = b""
        self._refresh_date()

    def _refresh_date(self) -> None:
        self.date_header = b"date: " + formatdate(usegmt=True).encode() + b"\r\n"

    async def _date_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._refresh_date()

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _HttpConnection(self), self.host, self.port,
            reuse_port=self.reuse_port or None, backlog=2048,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._date_task = loop.create_task(self._date_loop())
        return self.port

    async def stop(self) -> None:
        if self._date_task is not None:
            self._date_task.cancel()
        if self._server is not None:
            self._server.close()
            for c in list(self.connections):
                c._close()
            await self._server.wait_closed()
            self._server = None
