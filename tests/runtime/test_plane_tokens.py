"""The fleet's token on both planes: the request plane's Hello frame and the event plane's ZMTP
PLAIN handshake. A peer without the token (or with another) gets nothing from either."""
from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator

import pytest
import zmq
import zmq.asyncio

from turbine.runtime.config import DiscoveryUrl, Runtime, RuntimeConfig
from turbine.runtime.events_zmq import ZmqEventPublisher, ZmqEventSubscriber
from turbine.runtime.request_plane import RequestContext, WorkerUnavailable

NULL_GREETING = b"\xff" + bytes(8) + b"\x7f\x03\x01" + b"NULL".ljust(20, b"\0") + bytes(32)
PLAIN_GREETING = b"\xff" + bytes(8) + b"\x7f\x03\x01" + b"PLAIN".ljust(20, b"\0") + bytes(32)


def fleet(token: str | None) -> Runtime:
    return Runtime(RuntimeConfig(discovery=DiscoveryUrl(scheme="etcd", endpoints=(("127.0.0.1", 2379),)),
                                 cluster_token=token))


async def echo(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    yield payload


async def publish_until(pub: ZmqEventPublisher, sub: ZmqEventSubscriber, timeout: float) -> bytes | None:
    """Publish every 20 ms; the first payload ``sub`` receives, or None after ``timeout``."""
    async def feed() -> None:
        i = 0
        while True:
            pub.publish("kv", b"%d" % i)
            i += 1
            await asyncio.sleep(0.02)

    task = asyncio.create_task(feed())
    try:
        return (await asyncio.wait_for(anext(sub), timeout)).payload
    except TimeoutError:
        return None
    finally:
        task.cancel()


async def test_both_planes_refuse_a_runtime_with_another_token_or_none() -> None:
    ours = fleet("the-fleet-token")
    server, pub = ours.server(), ours.publisher()
    server.register("echo", echo)
    address, events = await server.start(), await pub.start()
    try:
        for stranger in (fleet("another-token"), fleet(None)):
            client, sub = stranger.client(), stranger.subscriber()
            with pytest.raises(WorkerUnavailable):
                async for _ in client.stream(address, "echo", b"x"):
                    pass
            sub.connect(events)
            assert await publish_until(pub, sub, 1.0) is None
            await client.close()
            await sub.close()
        assert server.refused_auth == 2  # type: ignore[attr-defined]
        assert pub.refused_auth >= 1  # type: ignore[attr-defined]  # (a NULL libzmq peer gives up on its own)
        client, sub = ours.client(), ours.subscriber()
        assert [x async for x in client.stream(address, "echo", b"hi")] == [b"hi"]
        sub.connect(events)
        assert await publish_until(pub, sub, 3.0) is not None
        await client.close()
        await sub.close()
    finally:
        await server.stop()
        await pub.close()


async def read_command(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    flags, size = await reader.readexactly(2)
    assert flags & 0x04, "a command frame"
    body = await reader.readexactly(size)
    return body[1:1 + body[0]], body[1 + body[0]:]


async def test_a_null_security_peer_is_refused_before_it_can_subscribe() -> None:
    pub = ZmqEventPublisher(token="tok")
    host, port = (await pub.start())[6:].rsplit(":", 1)
    try:
        r, w = await asyncio.open_connection(host, int(port))
        greeting = await r.readexactly(64)
        assert greeting[12:17] == b"PLAIN" and greeting[32] == 1  # as-server
        w.write(NULL_GREETING)
        name, reason = await asyncio.wait_for(read_command(r), 2)
        assert name == b"ERROR" and b"token" in reason
        assert await asyncio.wait_for(r.read(), 2) == b""  # closed
        assert pub.refused_auth == 1 and not pub._peers
        w.close()
    finally:
        await pub.close()


@pytest.mark.parametrize("password,accepted", [(b"tok", True), (b"tok2", False), (b"", False)])
async def test_plain_hello_is_checked_then_initiate_then_subscribe(password: bytes, accepted: bool) -> None:
    pub = ZmqEventPublisher(token="tok")
    host, port = (await pub.start())[6:].rsplit(":", 1)
    try:
        r, w = await asyncio.open_connection(host, int(port))
        await r.readexactly(64)
        w.write(PLAIN_GREETING)
        hello = b"\x05HELLO" + bytes((4,)) + b"user" + bytes((len(password),)) + password
        w.write(bytes((0x04, len(hello))) + hello)
        name, _ = await asyncio.wait_for(read_command(r), 2)
        if not accepted:
            assert name == b"ERROR"
            assert await asyncio.wait_for(r.read(), 2) == b""
            assert pub.refused_auth == 1
            return
        assert name == b"WELCOME"
        meta = b"\x0bSocket-Type" + struct.pack(">I", 3) + b"SUB"
        initiate = b"\x08INITIATE" + meta
        w.write(bytes((0x04, len(initiate))) + initiate)
        name, data = await asyncio.wait_for(read_command(r), 2)
        assert name == b"READY" and b"PUB" in data
        w.write(b"\x00\x03\x01kv")  # subscribe "kv" (ZMTP 3.0 form)
        await w.drain()
        for _ in range(100):
            pub.publish("kv", b"payload")
            await asyncio.sleep(0.01)
            if r._buffer:  # type: ignore[attr-defined]
                break
        topic = await asyncio.wait_for(r.readexactly(4), 2)
        assert topic == b"\x01\x02kv"  # the topic frame (more)
        assert pub.refused_auth == 0
        w.close()
    finally:
        await pub.close()


async def test_a_stock_libzmq_sub_with_plain_credentials_receives() -> None:
    pub = ZmqEventPublisher(token="tok")
    address = await pub.start()
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.plain_username = b"anyone"
    sock.plain_password = b"tok"
    sock.subscribe(b"kv")
    sock.connect(address)
    try:
        for i in range(200):
            pub.publish("kv", b"x%d" % i)
            try:
                frames = await asyncio.wait_for(sock.recv_multipart(), 0.02)
                break
            except TimeoutError:
                continue
        else:
            raise AssertionError("nothing received")
        assert frames[0] == b"kv" and len(frames[1]) == 8
    finally:
        sock.close(0)
        ctx.term()
        await pub.close()
