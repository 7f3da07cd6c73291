"""Event plane: publishers fan KV events and load metrics out to subscribers, by topic prefix.

Every publisher numbers its messages 0, 1, 2, ... across all topics, so a subscriber detects a
gap (a dropped message) from ``ReceivedEvent.seq``. Delivery is best effort, like ZMQ PUB/SUB: a
subscriber that falls too far behind loses messages (the gap tells it to resynchronize).

Two implementations share the subscriber side (``EventSubscriber``): ZMQ over TCP
(``events_zmq.py``; the wire layout of vLLM's KV events) and in-process (``InProcEventBus``,
addresses ``inproc-events://name``).
"""
from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable
from typing import Any, NamedTuple, Protocol

INPROC_SCHEME = "inproc-events://"
DEFAULT_MAX_QUEUE = 65536


class ReceivedEvent(NamedTuple):
    topic: str
    seq: int  # per publisher, +1 per message
    payload: bytes
    address: str  # the publisher's address, as passed to connect()


class EventPublisher(Protocol):
    async def start(self) -> str: ...

    def publish(self, topic: str, payload: bytes) -> int: ...

    async def close(self) -> None: ...


class EventSubscriber:
    """Receives from any number of publishers: ``async for ev in sub``.

    Subclasses move the messages; this class owns the bounded queue, the topic prefixes and the
    set of connected addresses. Events from an address still queued when it is disconnected are
    dropped, so nothing arrives from a publisher after ``disconnect()`` returns.
    """

    def __init__(self, topics: Iterable[str] = ("",), *, max_queue: int = DEFAULT_MAX_QUEUE) -> None:
        if max_queue <= 0:
            raise ValueError(f"max_queue must be positive, got {max_queue}")
        self._prefixes: list[str] = list(dict.fromkeys(topics))
        self._queue: asyncio.Queue[ReceivedEvent | None] = asyncio.Queue(max_queue)
        self._connected: set[str] = set()
        self._closed = False
        self.dropped = 0  # events lost because the queue was full

    @property
    def addresses(self) -> frozenset[str]:
        return frozenset(self._connected)

    @property
    def topics(self) -> tuple[str, ...]:
        return tuple(self._prefixes)

    def connect(self, address: str) -> None:
        if self._closed:
            raise RuntimeError("subscriber is closed")
        if address not in self._connected:
            self._connect(address)
            self._connected.add(address)

    def disconnect(self, address: str) -> None:
        if address in self._connected:
            self._connected.discard(address)
            self._disconnect(address)

    def subscribe(self, prefix: str) -> None:
        if prefix not in self._prefixes:
            self._prefixes.append(prefix)
            self._subscription_changed(prefix, True)

    def unsubscribe(self, prefix: str) -> None:
        if prefix in self._prefixes:
            self._prefixes.remove(prefix)
            self._subscription_changed(prefix, False)

    def __aiter__(self) -> EventSubscriber:
        return self

    async def __anext__(self) -> ReceivedEvent:
        while not self._closed:
            ev = await self._queue.get()
            if ev is None:
                break
            if ev.address in self._connected:
                return ev
        raise StopAsyncIteration

    async def close(self) -> None:
        """Disconnect everything; iteration ends."""
        if self._closed:
            return
        self._closed = True
        for address in list(self._connected):
            self.disconnect(address)
        await self._close()
        if not self._queue.full():
            self._queue.put_nowait(None)  # wake a waiting iterator

    def _matches(self, topic: str) -> bool:
        return any(topic.startswith(p) for p in self._prefixes)

    # -- transport hooks --
    def _connect(self, address: str) -> None:
        raise NotImplementedError

    def _disconnect(self, address: str) -> None:
        raise NotImplementedError

    def _subscription_changed(self, prefix: str, subscribed: bool) -> None:
        pass

    async def _close(self) -> None:
        pass


# --- in-process ----------------------------------------------------------------------------------
class _Channel:
    __slots__ = ("publisher", "subscribers")

    def __init__(self) -> None:
        self.publisher: InProcEventPublisher | None = None
        self.subscribers: set[InProcEventSubscriber] = set()


