"""ZMQ event plane in vLLM's KV-event wire layout, so stock vLLM/SGLang publishers and subscribers
interoperate.

Each message is exactly three frames::

    [topic (utf-8) | seq (8-byte big-endian, +1 per message of this publisher) | payload]

The subscriber keeps one libzmq SUB socket per publisher, because SUB does not say which publisher
a message came from and ``ReceivedEvent.address`` must.

The publisher is not a libzmq PUB socket: it speaks the PUB side of ZMTP 3.0/3.1 (ZeroMQ's wire
protocol; NULL security, or PLAIN with the fleet's token) itself on an asyncio server, so any SUB or XSUB socket connects to it as
to a PUB and nothing changes on the wire. Why: a libzmq PUB, and an XPUB even in manual mode (it
keeps its own trie of every peer's subscriptions), stores whatever prefixes a peer sends, with no
limit on their size or number, and cannot say which connection sent one, so it cannot cut just the
offender. Measured with libzmq 4.3.5: a 20 MB prefix cost the publisher ~0.9 GB and blocked one
``send`` for seconds; 100k distinct 10-byte prefixes cost 17 MB. Here every connection has hard
bounds, checked before the work, and a connection past one is closed alone (logged at most every
10 s, counted in ``refused``; a libzmq peer reconnects and meets the same bounds):

- an inbound frame is at most ``max(512, max_prefix + 16)`` bytes: a longer one is refused from its
  header, before its body is read; a subscription prefix is at most ``max_prefix`` (256) bytes;
- at most ``max_subscriptions`` (64) distinct prefixes per connection;
- at most 1024 inbound frames in a burst and 256/s sustained per connection (subscribe, cancel,
  ping: a legitimate SUB sends a handful);
- at most ``max_subscribers`` (64) connections (more are closed at once); a connection that has
  not finished its handshake within ``handshake_timeout`` (10 s) is closed;
- outbound, per subscriber: at most ``sndhwm`` messages queued within one loop iteration and
  ``max_buffer_bytes`` (4 MiB) waiting in its transport; past that its messages are dropped (it
  sees a seq gap) and counted in ``dropped``.

With a cluster ``token`` the publisher announces ZMTP's PLAIN mechanism (RFC 24) and accepts a
subscriber only after its HELLO carries the token as password (compared in constant time; the
user name is ignored): ``HELLO -> WELCOME, INITIATE -> READY``. A peer offering NULL security, or
the wrong token, gets an ERROR command and is closed before it can subscribe (``refused_auth``).
Any libzmq SUB with ``plain_username``/``plain_password`` set connects as to a PUB socket whose
ZAP handler checks that password; ``ZmqEventSubscriber(token=...)`` does so.

So a connection costs the worker at most ~16 KiB of prefixes, one partial inbound frame and its
output buffer (64 connections: ~1 MiB of prefixes, 256 MiB of output if none of them reads), and
bounded loop time per inbound frame. ``publish()`` never blocks and does no I/O: it queues the
message for each subscriber whose prefixes match, and the queues are written once per loop
iteration. Call it on the loop that ran ``start()`` (from another thread it is handed to that loop).
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import struct
import threading
from collections.abc import Iterable

import zmq
import zmq.asyncio

from turbine.runtime.events import DEFAULT_MAX_QUEUE, EventSubscriber, ReceivedEvent

log = logging.getLogger("turbine.runtime")

_SEQ = struct.Struct(">Q")
_LONG = struct.Struct(">BQ")  # ZMTP long frame header: flags | 8-byte size
_SHORT = [bytes((0, n)) for n in range(256)]  # ZMTP short frame header of a last frame

# ZMTP 3.1 greeting: signature, version 3.1, mechanism NULL, as-server 0, filler.
_GREETING = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x01" + b"NULL".ljust(20, b"\0") + bytes(32)
# PLAIN (RFC 24): the same, mechanism PLAIN, as-server 1.
_GREETING_PLAIN = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x01" + b"PLAIN".ljust(20, b"\0") + b"\x01" + bytes(31)
_READY_BODY = b"\x05READY" + b"\x0bSocket-Type" + (3).to_bytes(4, "big") + b"PUB"
_READY = bytes((0x04, len(_READY_BODY))) + _READY_BODY
_WELCOME = bytes((0x04, 8)) + b"\x07WELCOME"
PLAIN_USER = b"turbine"
_PEER_TYPES = (b"SUB", b"XSUB")
_MORE, _LONG_FLAG, _COMMAND = 0x01, 0x02, 0x04

_BURST, _RATE = 1024, 256.0  # inbound frames per connection: burst, then per second
_WARN_EVERY_S = 10.0


def _frame(flags: int, body: bytes) -> bytes:
    n = len(body)
    return (bytes((flags, n)) if n < 256 else _LONG.pack(flags | _LONG_FLAG, n)) + body


def _socket_type(metadata: bytes) -> bytes | None:
    """The Socket-Type property of a READY command's metadata (None if malformed or absent)."""
    i, n, found = 0, len(metadata), None
    while i < n:
        k = metadata[i]
        name = metadata[i + 1:i + 1 + k]
        i += 1 + k
        if i + 4 > n:
            return None
        v = int.from_bytes(metadata[i:i + 4], "big")
        value = metadata[i + 4:i + 4 + v]
        i += 4 + v
        if i > n:
            return None
        if name.lower() == b"socket-type":
            found = value
    return found


