"""ZMQ event publisher against hostile and slow peers: memory stays bounded, the loop keeps
running, and legitimate subscribers (Turbine's and stock libzmq SUB sockets) keep receiving."""
from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import zmq
import zmq.asyncio

from turbine.runtime.events import ReceivedEvent
from turbine.runtime.events_zmq import ZmqEventPublisher, ZmqEventSubscriber

MB = 1 << 20
LOOPS = ["asyncio", "uvloop"]  # workers run uvloop, whose transports differ from asyncio's in details


def run_on(loop: str, main: Coroutine[Any, Any, None]) -> None:
    if loop == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


# A peer in another process (so its own buffers don't count in our RSS). An XSUB socket sends
# subscriptions as raw messages and, like SUB, resends all of them whenever it reconnects.
ATTACKER = r"""
import sys, time, zmq
address, mode = sys.argv[1], sys.argv[2]
ctx = zmq.Context()
s = ctx.socket(zmq.XSUB)
s.setsockopt(zmq.SNDHWM, 0)  # queue every subscription: none is dropped on our side
s.connect(address)
if mode == "huge-prefix":
    s.send(b"\x01" + b"k" * (20 * 1024 * 1024))
else:
    for i in range(100_000):
        s.send(b"\x01kv%08d" % i)
print("sent", flush=True)
time.sleep(60)
"""


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def recv(sub: ZmqEventSubscriber, timeout: float = 2.0) -> ReceivedEvent:
    return await asyncio.wait_for(anext(sub), timeout)


async def drain(sub: ZmqEventSubscriber) -> None:
    while True:
        try:
            await recv(sub, 0.1)
        except TimeoutError:
            return


async def joined(pub: ZmqEventPublisher, sub: ZmqEventSubscriber) -> None:
    deadline = time.monotonic() + 5
    while True:
        pub.publish("kv", b"probe")
        try:
            await recv(sub, 0.05)
            break
        except TimeoutError:
            assert time.monotonic() < deadline, "never joined"
    await drain(sub)


async def raw_joined(pub: ZmqEventPublisher, raw: zmq.asyncio.Socket, topic: str = "kv") -> None:
    deadline = time.monotonic() + 5
    while True:
        pub.publish(topic, b"probe")
        try:
            await asyncio.wait_for(raw.recv_multipart(), 0.05)
            break
        except TimeoutError:
            assert time.monotonic() < deadline, "never joined"
    while True:
        try:
            await asyncio.wait_for(raw.recv_multipart(), 0.1)
        except TimeoutError:
            return


async def _hostile_subscriptions_cost_bounded_memory(mode: str) -> None:
    pub = ZmqEventPublisher()
    address = await pub.start()
    sub = ZmqEventSubscriber()  # Turbine's subscriber, every topic
    ctx = zmq.asyncio.Context()
    raw = ctx.socket(zmq.SUB)  # a stock vLLM-style subscriber to one topic
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.SUBSCRIBE, b"kv")
    raw.connect(address)
    proc = None
    try:
        sub.connect(address)
        await joined(pub, sub)
        await raw_joined(pub, raw)
        base = peak = rss()
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", ATTACKER, address, mode,
                                                    stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        sent = asyncio.ensure_future(proc.stdout.readline())
        landed_by = None
        lag = 0.0
        deadline = time.monotonic() + 30
        while landed_by is None or time.monotonic() < landed_by:
            assert time.monotonic() < deadline, "the attacker never sent"
            t0 = time.monotonic()
            await asyncio.sleep(0.01)
            lag = max(lag, time.monotonic() - t0)
            pub.publish("load", b"x")
            peak = max(peak, rss())
            if landed_by is None and sent.done():
                assert sent.result() == b"sent\n"
                landed_by = time.monotonic() + 1.5  # time for it to arrive, reconnect and resend
        grown = (peak - base) / MB
        assert grown < 4, f"the publisher grew {grown:.1f} MB under a {mode} attack"
        assert lag < 0.5, f"the publisher's loop stalled {lag:.2f} s"
        assert pub.refused >= 1
        await drain(sub)
        while True:  # a frame of the raw subscriber may still be in flight
            try:
                await asyncio.wait_for(raw.recv_multipart(), 0.1)
            except TimeoutError:
                break
        # Both legitimate subscribers still get everything, in order.
        first = pub.publish("kv", b"after-0")
        for i in range(1, 100):
            pub.publish("kv", b"after-%d" % i)
        got = [await recv(sub) for _ in range(100)]
        assert [e.seq for e in got] == list(range(first, first + 100))
        assert [e.payload for e in got] == [b"after-%d" % i for i in range(100)]
        frames = [await asyncio.wait_for(raw.recv_multipart(), 2) for _ in range(100)]
        assert [f[2] for f in frames] == [b"after-%d" % i for i in range(100)]
        assert [int.from_bytes(f[1], "big") for f in frames] == list(range(first, first + 100))
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        raw.close(linger=0)
        ctx.term()
        await sub.close()
        await pub.close()


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("mode", ["huge-prefix", "many-prefixes"])
def test_hostile_subscriptions_cost_bounded_memory(loop: str, mode: str) -> None:
    run_on(loop, _hostile_subscriptions_cost_bounded_memory(mode))


