"""The TCP request plane: length-prefixed msgpack frames, many streams per pooled connection.

Wire format, both directions::

    +-----------------+-------------------------------------------------+
    | u32 big-endian  | msgpack array  [tag, stream_id, fields...]      |
    | body length     | Request=0 Data=1 End=2 Error=3 Cancel=4         |
    +-----------------+-------------------------------------------------+

Writes are coalesced: frames are encoded straight into one buffer that is handed to the transport
once per event-loop iteration (sooner past ``FLUSH_BYTES``), so a token stream costs one syscall
per loop turn rather than one per frame. Handlers wait for the socket only when the transport is
over its high-water mark. ``Request.deadline_ms`` is the *remaining* budget, so clocks of the two
machines never need to agree.

Liveness and trust:

- A server sends ``Ping`` on a connection that has running streams but sent nothing for
  ``HEARTBEAT_S``. A client that hears nothing on a connection with open streams for
  ``stall_timeout_s`` fails them with ``StreamBroken`` (a frozen or unreachable peer: SIGSTOP, a
  dead link) and drops the connection, so callers migrate instead of waiting forever. A long
  prefill is not a stall: the peer's event loop keeps pinging.
- With a cluster token, a client's first frame is ``Hello(token)``; the server compares it in
  constant time and closes connections that do not present it, before reading anything larger
  than ``HELLO_MAX_BYTES``. Frames from a client are bounded by the server's
  ``max_frame_bytes``; a frame begun must keep arriving (``READ_STALL_S``); connections are capped.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import struct
import time
from collections.abc import AsyncGenerator
from typing import Any

import msgspec

from turbine.runtime.request_plane import (
    DEFAULT_MAX_FRAME_BYTES,
    ActiveStream,
    DeadlineExceeded,
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

log = logging.getLogger("turbine.runtime")

FLUSH_BYTES = 256 * 1024  # flush synchronously past this much buffered output
WRITE_HIGH_WATER = 1024 * 1024  # transport buffer size at which handlers wait for the socket
HEARTBEAT_S = 1.0  # a server pings a connection with running streams after this much silence
DEFAULT_STALL_TIMEOUT_S = 10.0  # a client gives up on a connection silent this long
READ_STALL_S = 30.0  # a frame begun must not go silent for longer (server side)
HELLO_MAX_BYTES = 4096  # the most a server reads from a client before it has shown the token
DEFAULT_MAX_CONNECTIONS = 4096


# --- frames --------------------------------------------------------------------------------------
class Request(msgspec.Struct, array_like=True, tag=0, gc=False):
    stream_id: int
    endpoint: str
    deadline_ms: int | None  # remaining budget when sent; None = no deadline
    payload: bytes


class Data(msgspec.Struct, array_like=True, tag=1, gc=False):
    stream_id: int
    payload: bytes


class End(msgspec.Struct, array_like=True, tag=2, gc=False):
    stream_id: int


class Error(msgspec.Struct, array_like=True, tag=3, gc=False):
    stream_id: int
    code: str
    message: str


class Cancel(msgspec.Struct, array_like=True, tag=4, gc=False):
    stream_id: int
    deadline: bool = False  # the client gave up because its deadline passed


class Ping(msgspec.Struct, array_like=True, tag=5, gc=False):
    """Server -> client: alive, with streams running (sent only after HEARTBEAT_S of silence)."""


class Hello(msgspec.Struct, array_like=True, tag=6, gc=False):
    """Client -> server, first frame: the cluster token (empty when the client has none)."""

    token: str


Frame = Request | Data | End | Error | Cancel | Ping | Hello

_HEADER = struct.Struct(">I")
_PLACEHOLDER = b"\0\0\0\0"
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Frame)


def parse_address(address: str) -> tuple[str, int]:
    """``tcp://host:port`` (``tcp://[v6]:port`` for IPv6) -> (host, port)."""
    if not address.startswith("tcp://"):
        raise ValueError(f"not a tcp:// address: {address!r}")
    host, sep, port = address[6:].rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"malformed tcp address {address!r} (want tcp://host:port)")
    return host.strip("[]"), int(port)


