"""TCP-only behaviour: sockets, pooling, framing errors, dead peers, uvloop."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turbine.runtime.request_plane import RequestContext, StreamBroken, WorkerUnavailable
from turbine.runtime.tcp import (
    Cancel,
    Data,
    End,
    Error,
    Frame,
    Request,
    TcpClient,
    TcpServer,
    _FramedConnection,
    parse_address,
)

CHILD = Path(__file__).with_name("runtime_child.py")
REPO = Path(__file__).resolve().parents[2]


async def count(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    for i in range(int(payload)):
        yield b"%d" % i


async def big(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    for i in range(int(payload)):
        yield bytes([i % 256]) * (1 << 20)


async def start() -> tuple[TcpServer, TcpClient, str]:
    server = TcpServer()
    server.register("count", count)
    server.register("big", big)
    return server, TcpClient(), await server.start()


async def test_tcp_nodelay_on_both_sides() -> None:
    server, client, address = await start()
    try:
        assert [x async for x in client.stream(address, "count", b"2")] == [b"0", b"1"]
        (cconn,) = client._pool.values()
        (sconn,) = server._connections
        for conn in (cconn, sconn):
            sock = conn.transport.get_extra_info("socket")  # type: ignore[union-attr]
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        await client.close()
        await server.stop()


async def test_concurrent_streams_share_one_connection() -> None:
    server, client, address = await start()
    try:
        async def run(n: int) -> list[bytes]:
            return [x async for x in client.stream(address, "count", b"%d" % n)]

        outs = await asyncio.gather(*(run(100 + i) for i in range(30)))
        assert [len(o) for o in outs] == [100 + i for i in range(30)]
        assert len(client._pool) == 1 and len(server._connections) == 1
    finally:
        await client.close()
        await server.stop()


async def test_megabyte_frames_with_a_slow_reader() -> None:
    server, client, address = await start()
    try:
        got = []
        async for x in client.stream(address, "big", b"20"):
            got.append(x)
            await asyncio.sleep(0.002)
        assert [len(x) for x in got] == [1 << 20] * 20
        assert all(x[0] == i and x[-1] == i for i, x in enumerate(got))
    finally:
        await client.close()
        await server.stop()


async def test_sigkilled_server_breaks_the_stream_promptly() -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, str(CHILD), "tcp-server"], stdout=subprocess.PIPE, env=env)
    client = TcpClient()
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)
        address = line.decode().strip()
        parse_address(address)
        got = 0
        with pytest.raises(StreamBroken):
            async for _ in client.stream(address, "ticks", b""):
                got += 1
                if got == 5:
                    proc.send_signal(signal.SIGKILL)
                    t0 = time.monotonic()
        assert time.monotonic() - t0 < 2.0
        # The dead connection left the pool; a new call fails fast as unavailable.
        with pytest.raises(WorkerUnavailable):
            async for _ in client.stream(address, "ticks", b""):
                pass
    finally:
        proc.kill()
        proc.wait()
        await client.close()


async def test_oversized_frame_header_closes_the_connection() -> None:
    server, client, address = await start()
    host, port = parse_address(address)
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(struct.pack(">I", 0xFFFFFFF0) + b"junk")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(100), 2) == b""  # server hung up
        writer.close()
        # Garbage that is not a frame also ends only that connection.
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
        assert await asyncio.wait_for(reader.read(100), 2) == b""
        writer.close()
        assert [x async for x in client.stream(address, "count", b"1")] == [b"0"]
    finally:
        await client.close()
        await server.stop()


async def test_garbage_from_a_server_breaks_streams_with_a_reason() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(10)
        writer.write(struct.pack(">I", 2) + b"\x93\x07")  # unknown frame tag
        await writer.drain()
        await asyncio.sleep(5)

    fake = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = fake.sockets[0].getsockname()[1]
    client = TcpClient()
    try:
        with pytest.raises(StreamBroken, match="undecodable"):
            async for _ in client.stream(f"tcp://127.0.0.1:{port}", "x", b""):
                pass
    finally:
        await client.close()
        fake.close()


async def test_client_reconnects_after_the_server_restarts() -> None:
    server, client, address = await start()
    port = parse_address(address)[1]
    try:
        assert [x async for x in client.stream(address, "count", b"1")] == [b"0"]
        await server.stop()
        await asyncio.sleep(0.05)
        server = TcpServer(port=port)
        server.register("count", count)
        assert await server.start() == address
        assert [x async for x in client.stream(address, "count", b"2")] == [b"0", b"1"]
    finally:
        await client.close()
        await server.stop()


def test_runs_on_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        server, client, address = await start()
        try:
            assert len([x async for x in client.stream(address, "count", b"5000")]) == 5000
            (cconn,) = client._pool.values()
            sock = cconn.transport.get_extra_info("socket")  # type: ignore[union-attr]
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            stream = client.stream(address, "count", b"1000000")
            await anext(stream)
            await stream.aclose()  # type: ignore[attr-defined]
            await asyncio.sleep(0.05)
            (sconn,) = server._connections
            assert not sconn.streams  # the cancel reached the server
        finally:
            await client.close()
            await server.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


class _Recorder(_FramedConnection):
    def __init__(self) -> None:
        super().__init__(1 << 20)
        self.frames: list[Frame] = []

    def frame_received(self, frame: Frame) -> None:
        self.frames.append(frame)


@settings(max_examples=60, deadline=None)
@given(payloads=st.lists(st.binary(max_size=300), max_size=20), cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_frames_survive_any_split_into_reads(payloads: list[bytes], cuts: list[int]) -> None:
    async def main() -> None:
        writer, reader = _Recorder(), _Recorder()
        sent: list[Frame] = [Data(i, p) for i, p in enumerate(payloads)]
        sent += [Request(7, "generate", None, b"x"), Cancel(7, True), Error(3, "remote", "boom"), End(9)]
        for f in sent:
            writer.send(f)
        wire = bytes(writer._wbuf)
        points = sorted({min(c, len(wire)) for c in cuts} | {0, len(wire)})
        for a, b in zip(points, points[1:]):
            reader.data_received(wire[a:b])
        assert reader.frames == sent and not reader._rbuf

    asyncio.run(main())


def test_address_parsing() -> None:
    assert parse_address("tcp://127.0.0.1:80") == ("127.0.0.1", 80)
    assert parse_address("tcp://[::1]:9") == ("::1", 9)
    for bad in ("127.0.0.1:80", "tcp://host", "tcp://:80", "tcp://h:x"):
        with pytest.raises(ValueError):
            parse_address(bad)