async def _subscription_bounds_close_only_the_offender() -> None:
    pub = ZmqEventPublisher(max_subscriptions=4, max_prefix=8)
    address = await pub.start()
    sub = ZmqEventSubscriber(["kv"])
    ctx = zmq.asyncio.Context()
    try:
        sub.connect(address)
        await joined(pub, sub)
        for prefixes in ([b"k" * 9], [b"a", b"b", b"c", b"d", b"e"]):  # too long; one too many
            bad = ctx.socket(zmq.XSUB)
            bad.setsockopt(zmq.LINGER, 0)
            bad.setsockopt(zmq.RECONNECT_IVL, 10_000)
            bad.connect(address)
            refused = pub.refused
            for p in prefixes:
                await bad.send(b"\x01" + p)
            deadline = time.monotonic() + 5
            while pub.refused == refused:
                assert time.monotonic() < deadline, f"{prefixes} was accepted"
                await asyncio.sleep(0.01)
            bad.close(linger=0)
        assert len(pub._peers) == 1  # only the legitimate subscriber is left
        pub.publish("kv", b"still")
        assert (await recv(sub)).payload == b"still"
        # Exactly at the bounds is fine.
        ok = ctx.socket(zmq.SUB)
        ok.setsockopt(zmq.LINGER, 0)
        for p in (b"k" * 8, b"a", b"b", b"kv"):
            ok.setsockopt(zmq.SUBSCRIBE, p)
        ok.connect(address)
        await raw_joined(pub, ok)
        ok.close(linger=0)
        assert pub.refused == 2
    finally:
        ctx.destroy(linger=0)
        await sub.close()
        await pub.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_subscription_bounds_close_only_the_offender(loop: str) -> None:
    run_on(loop, _subscription_bounds_close_only_the_offender())


async def _unsubscribe_stops_delivery_of_that_topic() -> None:
    pub = ZmqEventPublisher()
    address = await pub.start()
    ctx = zmq.asyncio.Context()
    raw = ctx.socket(zmq.SUB)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.SUBSCRIBE, b"kv")
    raw.setsockopt(zmq.SUBSCRIBE, b"load")
    raw.connect(address)
    try:
        await raw_joined(pub, raw, "load")
        raw.setsockopt(zmq.UNSUBSCRIBE, b"load")
        deadline = time.monotonic() + 5
        while any(b"load" in p.subs for p in pub._peers):  # the cancel travels to the publisher
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        pub.publish("load", b"no")
        pub.publish("kv", b"yes")
        frames = await asyncio.wait_for(raw.recv_multipart(), 2)
        assert frames[0] == b"kv" and frames[2] == b"yes"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(raw.recv_multipart(), 0.2)
        # Turbine's subscriber: unsubscribe() and subscribe() after connecting.
        sub = ZmqEventSubscriber(["kv", "load"])
        sub.connect(address)
        await joined(pub, sub)
        sub.unsubscribe("kv")
        deadline = time.monotonic() + 5
        while sum(b"kv" in p.subs for p in pub._peers) != 1:  # only the raw socket still wants kv
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        pub.publish("kv", b"gone")
        pub.publish("load", b"here")
        ev = await recv(sub)
        assert (ev.topic, ev.payload) == ("load", b"here")
        await sub.close()
    finally:
        raw.close(linger=0)
        ctx.term()
        await pub.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_unsubscribe_stops_delivery_of_that_topic(loop: str) -> None:
    run_on(loop, _unsubscribe_stops_delivery_of_that_topic())


