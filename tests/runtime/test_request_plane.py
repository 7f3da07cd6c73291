"""Request-plane semantics, run against both transports (TCP and in-process) for parity."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from turbine.runtime.inproc import InProcClient, InProcServer
from turbine.runtime.request_plane import (
    DeadlineExceeded,
    FrameTooLarge,
    RemoteError,
    RequestContext,
    StreamBroken,
    UnknownEndpoint,
    WorkerUnavailable,
    make_client,
)
from turbine.runtime.tcp import TcpClient, TcpServer


@dataclass
class Probe:
    """What the handlers saw, for assertions about cancellation reaching them."""

    started: asyncio.Event = field(default_factory=asyncio.Event)
    cleaned: asyncio.Event = field(default_factory=asyncio.Event)
    seen: list[str] = field(default_factory=list)  # exception types seen by the handler
    reasons: list[str | None] = field(default_factory=list)
    calls: int = 0


def make_handlers(probe: Probe) -> dict:  # type: ignore[type-arg]
    async def count(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        prefix, _, n = payload.partition(b":")
        for i in range(int(n)):
            yield b"%s:%d" % (prefix, i)
            if i % 64 == 0:
                await asyncio.sleep(0)

    async def ticks(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        probe.calls += 1
        probe.started.set()
        try:
            while True:
                yield b"tick"
                await asyncio.sleep(0.005)
        except BaseException as e:
            probe.seen.append(type(e).__name__)
            raise
        finally:
            probe.reasons.append(ctx.cancel_reason)
            probe.cleaned.set()

    async def hang(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        probe.calls += 1
        probe.started.set()
        try:
            await asyncio.sleep(3600)
            yield b"never"
        finally:
            probe.reasons.append(ctx.cancel_reason)
            probe.cleaned.set()

    async def fail(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"first"
        raise ValueError("bad thing")

    async def wrong_type(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield "text"  # type: ignore[misc]

    async def sized(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"z" * int(payload)

    async def info(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        rem = ctx.time_remaining()
        yield f"{ctx.endpoint}|{ctx.request_id}|{rem}".encode()

    async def waits(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        async def watcher() -> None:
            probe.reasons.append(await ctx.wait_cancelled())
            probe.cleaned.set()

        task = asyncio.get_running_loop().create_task(watcher())
        probe.started.set()
        try:
            while True:
                yield b"w"
                await asyncio.sleep(0.005)
        finally:
            await asyncio.wait([task], timeout=1)

    async def quick(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        await asyncio.sleep(0.2)
        yield b"done"

    return {"count": count, "ticks": ticks, "hang": hang, "fail": fail, "wrong_type": wrong_type,
            "sized": sized, "info": info, "waits": waits, "quick": quick}


@dataclass
class Plane:
    kind: str
    server: TcpServer | InProcServer
    client: TcpClient | InProcClient
    address: str
    probe: Probe


async def start_plane(kind: str, max_frame_bytes: int = 64 * 1024 * 1024) -> Plane:
    probe = Probe()
    if kind == "tcp":
        server: TcpServer | InProcServer = TcpServer(max_frame_bytes=max_frame_bytes)
        client: TcpClient | InProcClient = TcpClient(max_frame_bytes=max_frame_bytes)
    else:
        server, client = InProcServer(max_frame_bytes=max_frame_bytes), InProcClient(max_frame_bytes=max_frame_bytes)
    for name, h in make_handlers(probe).items():
        server.register(name, h)
    return Plane(kind, server, client, await server.start(), probe)


@pytest.fixture(params=["tcp", "inproc"])
async def plane(request: pytest.FixtureRequest) -> AsyncIterator[Plane]:
    p = await start_plane(request.param)
    yield p
    await p.client.close()
    await p.server.stop()


async def collect(it: AsyncIterator[bytes]) -> list[bytes]:
    return [x async for x in it]


async def test_streams_many_frames_in_order(plane: Plane) -> None:
    out = await collect(plane.client.stream(plane.address, "count", b"s:20000"))
    assert out == [b"s:%d" % i for i in range(20000)]


async def test_concurrent_streams_stay_separate(plane: Plane) -> None:
    results = await asyncio.gather(*(collect(plane.client.stream(plane.address, "count", b"r%d:300" % r))
                                     for r in range(40)))
    for r, out in enumerate(results):
        assert out == [b"r%d:%d" % (r, i) for i in range(300)]


@pytest.mark.parametrize("how", ["aclose", "break", "task_cancel"])
async def test_leaving_early_cancels_the_handler(plane: Plane, how: str) -> None:
    stream = plane.client.stream(plane.address, "ticks", b"")
    if how == "aclose":
        assert await anext(stream) == b"tick"
        await stream.aclose()  # type: ignore[attr-defined]
    elif how == "break":
        async for _ in stream:
            break
        del stream  # the generator is finalized (and closed) when its last reference goes
    else:
        async def consume() -> None:
            async for _ in plane.client.stream(plane.address, "ticks", b""):
                pass
        task = asyncio.get_running_loop().create_task(consume())
        await asyncio.wait_for(plane.probe.started.wait(), 1)
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    t0 = time.monotonic()
    await asyncio.wait_for(plane.probe.cleaned.wait(), 1.0)
    assert time.monotonic() - t0 < 1.0
    assert plane.probe.reasons == ["client"]
    assert plane.probe.seen and plane.probe.seen[0] in ("CancelledError", "GeneratorExit")


async def test_wait_cancelled_reports_the_reason(plane: Plane) -> None:
    stream = plane.client.stream(plane.address, "waits", b"")
    await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    await asyncio.wait_for(plane.probe.cleaned.wait(), 1.0)
    assert plane.probe.reasons == ["client"]


async def test_deadline_while_handler_is_silent(plane: Plane) -> None:
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await collect(plane.client.stream(plane.address, "hang", b"", timeout=0.2))
    assert 0.15 < time.monotonic() - t0 < 1.0
    await asyncio.wait_for(plane.probe.cleaned.wait(), 1.0)
    assert plane.probe.reasons == ["deadline"]


async def test_deadline_mid_stream_keeps_what_arrived(plane: Plane) -> None:
    got: list[bytes] = []
    with pytest.raises(DeadlineExceeded):
        async for x in plane.client.stream(plane.address, "ticks", b"", timeout=0.15):
            got.append(x)
    assert len(got) >= 3
    await asyncio.wait_for(plane.probe.cleaned.wait(), 1.0)
    assert plane.probe.reasons == ["deadline"]
    assert isinstance(DeadlineExceeded(), TimeoutError)


async def test_expired_timeout_never_reaches_the_server(plane: Plane) -> None:
    with pytest.raises(DeadlineExceeded):
        await collect(plane.client.stream(plane.address, "ticks", b"", timeout=0))
    assert plane.probe.calls == 0


async def test_handler_sees_deadline_and_endpoint(plane: Plane) -> None:
    (out,) = await collect(plane.client.stream(plane.address, "info", b"", timeout=5))
    endpoint, request_id, remaining = out.decode().split("|")
    assert endpoint == "info" and request_id
    assert 4.0 < float(remaining) <= 5.0
    (out,) = await collect(plane.client.stream(plane.address, "info", b""))
    assert out.decode().endswith("|None")


async def test_remote_error_after_partial_output(plane: Plane) -> None:
    got: list[bytes] = []
    with pytest.raises(RemoteError) as ei:
        async for x in plane.client.stream(plane.address, "fail", b""):
            got.append(x)
    assert got == [b"first"]
    assert ei.value.message == "ValueError: bad thing"


async def test_non_bytes_output_is_a_remote_error(plane: Plane) -> None:
    with pytest.raises(RemoteError, match="expected bytes"):
        await collect(plane.client.stream(plane.address, "wrong_type", b""))


async def test_unknown_endpoint(plane: Plane) -> None:
    with pytest.raises(UnknownEndpoint, match="nope"):
        await collect(plane.client.stream(plane.address, "nope", b""))
    # The connection (TCP) or client (in-proc) still works afterwards.
    assert await collect(plane.client.stream(plane.address, "count", b"a:2")) == [b"a:0", b"a:1"]


async def test_stream_is_lazy(plane: Plane) -> None:
    stream = plane.client.stream(plane.address, "ticks", b"")
    await asyncio.sleep(0.05)
    assert plane.probe.calls == 0
    await stream.aclose()  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["tcp", "inproc"])
async def test_frame_size_limit(kind: str) -> None:
    p = await start_plane(kind, max_frame_bytes=4096)
    try:
        with pytest.raises(FrameTooLarge):
            p.client.stream(p.address, "count", b"x" * 5000)
        assert len(await collect(p.client.stream(p.address, "sized", b"4000"))) == 3
        with pytest.raises(FrameTooLarge, match="4096"):
            await collect(p.client.stream(p.address, "sized", b"5000"))
    finally:
        await p.client.close()
        await p.server.stop()


@pytest.mark.parametrize("kind", ["tcp", "inproc"])
async def test_unreachable_server_is_unavailable(kind: str, unused_tcp_port: int) -> None:
    client = TcpClient() if kind == "tcp" else InProcClient()
    address = f"tcp://127.0.0.1:{unused_tcp_port}" if kind == "tcp" else "inproc://nobody-here"
    t0 = time.monotonic()
    with pytest.raises(WorkerUnavailable) as ei:
        await collect(client.stream(address, "ticks", b""))
    assert not isinstance(ei.value, StreamBroken)
    assert time.monotonic() - t0 < 1.0
    await client.close()


async def test_server_stop_breaks_running_streams(plane: Plane) -> None:
    got: list[bytes] = []

    async def consume() -> None:
        async for x in plane.client.stream(plane.address, "ticks", b""):
            got.append(x)

    task = asyncio.get_running_loop().create_task(consume())
    await asyncio.wait_for(plane.probe.started.wait(), 1)
    await plane.server.stop()
    with pytest.raises(StreamBroken):
        await asyncio.wait_for(task, 1.0)
    assert got and plane.probe.reasons == ["shutdown"]


async def test_graceful_stop_finishes_running_and_refuses_new(plane: Plane) -> None:
    running = asyncio.get_running_loop().create_task(collect(plane.client.stream(plane.address, "quick", b"")))
    await asyncio.sleep(0.05)
    stopping = asyncio.get_running_loop().create_task(plane.server.stop(grace_s=2.0))
    await asyncio.sleep(0.05)
    with pytest.raises(WorkerUnavailable):
        await collect(plane.client.stream(plane.address, "count", b"a:1"))
    assert await running == [b"done"]
    await asyncio.wait_for(stopping, 1.0)


async def test_client_close_breaks_its_streams(plane: Plane) -> None:
    stream = plane.client.stream(plane.address, "ticks", b"")
    await anext(stream)
    await plane.client.close()
    with pytest.raises(StreamBroken):
        async for _ in stream:
            pass
    await asyncio.wait_for(plane.probe.cleaned.wait(), 1.0)


async def test_scheme_client_dispatches_by_address(plane: Plane) -> None:
    client = make_client()
    try:
        assert await collect(client.stream(plane.address, "count", b"m:2")) == [b"m:0", b"m:1"]
        with pytest.raises(ValueError, match="unsupported"):
            client.stream("udp://x:1", "count", b"")
    finally:
        await client.close()


async def test_registering_an_endpoint_twice_is_refused() -> None:
    server = InProcServer()

    async def h(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield payload

    server.register("e", h)
    with pytest.raises(ValueError, match="already registered"):
        server.register("e", h)
    with pytest.raises(ValueError):
        server.register("", h)