def format_address(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def _tune_socket(sock: Any) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # A peer machine that vanishes without a FIN is noticed in ~25 s instead of hours.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, val in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)


class _FramedConnection(asyncio.Protocol):
    """Framing, write coalescing and flow control shared by both ends of a connection."""

    def __init__(self, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.paused = False
        self._loop = asyncio.get_running_loop()
        self._wbuf = bytearray()
        self._flush_scheduled = False
        self._rbuf = bytearray()
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.last_rx = self.last_tx = self._loop.time()

    # -- lifecycle --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's is not an asyncio.Transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _tune_socket(sock)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wbuf = bytearray()
        self._resume()

    def close(self) -> None:
        """Flush what is buffered, then close (the transport sends its buffer before the FIN)."""
        if self.transport is not None and not self.closed:
            self._flush()
            self.closed = True
            self.transport.close()

    # -- writing --
    def send(self, frame: Frame) -> None:
        if self.closed:
            return
        buf = self._wbuf
        start = len(buf)
        buf += _PLACEHOLDER
        _encoder.encode_into(frame, buf, start + 4)
        size = len(buf) - start - 4
        if size > self.max_frame_bytes:
            del buf[start:]
            raise FrameTooLarge(f"frame of {size} bytes exceeds the {self.max_frame_bytes}-byte limit")
        _HEADER.pack_into(buf, start, size)
        if len(buf) >= FLUSH_BYTES:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._wbuf and not self.closed:
            data, self._wbuf = self._wbuf, bytearray()
            self.last_tx = self._loop.time()
            self.transport.write(data)  # type: ignore[union-attr]

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self._resume()

    def _resume(self) -> None:
        self.paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def drain(self) -> None:
        if self.paused and not self.closed:
            w = self._loop.create_future()
            self._drain_waiters.append(w)
            await w

    # -- reading --
    def data_received(self, data: bytes) -> None:  # type: ignore[override]
        if self.closed:
            return
        self.last_rx = self._loop.time()
        buf: bytes | bytearray = data
        if self._rbuf:
            self._rbuf += data
            buf = self._rbuf
        n = len(buf)
        pos = 0
        view = memoryview(buf)
        try:
            while n - pos >= 4:
                (size,) = _HEADER.unpack_from(buf, pos)
                if size > self.max_frame_bytes:
                    self.protocol_error(f"peer sent a frame of {size} bytes, over the "
                                        f"{self.max_frame_bytes}-byte limit")
                    return
                end = pos + 4 + size
                if end > n:
                    break
                frame = _decoder.decode(view[pos + 4:end])
                pos = end
                self.frame_received(frame)
                if self.closed:  # the frame was a protocol error
                    return
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self.protocol_error(f"undecodable frame: {e}")
            return
        finally:
            view.release()
        if buf is self._rbuf:
            del self._rbuf[:pos]
        elif pos < n:
            self._rbuf = bytearray(data[pos:])

    def protocol_error(self, message: str) -> None:
        log.warning("request plane: %s; closing the connection", message)
        self._rbuf = bytearray()
        self.on_broken(message)
        if self.transport is not None:
            self.closed = True
            self.transport.abort()

    def frame_received(self, frame: Frame) -> None:
        raise NotImplementedError

    def on_broken(self, reason: str) -> None:
        """Fail the streams of this connection (before connection_lost, for protocol errors)."""


# --- server --------------------------------------------------------------------------------------
class _ServerSink:
    """Routes one handler's output to its stream id; goes quiet once the client cancelled."""

    __slots__ = ("conn", "stream_id", "live")

    def __init__(self, conn: _ServerConnection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.live = True

    @property
    def paused(self) -> bool:
        return self.conn.paused

    async def drain(self) -> None:
        await self.conn.drain()

    def data(self, payload: bytes) -> None:
        if len(payload) > self.conn.max_frame_bytes:
            raise FrameTooLarge(f"response payload of {len(payload)} bytes exceeds the "
                                f"{self.conn.max_frame_bytes}-byte frame limit")
        if self.live:
            self.conn.send(Data(self.stream_id, payload))

    def end(self) -> None:
        if self.live:
            self.live = False
            self.conn.streams.pop(self.stream_id, None)
            self.conn.send(End(self.stream_id))

    def error(self, code: str, message: str) -> None:
        if self.live:
            self.live = False
            self.conn.streams.pop(self.stream_id, None)
            self.conn.send(Error(self.stream_id, code, message))


class _ServerConnection(_FramedConnection):
    def __init__(self, server: TcpServer) -> None:
        token = server._token
        super().__init__(HELLO_MAX_BYTES if token else server._core.max_frame_bytes)
        self.server = server
        self.streams: dict[int, ActiveStream] = {}
        self.authenticated = token is None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if len(self.server._connections) >= self.server.max_connections:
            log.warning("request plane: connection limit (%d) reached; refusing a connection",
                        self.server.max_connections)
            self.closed = True
            transport.abort()  # type: ignore[attr-defined]
            return
        self.server._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.server._connections.discard(self)
        self.on_broken("client disconnected")

    def on_broken(self, reason: str) -> None:
        streams, self.streams = self.streams, {}
        for st in streams.values():
            st.sink.live = False  # type: ignore[attr-defined]
            st.cancel("client")

    def frame_received(self, frame: Frame) -> None:
        t = type(frame)
        if not self.authenticated:
            token = self.server._token
            assert token is not None
            if t is not Hello or not hmac.compare_digest(frame.token.encode(), token.encode()):  # type: ignore[union-attr]
                self.server.refused_auth += 1
                self.protocol_error("a client did not present the cluster token")
                return
            self.authenticated = True
            self.max_frame_bytes = self.server._core.max_frame_bytes
            return
        if t is Request:
            sid = frame.stream_id  # type: ignore[union-attr]
            if sid in self.streams:
                self.protocol_error(f"duplicate stream id {sid}")
                return
            ms = frame.deadline_ms  # type: ignore[union-attr]
            deadline = None if ms is None else time.monotonic() + ms / 1000.0
            sink = _ServerSink(self, sid)
            st = self.server._core.open(sid, frame.endpoint, frame.payload, deadline, sink)  # type: ignore[union-attr]
            if st is not None and sink.live:
                self.streams[sid] = st
        elif t is Cancel:
            st = self.streams.pop(frame.stream_id, None)
            if st is not None:
                st.sink.live = False  # type: ignore[attr-defined]
                st.cancel("deadline" if frame.deadline else "client")  # type: ignore[union-attr]
        elif t is not Hello:  # a Hello to a server without a token is harmless
            self.protocol_error(f"unexpected {t.__name__} frame from a client")


class TcpServer:
    """Serves registered endpoints on ``tcp://host:port`` (port 0 = ephemeral)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, advertise_host: str | None = None,
                 token: str | None = None, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        self.host = host
        self.port = port
        self.advertise_host = advertise_host
        self.address: str | None = None
        self.max_connections = max_connections
        self.refused_auth = 0
        self._token = token or None
        self._core = ServerCore(max_frame_bytes)
        self._server: asyncio.Server | None = None
        self._connections: set[_ServerConnection] = set()
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def draining(self) -> bool:
        return self._core.draining

    @property
    def active_streams(self) -> set[ActiveStream]:
        return self._core.active

    async def drain(self, grace_s: float) -> None:
        """Stop accepting connections, refuse new requests on open ones (WorkerUnavailable: the
        caller retries elsewhere), and wait up to ``grace_s`` for running requests to finish."""
        if self._server is not None:
            self._server.close()
        await self._core.drain(grace_s)

    def register(self, endpoint: str, handler: Handler) -> None:
        self._core.register(endpoint, handler)

    async def start(self) -> str:
        if self._server is not None or self._stopped:
            raise RuntimeError("TcpServer.start() called twice")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ServerConnection(self), self.host, self.port)
        self._heartbeat_task = loop.create_task(self._heartbeats())
        port = self._server.sockets[0].getsockname()[1]
        host = self.advertise_host or self.host
        if host in ("", "0.0.0.0", "::"):
            host = socket.gethostname()
        self.address = format_address(host, port)
        return self.address

    async def _heartbeats(self) -> None:
        """Ping connections with running streams that have been quiet; drop stalled readers."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(HEARTBEAT_S / 2)
            now = loop.time()
            for conn in list(self._connections):
                if conn.closed:
                    continue
                if conn.streams and now - conn.last_tx >= HEARTBEAT_S:
                    conn.send(Ping())
                if conn._rbuf and now - conn.last_rx > READ_STALL_S:
                    conn.protocol_error(f"a frame stalled unfinished for {READ_STALL_S:.0f} s")

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop accepting, let running handlers finish for ``grace_s``, cancel the rest, close."""
        if self._stopped:
            return
        self._stopped = True
        if self._server is not None:
            self._server.close()
        await self._core.shutdown(grace_s)
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(BaseException):
                await self._heartbeat_task
        for conn in list(self._connections):
            conn.close()
        if self._server is not None:
            await self._server.wait_closed()
        self._connections.clear()


# --- client --------------------------------------------------------------------------------------
class _ClientHandle:
    __slots__ = ("conn", "stream_id")

    def __init__(self, conn: _ClientConnection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id

    def cancel(self, deadline: bool) -> None:
        if self.conn.streams.pop(self.stream_id, None) is not None:
            self.conn.send(Cancel(self.stream_id, deadline))


class _ClientConnection(_FramedConnection):
    def __init__(self, client: TcpClient, address: str) -> None:
        super().__init__(client._max_frame_bytes)
        self.client = client
        self.address = address
        self.streams: dict[int, StreamReceiver] = {}
        self._next_id = 1

    def open(self, endpoint: str, payload: bytes, deadline: float | None, rx: StreamReceiver) -> _ClientHandle:
        if self.closed:
            raise WorkerUnavailable(f"connection to {self.address} is closed")
        if not self.streams:  # silence before this stream says nothing about the peer
            self.last_rx = self._loop.time()
        sid = self._next_id
        self._next_id = sid + 1
        ms = None if deadline is None else max(1, int((deadline - time.monotonic()) * 1000 + 0.999))
        self.send(Request(sid, endpoint, ms, payload))
        self.streams[sid] = rx
        return _ClientHandle(self, sid)

    def frame_received(self, frame: Frame) -> None:
        t = type(frame)
        if t is Data:
            rx = self.streams.get(frame.stream_id)
            if rx is not None:
                rx.push(frame.payload)  # type: ignore[union-attr]
        elif t is End:
            rx = self.streams.pop(frame.stream_id, None)
            if rx is not None:
                rx.finish()
        elif t is Error:
            rx = self.streams.pop(frame.stream_id, None)
            if rx is not None:
                rx.finish(error_from_code(frame.code, frame.message))  # type: ignore[union-attr]
        elif t is Ping:
            pass
        else:
            self.protocol_error(f"unexpected {t.__name__} frame from a server")

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.on_broken(f"connection to {self.address} lost" + (f": {exc}" if exc else ""))

    def on_broken(self, reason: str) -> None:
        self.closed = True
        self.client._forget(self)
        streams, self.streams = self.streams, {}
        for rx in streams.values():
            rx.finish(StreamBroken(reason))


class TcpClient:
    """Streams calls to ``tcp://`` servers over one pooled connection per address."""

    def __init__(self, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, connect_timeout: float = 5.0,
                 token: str | None = None, stall_timeout_s: float | None = DEFAULT_STALL_TIMEOUT_S) -> None:
        if connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be positive, got {connect_timeout}")
        if stall_timeout_s is not None and stall_timeout_s <= HEARTBEAT_S:
            raise ValueError(f"stall_timeout_s must exceed the {HEARTBEAT_S} s heartbeat, got {stall_timeout_s}")
        self._max_frame_bytes = max_frame_bytes
        self._connect_timeout = connect_timeout
        self._token = token or None
        self._stall_timeout_s = stall_timeout_s
        self._pool: dict[str, _ClientConnection] = {}
        self._connecting: dict[str, asyncio.Task[_ClientConnection]] = {}
        self._watch_task: asyncio.Task[None] | None = None
        self._closed = False
        self.stalls = 0  # connections dropped because the peer went silent

    def stream(self, address: str, endpoint: str, payload: bytes, *,
               timeout: float | None = None) -> AsyncGenerator[bytes, None]:
        parse_address(address)
        payload = check_payload(payload, self._max_frame_bytes)
        deadline = deadline_after(timeout)

        async def open_stream(rx: StreamReceiver) -> _ClientHandle:
            conn = await self._connection(address, deadline)
            return conn.open(endpoint, payload, deadline, rx)

        return client_stream(open_stream, deadline)

    async def close(self) -> None:
        """Close every connection; streams still running end with StreamBroken."""
        self._closed = True
        watch, self._watch_task = self._watch_task, None
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(BaseException):
                await watch
        for t in list(self._connecting.values()):
            t.cancel()
        for conn in list(self._pool.values()):
            conn.close()
            conn.on_broken("client closed")
        self._pool.clear()
        await asyncio.sleep(0)  # let connection_lost callbacks run before the loop may close

    async def _connection(self, address: str, deadline: float | None) -> _ClientConnection:
        if self._closed:
            raise WorkerUnavailable("client is closed")
        conn = self._pool.get(address)
        if conn is not None and not conn.closed:
            return conn
        task = self._connecting.get(address)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._connect(address))
            self._connecting[address] = task
            task.add_done_callback(lambda t: self._connect_done(address, t))
        if deadline is None:
            return await asyncio.shield(task)
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                return await asyncio.shield(task)
        except TimeoutError:
            raise DeadlineExceeded(f"deadline passed while connecting to {address}") from None

    def _connect_done(self, address: str, task: asyncio.Task[_ClientConnection]) -> None:
        if self._connecting.get(address) is task:
            del self._connecting[address]
        if not task.cancelled():
            task.exception()  # retrieved here: waiters may all have given up

    async def _connect(self, address: str) -> _ClientConnection:
        host, port = parse_address(address)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(lambda: _ClientConnection(self, address), host, port)
        except (OSError, TimeoutError) as e:
            raise WorkerUnavailable(f"cannot connect to {address}: {e or type(e).__name__}") from None
        if self._closed:
            conn.close()
            raise WorkerUnavailable("client is closed")
        if self._token is not None:
            conn.send(Hello(self._token))
        self._pool[address] = conn
        if self._stall_timeout_s is not None and self._watch_task is None:
            self._watch_task = loop.create_task(self._watch_stalls(self._stall_timeout_s))
        return conn

    async def _watch_stalls(self, stall_s: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(HEARTBEAT_S / 2)
            now = loop.time()
            for conn in list(self._pool.values()):
                if conn.streams and not conn.closed and now - conn.last_rx > stall_s:
                    self.stalls += 1
                    conn.protocol_error(f"no data from {conn.address} for {stall_s:g} s "
                                        "(the peer is frozen or unreachable)")

    def _forget(self, conn: _ClientConnection) -> None:
        if self._pool.get(conn.address) is conn:
            del self._pool[conn.address]