class _Peer(asyncio.Protocol):
    """One subscriber connection: ZMTP handshake, its subscriptions, its outbound queue."""

    def __init__(self, pub: ZmqEventPublisher) -> None:
        self.pub = pub
        self.transport: asyncio.Transport | None = None
        self.peer: object = None
        self.buf = bytearray()
        self.greeted = False  # the peer's greeting arrived and was valid
        self.welcomed = False  # PLAIN: its HELLO carried the token
        self.ready = False  # ... and its READY (PLAIN: INITIATE): subscriptions may follow
        self.subs: set[bytes] = set()
        self.prefixes: tuple[bytes, ...] = ()
        self.out: list[bytes] = []  # messages waiting for the publisher's next flush
        self.paused = False  # the transport's buffer is past max_buffer_bytes
        self.tokens = float(_BURST)
        self.stamp = 0.0
        self.timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's is no asyncio.Transport)
        self.peer = transport.get_extra_info("peername")
        pub = self.pub
        if pub._server is None:
            transport.abort()
            return
        if len(pub._peers) >= pub.max_subscribers:
            pub._refuse(self, f"more than {pub.max_subscribers} subscriber connections")
            return
        pub._peers.add(self)
        loop = pub._loop
        assert loop is not None
        self.stamp = loop.time()
        transport.set_write_buffer_limits(high=pub.max_buffer_bytes)
        transport.write(_GREETING if pub._token is None else _GREETING_PLAIN)
        self.timer = loop.call_later(pub.handshake_timeout, self._handshake_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pub._forget(self)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        n, pos = len(buf), 0
        if not self.greeted:
            if buf[0] != 0xFF:
                self.pub._refuse(self, "not a ZMTP 3 peer")
                return
            if n < 64:
                return
            mechanism = bytes(buf[12:32]).rstrip(b"\0")
            if self.pub._token is not None:
                if not (buf[9] & 1) or buf[10] < 3:
                    self.pub._refuse(self, "not a ZMTP 3 peer")
                    return
                if mechanism != b"PLAIN":
                    self.pub._refuse(self, f"a peer without the cluster token ({mechanism!r} security)",
                                     auth=True, reason=b"the cluster token is required (PLAIN)")
                    return
                self.greeted, pos = True, 64
            else:
                if not (buf[9] & 1) or buf[10] < 3 or mechanism != b"NULL":
                    self.pub._refuse(self, "not a ZMTP 3 peer with NULL security")
                    return
                self.greeted, pos = True, 64
                assert self.transport is not None
                self.transport.write(_READY)
        limit = self.pub._max_frame
        while n - pos >= 2:
            flags = buf[pos]
            if flags & 0xF8:
                self.pub._refuse(self, "malformed frame")
                return
            if flags & _LONG_FLAG:
                if n - pos < 9:
                    break
                size, head = int.from_bytes(buf[pos + 1:pos + 9], "big"), 9
            else:
                size, head = buf[pos + 1], 2
            if size > limit:  # before its body is read
                self.pub._refuse(self, f"a {size}-byte frame (limit {limit})")
                return
            end = pos + head + size
            if end > n:
                break
            body = bytes(buf[pos + head:end])
            pos = end
            if not self._on_frame(flags, body):
                return
        del buf[:pos]

    def eof_received(self) -> bool:
        return False  # close our side too

    # -- protocol --
    def _on_frame(self, flags: int, body: bytes) -> bool:
        """Handle one inbound frame; False when the connection was closed."""
        pub = self.pub
        self.tokens -= 1
        if self.tokens < 0:
            now = pub._loop.time()  # type: ignore[union-attr]
            self.tokens = min(_BURST, self.tokens + (now - self.stamp) * _RATE)
            self.stamp = now
            if self.tokens < 0:
                pub._refuse(self, f"more than {_BURST} frames in a burst / {_RATE:.0f} per second")
                return False
        if flags & _COMMAND:
            k = body[0] if body else 0
            name, data = body[1:1 + k], body[1 + k:]
            if not self.ready and pub._token is not None:
                return self._plain(name, data)
            if not self.ready:
                if name != b"READY":
                    pub._refuse(self, "no READY command")
                    return False
                kind = _socket_type(data)
                if kind not in _PEER_TYPES:
                    pub._refuse(self, f"socket type {kind!r} cannot subscribe")
                    return False
                self.ready = True
                if self.timer is not None:
                    self.timer.cancel()
                    self.timer = None
                return True
            if name == b"SUBSCRIBE":
                return self._subscription(data, True)
            if name == b"CANCEL":
                return self._subscription(data, False)
            if name == b"PING":  # 2-byte TTL, then up to 16 bytes of context to echo
                assert self.transport is not None
                self.transport.write(_frame(_COMMAND, b"\x04PONG" + data[2:18]))
            elif name == b"ERROR":
                assert self.transport is not None
                self.transport.close()
                return False
            return True
        if not self.ready:
            pub._refuse(self, "a message before READY")
            return False
        if body and body[0] <= 1:  # ZMTP 3.0 form: \x01 prefix subscribes, \x00 prefix cancels
            return self._subscription(body[1:], body[0] == 1)
        return True  # anything else a subscriber sends upstream is ignored, as PUB does

    def _plain(self, name: bytes, data: bytes) -> bool:
        """The PLAIN handshake (server side): HELLO with the token, then INITIATE."""
        pub = self.pub
        assert self.transport is not None and pub._token is not None
        if not self.welcomed:
            if name != b"HELLO":
                pub._refuse(self, "no HELLO command", auth=True)
                return False
            password = b""
            if data:
                n = data[0]
                if 1 + n < len(data):
                    m = data[1 + n]
                    if len(data) == 2 + n + m:
                        password = data[2 + n:]
            if not hmac.compare_digest(password, pub._token):
                pub._refuse(self, "a subscriber did not present the cluster token", auth=True,
                            reason=b"wrong cluster token")
                return False
            self.welcomed = True
            self.transport.write(_WELCOME)
            return True
        if name != b"INITIATE":
            pub._refuse(self, "no INITIATE command")
            return False
        kind = _socket_type(data)
        if kind not in _PEER_TYPES:
            pub._refuse(self, f"socket type {kind!r} cannot subscribe")
            return False
        self.ready = True
        self.transport.write(_READY)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        return True

    def _subscription(self, prefix: bytes, subscribe: bool) -> bool:
        subs, pub = self.subs, self.pub
        if subscribe:
            if prefix in subs:
                return True
            if len(prefix) > pub.max_prefix:
                pub._refuse(self, f"a {len(prefix)}-byte subscription prefix (limit {pub.max_prefix})")
                return False
            if len(subs) >= pub.max_subscriptions:
                pub._refuse(self, f"more than {pub.max_subscriptions} subscriptions")
                return False
            subs.add(prefix)
        else:
            if prefix not in subs:
                return True
            subs.discard(prefix)
        self.prefixes = tuple(subs)
        pub._subscriptions_changed(self)
        return True

    def _handshake_expired(self) -> None:
        self.timer = None
        if not self.ready:
            self.pub._refuse(self, f"no handshake within {self.pub.handshake_timeout:g} s")


class ZmqEventPublisher:
    """PUB side of the event plane; see the module docstring for the bounds it enforces."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, sndhwm: int = 100_000,
                 max_buffer_bytes: int = 4 << 20, max_subscribers: int = 64,
                 max_subscriptions: int = 64, max_prefix: int = 256,
                 handshake_timeout: float = 10.0, token: str | None = None,
                 advertise_host: str | None = None) -> None:
        for name, value in (("sndhwm", sndhwm), ("max_buffer_bytes", max_buffer_bytes),
                            ("max_subscribers", max_subscribers), ("max_subscriptions", max_subscriptions),
                            ("handshake_timeout", handshake_timeout)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if max_prefix < 0:
            raise ValueError(f"max_prefix must be >= 0, got {max_prefix}")
        if token is not None and not 0 < len(token.encode()) <= 255:
            raise ValueError("the cluster token must be 1-255 bytes (ZMTP PLAIN)")
        self.host = host
        self.advertise_host = advertise_host
        self._token = token.encode() if token else None
        self.port = port
        self.sndhwm = sndhwm
        self.max_buffer_bytes = max_buffer_bytes
        self.max_subscribers = max_subscribers
        self.max_subscriptions = max_subscriptions
        self.max_prefix = max_prefix
        self.handshake_timeout = handshake_timeout
        self.address: str | None = None
        self.dropped = 0  # messages not sent to a subscriber that was too far behind
        self.refused = 0  # connections closed for breaking a bound (or the protocol)
        self.refused_auth = 0  # ... of which: no or a wrong cluster token
        self._max_frame = max(512, max_prefix + 16)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        self._server: asyncio.AbstractServer | None = None
        self._peers: set[_Peer] = set()
        self._seq = 0
        self._heads: dict[str, bytes] = {}  # topic -> its frame and the seq frame's header
        self._routes: dict[str, tuple[_Peer, ...]] = {}  # topic (one of _heads) -> subscribed peers
        self._dirty: list[_Peer] = []  # peers with queued messages
        self._flush_handle: asyncio.Handle | None = None
        self._warned_at = -_WARN_EVERY_S
        self._unwarned = 0

    async def start(self) -> str:
        if self._server is not None:
            raise RuntimeError("publisher already started")
        loop = asyncio.get_running_loop()
        sock = _listen(self.host, self.port)
        self._loop, self._thread = loop, threading.get_ident()
        try:
            server = await loop.create_server(lambda: _Peer(self), sock=sock, backlog=100,
                                              start_serving=False)
        except BaseException:
            sock.close()
            raise
        self._server = server  # before the first connection is accepted
        await server.start_serving()
        addr, port = sock.getsockname()[:2]
        if self.advertise_host:
            h = self.advertise_host
            address = f"tcp://[{h}]:{port}" if ":" in h else f"tcp://{h}:{port}"
        elif self.host in ("0.0.0.0", "::", "*"):
            address = f"tcp://{socket.gethostname()}:{port}"
        else:
            address = f"tcp://[{addr}]:{port}" if sock.family == socket.AF_INET6 else f"tcp://{addr}:{port}"
        self.address = address
        return address

    def publish(self, topic: str, payload: bytes) -> int:
        """Queue one message without blocking; returns its sequence number."""
        if self._server is None:
            raise RuntimeError("publish() before start() or after close()")
        head = self._heads.get(topic)
        if head is None:
            head = self._head(topic)
        seq = self._seq
        self._seq = seq + 1
        if threading.get_ident() != self._thread:
            n = len(payload)
            msg = b"".join((head, _SEQ.pack(seq), _SHORT[n] if n < 256 else _LONG.pack(_LONG_FLAG, n), payload))
            self._loop.call_soon_threadsafe(self._send, topic, msg)  # type: ignore[union-attr]
            return seq
        peers = self._routes.get(topic)
        if peers is None:
            peers = self._route(topic)
        if peers:
            n = len(payload)
            self._enqueue(peers, b"".join((head, _SEQ.pack(seq), _SHORT[n] if n < 256 else
                                           _LONG.pack(_LONG_FLAG, n), payload)))
        return seq

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for p in list(self._peers):
            if p.transport is not None:
                p.transport.abort()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._dirty.clear()
        self._routes.clear()
        await server.wait_closed()
        await asyncio.sleep(0)  # let the aborted transports' connection_lost run (they close the sockets)

    # -- internals --
    def _head(self, topic: str) -> bytes:
        tb = topic.encode()
        head = _frame(_MORE, tb) + b"\x01\x08"  # topic frame, then the seq frame's header
        if len(self._heads) < 1024:  # topics are few; don't grow without bound if they aren't
            self._heads[topic] = head
        return head

    def _route(self, topic: str) -> tuple[_Peer, ...]:
        tb = topic.encode()
        peers = tuple(p for p in self._peers if p.prefixes and tb.startswith(p.prefixes))
        if topic in self._heads:
            self._routes[topic] = peers
        return peers

    def _send(self, topic: str, msg: bytes) -> None:
        """publish() from another thread, on the loop."""
        if self._server is not None:
            peers = self._routes.get(topic)
            self._enqueue(peers if peers is not None else self._route(topic), msg)

    def _enqueue(self, peers: tuple[_Peer, ...], msg: bytes) -> None:
        hwm = self.sndhwm
        for p in peers:
            out = p.out
            if p.paused or len(out) >= hwm:
                self.dropped += 1
                continue
            if not out:
                self._dirty.append(p)
                if self._flush_handle is None:
                    self._flush_handle = self._loop.call_soon(self._flush)  # type: ignore[union-attr]
            out.append(msg)

    def _flush(self) -> None:
        self._flush_handle = None
        dirty, self._dirty = self._dirty, []
        for p in dirty:
            out = p.out
            if not out:
                continue
            t = p.transport
            if t is not None and not t.is_closing():
                t.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _subscriptions_changed(self, peer: _Peer) -> None:
        routes, prefixes = self._routes, peer.prefixes
        for topic, peers in routes.items():
            want = bool(prefixes) and topic.encode().startswith(prefixes)
            if want != (peer in peers):
                routes[topic] = peers + (peer,) if want else tuple(p for p in peers if p is not peer)

    def _forget(self, peer: _Peer) -> None:
        if peer.timer is not None:
            peer.timer.cancel()
            peer.timer = None
        peer.out.clear()
        peer.buf = bytearray()
        peer.subs.clear()
        if peer.prefixes:
            peer.prefixes = ()
            self._subscriptions_changed(peer)
        self._peers.discard(peer)

    def _refuse(self, peer: _Peer, why: str, *, auth: bool = False, reason: bytes | None = None) -> None:
        """Close a connection that broke a bound or the protocol; log it (rate-limited). With a
        ``reason``, a ZMTP ERROR command goes first (the transport flushes it, then closes)."""
        self.refused += 1
        self.refused_auth += auth
        if peer.transport is not None:
            if reason is not None and not peer.transport.is_closing():
                peer.transport.write(_frame(_COMMAND, b"\x05ERROR" + bytes((len(reason),)) + reason))
                peer.transport.close()
            else:
                peer.transport.abort()
        self._forget(peer)
        now = self._loop.time() if self._loop is not None else 0.0
        if now - self._warned_at >= _WARN_EVERY_S:
            more = f" ({self._unwarned} more since the last warning)" if self._unwarned else ""
            log.warning("event plane %s: closed the connection from %s: %s%s",
                        self.address, peer.peer, why, more)
            self._warned_at, self._unwarned = now, 0
        else:
            self._unwarned += 1


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket as libzmq would bind it: IPv6 only for a host with ':' (then dual-stack)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    bind_host = "0.0.0.0" if host == "*" else host
    info = socket.getaddrinfo(bind_host, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(info[0][4])
        sock.listen(100)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class ZmqEventSubscriber(EventSubscriber):
    def __init__(self, topics: Iterable[str] = ("",), *, rcvhwm: int = 100_000,
                 max_queue: int = DEFAULT_MAX_QUEUE, context: zmq.asyncio.Context | None = None,
                 token: str | None = None) -> None:
        super().__init__(topics, max_queue=max_queue)
        self.rcvhwm = rcvhwm
        self._token = token.encode() if token else None  # presented to publishers (ZMTP PLAIN)
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
        if self._token is not None:
            sock.setsockopt(zmq.PLAIN_USERNAME, PLAIN_USER)
            sock.setsockopt(zmq.PLAIN_PASSWORD, self._token)
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