class InProcEventBus:
    """A namespace of in-process channels. Subscribers may connect before the publisher starts."""

    def __init__(self) -> None:
        self._channels: dict[str, _Channel] = {}
        self._names = itertools.count(1)

    def publisher(self, name: str | None = None) -> InProcEventPublisher:
        return InProcEventPublisher(self, name)

    def subscriber(self, topics: Iterable[str] = ("",), *, max_queue: int = DEFAULT_MAX_QUEUE) -> InProcEventSubscriber:
        return InProcEventSubscriber(self, topics, max_queue=max_queue)

    def _channel(self, name: str) -> _Channel:
        ch = self._channels.get(name)
        if ch is None:
            ch = self._channels[name] = _Channel()
        return ch

    def _release(self, name: str) -> None:
        ch = self._channels.get(name)
        if ch is not None and ch.publisher is None and not ch.subscribers:
            del self._channels[name]


def _channel_name(address: str) -> str:
    if not address.startswith(INPROC_SCHEME) or len(address) == len(INPROC_SCHEME):
        raise ValueError(f"malformed in-process event address {address!r} (want inproc-events://name)")
    return address[len(INPROC_SCHEME):]


class InProcEventPublisher:
    def __init__(self, bus: InProcEventBus, name: str | None = None) -> None:
        self._bus = bus
        self._name = name
        self._channel: _Channel | None = None
        self._seq = 0
        self.address: str | None = None

    async def start(self) -> str:
        if self._channel is not None:
            raise RuntimeError("publisher already started")
        name = self._name
        if name is None:
            name = f"pub-{next(self._bus._names)}"
            while name in self._bus._channels:
                name = f"pub-{next(self._bus._names)}"
        ch = self._bus._channel(name)
        if ch.publisher is not None:
            raise ValueError(f"an in-process publisher named {name!r} is already running")
        ch.publisher = self
        self._name, self._channel = name, ch
        self.address = INPROC_SCHEME + name
        return self.address

    def publish(self, topic: str, payload: bytes) -> int:
        ch = self._channel
        if ch is None:
            raise RuntimeError("publish() before start() or after close()")
        seq = self._seq
        self._seq = seq + 1
        for sub in ch.subscribers:
            sub._deliver(self.address, topic, seq, payload)  # type: ignore[arg-type]
        return seq

    async def close(self) -> None:
        if self._channel is not None and self._name is not None:
            self._channel.publisher = None
            self._channel = None
            self._bus._release(self._name)


class InProcEventSubscriber(EventSubscriber):
    def __init__(self, bus: InProcEventBus, topics: Iterable[str] = ("",), *,
                 max_queue: int = DEFAULT_MAX_QUEUE) -> None:
        super().__init__(topics, max_queue=max_queue)
        self._bus = bus

    def _connect(self, address: str) -> None:
        self._bus._channel(_channel_name(address)).subscribers.add(self)

    def _disconnect(self, address: str) -> None:
        name = _channel_name(address)
        self._bus._channel(name).subscribers.discard(self)
        self._bus._release(name)

    def _deliver(self, address: str, topic: str, seq: int, payload: bytes) -> None:
        if self._matches(topic):
            try:
                self._queue.put_nowait(ReceivedEvent(topic, seq, payload, address))
            except asyncio.QueueFull:
                self.dropped += 1


_default_bus = InProcEventBus()  # used by the factories when no bus is given


def make_event_publisher(kind: str = "zmq", **options: Any) -> EventPublisher:
    """``zmq`` (options: host, port, sndhwm) or ``inproc`` (options: bus, name)."""
    if kind == "zmq":
        from turbine.runtime.events_zmq import ZmqEventPublisher
        return ZmqEventPublisher(**options)
    if kind == "inproc":
        bus = options.pop("bus", None) or _default_bus
        return bus.publisher(**options)
    raise ValueError(f"unknown event-plane kind {kind!r} (want 'zmq' or 'inproc')")


def make_event_subscriber(kind: str = "zmq", topics: Iterable[str] = ("",), **options: Any) -> EventSubscriber:
    """``zmq`` (options: rcvhwm, max_queue) or ``inproc`` (options: bus, max_queue)."""
    if kind == "zmq":
        from turbine.runtime.events_zmq import ZmqEventSubscriber
        return ZmqEventSubscriber(topics, **options)
    if kind == "inproc":
        bus = options.pop("bus", None) or _default_bus
        return bus.subscriber(topics, **options)
    raise ValueError(f"unknown event-plane kind {kind!r} (want 'zmq' or 'inproc')")


def __getattr__(name: str) -> Any:
    # ZMQ classes load lazily: events_zmq imports this module, and pyzmq is only needed for TCP.
    if name in ("ZmqEventPublisher", "ZmqEventSubscriber"):
        from turbine.runtime import events_zmq
        return getattr(events_zmq, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
