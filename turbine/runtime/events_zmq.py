"""ZMQ event plane in vLLM's KV-event wire layout, so stock vLLM/SGLang publishers interoperate.

Each message is exactly three frames::

    [topic (utf-8) | seq (8-byte big-endian, +1 per message of this publisher) | payload]

The publisher binds a PUB socket (loopback by default) and never blocks: past the high-water
mark ZMQ drops. The subscriber keeps one SUB socket per publisher, because SUB does not say which
publisher a message came from and ``ReceivedEvent.address`` must.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Iterable

import zmq
import zmq.asyncio

from turbine.runtime.events import DEFAULT_MAX_QUEUE, EventSubscriber, ReceivedEvent

log = logging.getLogger("turbine.runtime")

_SEQ = struct.Struct(">Q")


class ZmqEventPublisher:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, sndhwm: int = 100_000,
                 context: zmq.Context | None = None) -> None:  # type: ignore[type-arg]
        self.host = host
        self.port = port
        self.sndhwm = sndhwm
        self.address: str | None = None
        self.dropped = 0
        self._own_ctx = context is None
        self._ctx = context
        self._sock: zmq.Socket | None = None  # type: ignore[type-arg]
        self._seq = 0
        self._topics: dict[str, bytes] = {}

    async def start(self) -> str:
        if self._sock is not None:
            raise RuntimeError("publisher already started")
        if self._ctx is None:
            self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.sndhwm)
        if ":" in self.host:
            sock.setsockopt(zmq.IPV6, 1)
        host = f"[{self.host}]" if ":" in self.host else self.host
        try:
            sock.bind(f"tcp://{host}:{self.port or '*'}")
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        self._sock = sock
        address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.host in ("0.0.0.0", "::", "*"):
            address = f"tcp://{socket.gethostname()}:{address.rpartition(':')[2]}"
        self.address = address
        return address

    def publish(self, topic: str, payload: bytes) -> int:
        """Queue one message without blocking; returns its sequence number."""
        sock = self._sock
        if sock is None:
            raise RuntimeError("publish() before start() or after close()")
        tb = self._topics.get(topic)
        if tb is None:
            tb = topic.encode()
            if len(self._topics) < 1024:  # topics are few; don't grow without bound if they aren't
                self._topics[topic] = tb
        seq = self._seq
        self._seq = seq + 1
        try:
            sock.send_multipart((tb, _SEQ.pack(seq), payload), zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
        return seq

    async def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._own_ctx and self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None


class ZmqEventSubscriber(EventSubscriber):
    def __init__(self, topics: Iterable[str] = ("",), *, rcvhwm: int = 100_000,
                 max_queue: int = DEFAULT_MAX_QUEUE, context: zmq.asyncio.Context | None = None) -> None:
        super().__init__(topics, max_queue=max_queue)
        self.rcvhwm = rcvhwm
        self._own_ctx = context is None
        self._ctx = context
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self._readers: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # includes readers still closing

    def _connect(self, address: str) -> None:
        if not address.startswith("tcp://"):
            raise ValueError(f"ZMQ subscriber needs a tcp:// address, got {address!r}")
        loop = asyncio.get_running_loop()
        if self._ctx is None:
            self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
        for p in self._prefixes:
            sock.setsockopt(zmq.SUBSCRIBE, p.encode())
        sock.connect(address)
        task = loop.create_task(self._read(address, sock))
        self._sockets[address] = sock
        self._readers[address] = task
        self._tasks.add(task)
        # A done callback (not the reader's finally) closes the socket: it also runs for a reader
        # cancelled before it ever started.
        task.add_done_callback(lambda t, s=sock: (self._tasks.discard(t), s.close(linger=0)))

    def _disconnect(self, address: str) -> None:
        self._sockets.pop(address, None)
        task = self._readers.pop(address, None)
        if task is not None:
            task.cancel()  # its done callback closes the socket

    def _subscription_changed(self, prefix: str, subscribed: bool) -> None:
        opt = zmq.SUBSCRIBE if subscribed else zmq.UNSUBSCRIBE
        for sock in self._sockets.values():
            sock.setsockopt(opt, prefix.encode())

    async def _close(self) -> None:
        tasks = list(self._tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._own_ctx and self._ctx is not None:
            self._ctx.destroy(linger=0)  # every socket is closed already; destroy() cannot block on one
            self._ctx = None

    async def _read(self, address: str, sock: zmq.asyncio.Socket) -> None:
        queue = self._queue
        try:
            while True:
                frames = await sock.recv_multipart()
                if len(frames) != 3 or len(frames[1]) != 8:
                    log.warning("event plane: ignoring a %d-frame message from %s (want "
                                "[topic, seq, payload])", len(frames), address)
                    continue
                await queue.put(ReceivedEvent(frames[0].decode("utf-8", "replace"),
                                              _SEQ.unpack(frames[1])[0], frames[2], address))
        except asyncio.CancelledError:
            pass
        except zmq.ZMQError as e:
            if not self._closed:
                log.warning("event plane: subscription to %s failed: %s", address, e)
