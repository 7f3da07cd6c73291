"""The TCP request plane's liveness (pings, stall detection), cluster token and inbound bounds."""
from __future__ import annotations

import asyncio
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from turbine.runtime.request_plane import RequestContext, StreamBroken, WorkerUnavailable
from turbine.runtime.tcp import HELLO_MAX_BYTES, TcpClient, TcpServer

CHILD = Path(__file__).with_name("runtime_child.py")


async def slow_first(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    """A long 'prefill': silence for ``payload`` seconds, then one chunk."""
    await asyncio.sleep(float(payload))
    yield b"done"


async def echo(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    yield payload


async def test_a_busy_peer_is_not_a_stalled_one() -> None:
    server = TcpServer()
    server.register("slow", slow_first)
    address = await server.start()
    client = TcpClient(stall_timeout_s=1.5)
    try:
        assert [x async for x in client.stream(address, "slow", b"3.5")] == [b"done"]
        assert client.stalls == 0
    finally:
        await client.close()
        await server.stop()


async def test_a_frozen_peer_breaks_its_streams_within_the_stall_timeout() -> None:
    child = subprocess.Popen([sys.executable, str(CHILD), "tcp-server"], stdout=subprocess.PIPE, text=True)
    client = TcpClient(stall_timeout_s=2.0)
    try:
        address = child.stdout.readline().strip()  # type: ignore[union-attr]
        stream = client.stream(address, "ticks", b"")
        await anext(stream)
        os.kill(child.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(StreamBroken, match="no data"):
            async for _ in stream:
                pass
        assert 1.5 < time.monotonic() - t0 < 4.0
        assert client.stalls == 1
    finally:
        await client.close()
        os.kill(child.pid, signal.SIGCONT)
        child.kill()
        child.wait()


async def test_cluster_token_is_required_when_set() -> None:
    server = TcpServer(token="s3cret")
    server.register("echo", echo)
    address = await server.start()
    try:
        for token in (None, "wrong"):
            client = TcpClient(token=token)
            with pytest.raises(WorkerUnavailable):
                async for _ in client.stream(address, "echo", b"x"):
                    pass
            await client.close()
        assert server.refused_auth == 2
        client = TcpClient(token="s3cret")
        assert [x async for x in client.stream(address, "echo", b"hi")] == [b"hi"]
        await client.close()
    finally:
        await server.stop()


async def test_a_stranger_cannot_make_the_server_buffer_a_big_frame() -> None:
    server = TcpServer(token="s3cret")
    address = await server.start()
    host, port = address[6:].rsplit(":", 1)
    try:
        r, w = await asyncio.open_connection(host, int(port))
        w.write(struct.pack(">I", 60 << 20) + b"\x00" * HELLO_MAX_BYTES)  # a 60 MB frame, begun
        await w.drain()
        assert await asyncio.wait_for(r.read(), 5) == b""  # closed at the header, nothing buffered
        assert not server._connections
        w.close()
    finally:
        await server.stop()


async def test_connections_are_capped() -> None:
    server = TcpServer(max_connections=2)
    server.register("echo", echo)
    address = await server.start()
    clients = [TcpClient() for _ in range(3)]
    try:
        for c in clients[:2]:
            assert [x async for x in c.stream(address, "echo", b"a")] == [b"a"]
        with pytest.raises(WorkerUnavailable):
            async for _ in clients[2].stream(address, "echo", b"a"):
                pass
        assert len(server._connections) == 2
    finally:
        for c in clients:
            await c.close()
        await server.stop()


async def test_drain_refuses_new_requests_and_finishes_running_ones() -> None:
    server = TcpServer()
    server.register("slow", slow_first)
    address = await server.start()
    client = TcpClient()
    try:
        running = asyncio.create_task(anext(client.stream(address, "slow", b"0.5")))
        await asyncio.sleep(0.1)
        drain = asyncio.create_task(server.drain(5))
        await asyncio.sleep(0.05)
        with pytest.raises(WorkerUnavailable):  # the caller may retry it elsewhere
            async for _ in client.stream(address, "slow", b"0"):
                pass
        assert await running == b"done"
        await drain
    finally:
        await client.close()
        await server.stop()
