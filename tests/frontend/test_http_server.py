"""The HTTP server's bounds, timeouts, connection cap, drain and protocol details, on raw sockets."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest

from turbine.frontend.http_server import HttpLimits, HttpRequest, HttpResponse, HttpServer


async def _handler(req: HttpRequest, resp: HttpResponse) -> None:
    if req.path == "/slow":  # streams 5 chunks, 0.1 s apart
        resp.start_stream(200)
        for i in range(5):
            resp.write_chunk(b"data: %d\n\n" % i)
            await asyncio.sleep(0.1)
        resp.end_stream()
    elif req.path == "/hang":
        await asyncio.sleep(3600)
    elif req.path == "/flood":  # more than any socket buffers: only a reading client drains it
        resp.start_stream(200)
        chunk = b"x" * 65536
        while True:
            resp.write_chunk(chunk)
            await resp.drain()
    else:
        resp.send(200, json.dumps({"path": req.path, "body": len(req.body)}).encode())


async def _server(**limits: object) -> HttpServer:
    s = HttpServer(_handler, port=0, limits=HttpLimits(**limits))  # type: ignore[arg-type]
    await s.start()
    return s


async def _exchange(port: int, data: bytes, *, read_until_close: bool = True, timeout: float = 5.0) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(data)
        await w.drain()
        if read_until_close:
            return await asyncio.wait_for(r.read(), timeout)
        return await asyncio.wait_for(r.read(65536), timeout)
    finally:
        w.close()


@pytest.fixture
async def server() -> AsyncIterator[HttpServer]:
    s = await _server()
    yield s
    await s.stop()


GET = b"GET /x HTTP/1.1\r\nHost: a\r\n"


async def test_too_many_headers_is_431(server: HttpServer) -> None:
    reply = await _exchange(server.port, GET + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 431"), reply[:100]
    assert b'"error"' in reply


async def test_headers_that_never_end_are_cut_at_the_limit() -> None:
    s = await _server(max_header_bytes=4096)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", s.port)
        w.write(GET + b"X-Big: ")
        sent = 0
        with pytest.raises((ConnectionError, OSError)):  # noqa: PT012 - the server closes mid-stream
            for _ in range(10_000):  # 10 MB of one header value, never finished
                w.write(b"a" * 1024)
                await w.drain()
                sent += 1024
            raise AssertionError("the server kept reading an unbounded header")
        try:  # the 431 may be lost to the reset a close with unread input causes
            reply = await asyncio.wait_for(r.read(), 5)
            assert reply.startswith(b"HTTP/1.1 431"), reply[:100]
        except ConnectionError:
            pass
        assert s.rejected == {431: 1}  # (what was sent past 4 KiB sat in kernel buffers, not ours)
        w.close()
    finally:
        await s.stop()


async def test_long_url_is_414(server: HttpServer) -> None:
    reply = await _exchange(server.port, b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 414"), reply[:100]


async def test_slow_headers_time_out_with_408() -> None:
    s = await _server(header_timeout_s=0.6)
    try:
        t0 = time.monotonic()
        reply = await _exchange(s.port, b"GET /x HTTP/1.1\r\nHost: a\r\n")  # never the blank line
        assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
        assert time.monotonic() - t0 < 3
        assert s.timeouts["header"] == 1
    finally:
        await s.stop()


async def test_stalled_body_times_out() -> None:
    s = await _server(read_timeout_s=0.6)
    try:
        reply = await _exchange(s.port, b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nabc")
        assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
    finally:
        await s.stop()


async def test_idle_keepalive_connection_is_closed() -> None:
    s = await _server(keepalive_timeout_s=0.6)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", s.port)
        w.write(GET + b"\r\n")
        head = await r.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        rest = await asyncio.wait_for(r.read(), 5)  # body, then EOF when the server closes
        assert time.monotonic() - t0 < 3 and b"/x" in rest
        assert not s.connections
        w.close()
    finally:
        await s.stop()


async def test_connection_cap_evicts_idle_then_refuses_with_503() -> None:
    s = await _server(max_connections=4)
    try:
        idle = [await asyncio.open_connection("127.0.0.1", s.port) for _ in range(4)]
        await asyncio.sleep(0.05)
        # A real client gets in: the longest-idle connection makes room.
        reply = await _exchange(s.port, b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200"), reply[:100]
        assert len(s.connections) <= 4
        # Every connection busy: the newcomer is told, not starved.
        busy = []
        for _ in range(4):
            r, w = await asyncio.open_connection("127.0.0.1", s.port)
            w.write(b"GET /hang HTTP/1.1\r\nHost: a\r\n\r\n")
            busy.append((r, w))
        await asyncio.sleep(0.2)
        reply = await _exchange(s.port, GET + b"\r\n")
        assert reply.startswith(b"HTTP/1.1 503"), reply[:100]
        assert s.refused >= 1
        for _, w in idle + busy:
            w.close()
    finally:
        await s.stop()


async def test_client_that_stops_reading_is_dropped() -> None:
    s = await _server(write_timeout_s=0.6)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", s.port, limit=1024)
        w.write(b"GET /flood HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.sleep(0.1)
        r._transport.pause_reading()  # type: ignore[attr-defined]
        deadline = time.monotonic() + 5
        while s.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not s.connections and s.timeouts["write"] == 1
        w.close()
    finally:
        await s.stop()


async def test_pipelined_requests_are_answered_in_order_and_bounded(server: HttpServer) -> None:
    reqs = b"".join(b"GET /p%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(50))
    r, w = await asyncio.open_connection("127.0.0.1", server.port)
    w.write(reqs + b"GET /last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    data = await asyncio.wait_for(r.read(), 10)
    paths = [json.loads(line.split(b"}")[0] + b"}")["path"] for line in data.split(b"\r\n")
             if line.startswith(b"{")]
    assert paths == [f"/p{i}" for i in range(50)] + ["/last"]
    w.close()


async def test_http10_stream_is_not_chunked(server: HttpServer) -> None:
    reply = await _exchange(server.port, b"GET /slow HTTP/1.0\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower() and b"connection: close" in head.lower()
    assert body == b"".join(b"data: %d\n\n" % i for i in range(5))


async def test_head_sends_no_body(server: HttpServer) -> None:
    reply = await _exchange(server.port, b"HEAD /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"content-length: " in head and body == b""


async def test_expect_100_continue(server: HttpServer) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", server.port)
    w.write(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    assert await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    w.write(b"hello")
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    w.close()
    # Too large: refused at once, before the client sends the body.
    reply = await _exchange(server.port, b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 999999999\r\n"
                                         b"Expect: 100-continue\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 413")
    reply = await _exchange(server.port, b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nExpect: magic\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 417")


async def test_drain_finishes_running_streams_and_refuses_new_connections() -> None:
    s = await _server()
    port = s.port
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
    await r.readuntil(b"\r\n\r\n")
    idle_r, idle_w = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    drain = asyncio.create_task(s.drain(10))
    await asyncio.sleep(0.05)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    body = await asyncio.wait_for(r.read(), 5)  # the stream completes, then the server closes
    assert body.endswith(b"0\r\n\r\n") and body.count(b"data: ") == 5
    assert await asyncio.wait_for(idle_r.read(), 5) == b""  # the idle keep-alive connection is closed
    assert await drain == 0
    assert time.monotonic() - t0 < 3
    w.close()
    idle_w.close()


async def test_drain_cuts_off_what_outlives_the_grace() -> None:
    s = await _server()
    r, w = await asyncio.open_connection("127.0.0.1", s.port)
    w.write(b"GET /hang HTTP/1.1\r\nHost: a\r\n\r\n")
    await asyncio.sleep(0.1)
    assert await s.drain(0.3) == 1
    assert await asyncio.wait_for(r.read(), 5) == b""
    w.close()
