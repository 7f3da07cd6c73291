"""Event plane: ZMQ (vLLM wire layout) and in-process publishers/subscribers."""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import zmq
import zmq.asyncio

from turbine.runtime.events import (
    EventSubscriber,
    InProcEventBus,
    ReceivedEvent,
    make_event_publisher,
    make_event_subscriber,
)
from turbine.runtime.events_zmq import ZmqEventPublisher, ZmqEventSubscriber


@dataclass
class Kind:
    name: str
    publisher: Callable[[], ZmqEventPublisher]  # (or an InProcEventPublisher)
    subscriber: Callable[..., EventSubscriber]


@pytest.fixture(params=["zmq", "inproc"])
def kind(request: pytest.FixtureRequest) -> Kind:
    if request.param == "zmq":
        return Kind("zmq", ZmqEventPublisher, ZmqEventSubscriber)
    bus = InProcEventBus()
    return Kind("inproc", bus.publisher, bus.subscriber)  # type: ignore[arg-type]


async def recv(sub: EventSubscriber, timeout: float = 2.0) -> ReceivedEvent:
    return await asyncio.wait_for(anext(sub), timeout)


async def joined(pub: ZmqEventPublisher, sub: EventSubscriber, address: str) -> None:
    """Publish probes until one arrives (ZMQ drops what is sent before a SUB has joined), then
    drain the probes still in flight."""
    deadline = time.monotonic() + 5
    while True:
        pub.publish("probe", b"")
        try:
            ev = await recv(sub, 0.05)
            if ev.address == address:
                break
        except TimeoutError:
            assert time.monotonic() < deadline, f"never joined {address}"
    while True:
        try:
            await recv(sub, 0.1)
        except TimeoutError:
            return


async def test_two_publishers_one_subscriber_contiguous_seqs(kind: Kind) -> None:
    p1, p2 = kind.publisher(), kind.publisher()
    a1, a2 = await p1.start(), await p2.start()
    assert a1 != a2
    if kind.name == "zmq":
        assert a1.startswith("tcp://127.0.0.1:")
    sub = kind.subscriber()
    try:
        sub.connect(a1)
        sub.connect(a2)
        await joined(p1, sub, a1)
        await joined(p2, sub, a2)
        first = {a1: p1.publish("kv", b"a0"), a2: p2.publish("kv", b"b0")}
        for i in range(1, 200):
            assert p1.publish("kv", b"a%d" % i) == first[a1] + i
            p2.publish("kv", b"b%d" % i)
        got: dict[str, list[ReceivedEvent]] = {a1: [], a2: []}
        for _ in range(400):
            ev = await recv(sub)
            got[ev.address].append(ev)
        for addr, tag in ((a1, b"a"), (a2, b"b")):
            assert [e.seq for e in got[addr]] == list(range(first[addr], first[addr] + 200))
            assert [e.payload for e in got[addr]] == [tag + b"%d" % i for i in range(200)]
            assert {e.topic for e in got[addr]} == {"kv"}
    finally:
        await sub.close()
        await p1.close()
        await p2.close()


async def test_disconnect_stops_delivery_from_that_publisher(kind: Kind) -> None:
    p1, p2 = kind.publisher(), kind.publisher()
    a1, a2 = await p1.start(), await p2.start()
    sub = kind.subscriber()
    try:
        sub.connect(a1)
        sub.connect(a2)
        await joined(p1, sub, a1)
        await joined(p2, sub, a2)
        p1.publish("kv", b"before")
        sub.disconnect(a1)  # its queued event is dropped too
        assert sub.addresses == {a2}
        for _ in range(5):
            p1.publish("kv", b"after")
        p2.publish("kv", b"other")
        ev = await recv(sub)
        assert (ev.address, ev.payload) == (a2, b"other")
        with pytest.raises(TimeoutError):
            await recv(sub, 0.2)
    finally:
        await sub.close()
        await p1.close()
        await p2.close()


async def test_topic_prefixes(kind: Kind) -> None:
    pub = kind.publisher()
    address = await pub.start()
    sub = kind.subscriber(["kv"])
    try:
        sub.connect(address)
        deadline = time.monotonic() + 5
        while True:  # join using a topic the subscriber wants
            pub.publish("kv-probe", b"")
            try:
                await recv(sub, 0.05)
                break
            except TimeoutError:
                assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
        while True:
            try:
                await recv(sub, 0.05)
            except TimeoutError:
                break
        pub.publish("load", b"x")
        pub.publish("kv", b"y")
        ev = await recv(sub)
        assert (ev.topic, ev.payload) == ("kv", b"y")
        sub.subscribe("load")
        await asyncio.sleep(0.2)  # (ZMQ) let the subscription reach the publisher
        pub.publish("load", b"z")
        ev = await recv(sub)
        assert (ev.topic, ev.payload) == ("load", b"z")
        assert sub.topics == ("kv", "load")
    finally:
        await sub.close()
        await pub.close()