async def _connection_cap_and_handshake_timeout() -> None:
    pub = ZmqEventPublisher(max_subscribers=2, handshake_timeout=0.3)
    address = await pub.start()
    host, port = address[len("tcp://"):].rsplit(":", 1)
    silent = [socket.create_connection((host, int(port))) for _ in range(3)]
    try:
        for s in silent:
            s.settimeout(3)
        # The third connection is over the cap: closed at once, before any greeting.
        assert await asyncio.to_thread(silent[2].recv, 64) == b""
        # The other two get the greeting, then are closed for not answering it.
        t0 = time.monotonic()
        for s in silent[:2]:
            data = await asyncio.to_thread(s.recv, 1 << 16)
            assert data[:1] == b"\xff" and len(data) == 64
            assert await asyncio.to_thread(s.recv, 1 << 16) == b""
        assert 0.2 < time.monotonic() - t0 < 2
        assert pub.refused == 3
        deadline = time.monotonic() + 2
        while pub._peers:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        # Slots are free again for real subscribers.
        sub = ZmqEventSubscriber()
        sub.connect(address)
        await joined(pub, sub)
        await sub.close()
    finally:
        for s in silent:
            s.close()
        await pub.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_connection_cap_and_handshake_timeout(loop: str) -> None:
    run_on(loop, _connection_cap_and_handshake_timeout())


async def _a_subscriber_that_stops_reading_costs_bounded_memory() -> None:
    pub = ZmqEventPublisher(max_buffer_bytes=1 * MB)
    address = await pub.start()
    ctx = zmq.asyncio.Context()
    stuck = ctx.socket(zmq.SUB)  # never reads: libzmq stops reading the TCP socket past RCVHWM
    stuck.setsockopt(zmq.LINGER, 0)
    stuck.setsockopt(zmq.RCVHWM, 10)
    stuck.setsockopt(zmq.RCVBUF, 64 * 1024)
    stuck.setsockopt(zmq.SUBSCRIBE, b"")
    stuck.connect(address)
    try:
        await raw_joined(pub, stuck)
        base = rss()
        payload = b"x" * 4096
        for _ in range(100):  # 40 MB in all
            for _ in range(100):
                pub.publish("kv", payload)
            await asyncio.sleep(0)
        grown = (rss() - base) / MB
        assert pub.dropped > 8000
        assert grown < 6, f"grew {grown:.1f} MB"
    finally:
        stuck.close(linger=0)
        ctx.term()
        await pub.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_subscriber_that_stops_reading_costs_bounded_memory(loop: str) -> None:
    run_on(loop, _a_subscriber_that_stops_reading_costs_bounded_memory())


async def _heartbeating_subscriber_stays_connected() -> None:
    """libzmq heartbeats (ZMQ_HEARTBEAT_IVL): the publisher answers PING with PONG."""
    pub = ZmqEventPublisher()
    address = await pub.start()
    ctx = zmq.asyncio.Context()
    raw = ctx.socket(zmq.SUB)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.HEARTBEAT_IVL, 50)
    raw.setsockopt(zmq.HEARTBEAT_TIMEOUT, 200)
    raw.setsockopt(zmq.SUBSCRIBE, b"")
    raw.connect(address)
    try:
        await raw_joined(pub, raw)
        peers = set(pub._peers)
        await asyncio.sleep(1.0)  # 20 heartbeats; a missing PONG would cut it after 0.2 s
        assert pub._peers == peers and pub.refused == 0
        seq = pub.publish("kv", b"alive")
        frames = await asyncio.wait_for(raw.recv_multipart(), 2)
        assert frames == [b"kv", seq.to_bytes(8, "big"), b"alive"]
    finally:
        raw.close(linger=0)
        ctx.term()
        await pub.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_heartbeating_subscriber_stays_connected(loop: str) -> None:
    run_on(loop, _heartbeating_subscriber_stays_connected())


async def _close_cleans_up_and_publish_from_another_thread() -> None:
    pub = ZmqEventPublisher()
    address = await pub.start()
    with pytest.raises(RuntimeError):
        await pub.start()
    sub = ZmqEventSubscriber()
    sub.connect(address)
    try:
        await joined(pub, sub)
        seq = await asyncio.to_thread(pub.publish, "kv", b"from a thread")
        ev = await recv(sub)
        assert (ev.seq, ev.payload) == (seq, b"from a thread")
        pub.publish("kv", b"x" * 300)  # long frame
        assert (await recv(sub)).payload == b"x" * 300
    finally:
        await sub.close()
    before = {t for t in asyncio.all_tasks()}
    await pub.close()
    await pub.close()  # idempotent
    assert not pub._peers and not pub._dirty and pub._flush_handle is None
    assert {t for t in asyncio.all_tasks()} <= before
    with pytest.raises(RuntimeError):
        pub.publish("kv", b"")
    # The port is free again.
    again = ZmqEventPublisher(port=int(address.rpartition(":")[2]))
    assert await again.start() == address
    await again.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_close_cleans_up_and_publish_from_another_thread(loop: str) -> None:
    run_on(loop, _close_cleans_up_and_publish_from_another_thread())