async def test_close_ends_iteration(kind: Kind) -> None:
    pub = kind.publisher()
    address = await pub.start()
    sub = kind.subscriber()
    sub.connect(address)

    async def consume() -> list[ReceivedEvent]:
        return [ev async for ev in sub]

    task = asyncio.get_running_loop().create_task(consume())
    await asyncio.sleep(0.05)
    await sub.close()
    assert await asyncio.wait_for(task, 1) == []
    await pub.close()
    with pytest.raises(RuntimeError):
        pub.publish("kv", b"")
    with pytest.raises(RuntimeError):
        sub.connect(address)


async def test_zmq_wire_layout_is_vllms() -> None:
    pub = ZmqEventPublisher()
    address = await pub.start()
    ctx = zmq.asyncio.Context()
    raw = ctx.socket(zmq.SUB)
    raw.setsockopt(zmq.SUBSCRIBE, b"")
    raw.connect(address)
    try:
        deadline = time.monotonic() + 5
        while True:
            seq = pub.publish("kv", b"payload")
            try:
                frames = await asyncio.wait_for(raw.recv_multipart(), 0.05)
                break
            except TimeoutError:
                assert time.monotonic() < deadline
        assert len(frames) == 3
        assert frames[0] == b"kv" and len(frames[1]) == 8 and frames[2] == b"payload"
        assert int.from_bytes(frames[1], "big") <= seq
    finally:
        raw.close(linger=0)
        ctx.term()
        await pub.close()


async def test_zmq_close_releases_every_socket() -> None:
    pubs = [ZmqEventPublisher() for _ in range(3)]
    addresses = [await p.start() for p in pubs]
    sub = ZmqEventSubscriber()
    for a in addresses:
        sub.connect(a)
    sub.disconnect(addresses[0])  # a reader still closing when close() runs
    sub_ctx = sub._ctx
    t0 = time.monotonic()
    await asyncio.wait_for(sub.close(), 2)
    for p in pubs:
        await p.close()
    assert time.monotonic() - t0 < 1.0  # context.term() would block on a leaked socket
    assert sub_ctx is not None and sub_ctx.closed
    for p, a in zip(pubs, addresses, strict=True):  # the publishers' listening sockets are closed
        assert not p._peers
        probe = ZmqEventPublisher(port=int(a.rpartition(":")[2]))
        await probe.start()
        await probe.close()


async def test_zmq_leaves_a_shared_context_without_open_sockets() -> None:
    """With a caller-owned context, close() must close its own sockets: term() then returns."""
    async_ctx = zmq.asyncio.Context()
    pub = ZmqEventPublisher()  # (speaks ZMTP itself: it has no context)
    address = await pub.start()
    sub = ZmqEventSubscriber(context=async_ctx)
    sub.connect(address)
    sub.connect("tcp://127.0.0.1:1")  # nobody there: ZMQ keeps retrying in the background
    sockets = list(sub._sockets.values())
    sub.disconnect(address)  # (its reader never ran)
    await sub.close()
    await pub.close()
    assert all(s.closed for s in sockets)
    assert not async_ctx.closed  # not ours to terminate
    done = threading.Event()
    threading.Thread(target=lambda: (async_ctx.term(), done.set()), daemon=True).start()
    assert await asyncio.to_thread(done.wait, 2.0), "context.term() blocked: a socket was left open"


async def test_zmq_subscriber_rejects_other_schemes() -> None:
    sub = ZmqEventSubscriber()
    with pytest.raises(ValueError):
        sub.connect("inproc-events://x")
    await sub.close()


async def test_inproc_subscriber_may_connect_before_the_publisher_starts() -> None:
    bus = InProcEventBus()
    sub = bus.subscriber()
    sub.connect("inproc-events://late")
    pub = bus.publisher("late")
    assert await pub.start() == "inproc-events://late"
    assert pub.publish("kv", b"x") == 0
    assert (await recv(sub)).payload == b"x"
    with pytest.raises(ValueError):
        await bus.publisher("late").start()
    await sub.close()
    await pub.close()
    assert bus._channels == {}


async def test_inproc_full_queue_drops_and_counts() -> None:
    bus = InProcEventBus()
    pub = bus.publisher()
    sub = bus.subscriber(max_queue=3)
    sub.connect(await pub.start())
    seqs = [pub.publish("kv", b"") for _ in range(5)]
    assert seqs == [0, 1, 2, 3, 4] and sub.dropped == 2
    assert [(await recv(sub)).seq for _ in range(3)] == [0, 1, 2]
    await sub.close()
    await pub.close()


async def test_factories() -> None:
    pub = make_event_publisher("inproc")
    sub = make_event_subscriber("inproc", ["kv"])
    sub.connect(await pub.start())
    pub.publish("kv", b"1")
    assert (await recv(sub)).payload == b"1"
    await sub.close()
    await pub.close()
    assert isinstance(make_event_publisher("zmq"), ZmqEventPublisher)
    assert isinstance(make_event_subscriber("zmq"), ZmqEventSubscriber)
    with pytest.raises(ValueError):
        make_event_publisher("nats")
