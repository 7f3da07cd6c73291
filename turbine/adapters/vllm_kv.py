"""vLLM's KV events, relayed onto Turbine's event plane, and a mirror of vLLM's prefix cache.

vLLM's engine core (a separate process) publishes every step's KV events on a ZMQ PUB socket,
frames ``[topic, seq (8-byte big-endian), msgpack KVEventBatch]``, and keeps the last
``buffer_steps`` batches for replay on a ROUTER socket. The worker subscribes over ``ipc://``
(nothing listens on the network) and hands each batch, in order, to the worker's sink:

    engine core ──PUB ipc──▶ KvEventRelay ──▶ BlockMirror.apply ──▶ Worker sink ──▶ event plane ("kv")
                ◀─ROUTER ipc── replay(seq)       (gap in seq)        (same events, Turbine's seq)

The events are decoded by the router's own decoder (``KvEventDecoder``: both msgpack layouts,
bytes or int hashes), so a relayed event is exactly what a router subscribed to vLLM directly
would index. vLLM-only fields (``extra_keys``, ``group_idx`` ...) are not carried.

vLLM has no full-state dump (its replay returns recent *batches*, not the cache), so the mirror
rebuilds the state from the stream itself: it is exact while no batch is lost. A gap is filled
from vLLM's replay buffer; when the replay no longer holds it, the relay says so (warning),
clears the mirror and sends ``AllBlocksCleared``, and from then on forwards a BlockStored only
when its parent is known: the router relearns this worker's cache from new requests.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio

from turbine.protocols.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from turbine.router.kv_event_decoder import KvEventDecoder

log = logging.getLogger("turbine.adapters.vllm")

END_SEQ = (-1).to_bytes(8, "big", signed=True)  # vLLM's end-of-replay marker
REPLAY_TIMEOUT_S = 2.0


class _Block:
    __slots__ = ("parent", "tokens", "lora_id", "lora_name", "medium")

    def __init__(self, parent: int | None, tokens: list[int], lora_id: int | None, lora_name: str | None,
                 medium: str | None) -> None:
        self.parent = parent
        self.tokens = tokens
        self.lora_id = lora_id
        self.lora_name = lora_name
        self.medium = medium


class BlockMirror:
    """The blocks vLLM's prefix cache holds, as its events describe them (one owner: the relay).

    Keyed by vLLM's block hash; insertion order is store order, so a parent precedes its child.
    """

    def __init__(self) -> None:
        self._blocks: dict[int, _Block] = {}
        self.block_size: int | None = None
        self.orphans_dropped = 0  # BlockStored events not forwarded: parent unknown after a loss

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._blocks

    def clear(self) -> None:
        self._blocks.clear()

    def apply(self, events: list[KVEvent]) -> list[KVEvent]:
        """Apply events in order; returns those worth forwarding (all, unless some are orphans)."""
        blocks = self._blocks
        out: list[KVEvent] = []
        for ev in events:
            if type(ev) is BlockStored:
                bs = ev.block_size
                if ev.parent_block_hash is not None and ev.parent_block_hash not in blocks:
                    self.orphans_dropped += 1
                    continue
                if len(ev.token_ids) != bs * len(ev.block_hashes):
                    raise ValueError(f"BlockStored has {len(ev.block_hashes)} hashes but {len(ev.token_ids)} "
                                     f"tokens (block size {bs})")
                self.block_size = bs
                parent = ev.parent_block_hash
                for i, h in enumerate(ev.block_hashes):
                    blocks.pop(h, None)  # re-stored: move to the end, after its (new) parent
                    blocks[h] = _Block(parent, ev.token_ids[i * bs:(i + 1) * bs], ev.lora_id, ev.lora_name,
                                       ev.medium)
                    parent = h
            elif type(ev) is BlockRemoved:
                for h in ev.block_hashes:
                    blocks.pop(h, None)
            elif type(ev) is AllBlocksCleared:
                blocks.clear()
            out.append(ev)
        return out

    def snapshot(self) -> list[BlockStored]:
        """BlockStored events rebuilding the mirror, parents first; a chain stored in order is one event."""
        out: list[BlockStored] = []
        bs = self.block_size or 0
        cur: BlockStored | None = None
        for h, b in self._blocks.items():
            if (cur is not None and b.parent == cur.block_hashes[-1] and b.lora_id == cur.lora_id
                    and b.lora_name == cur.lora_name and b.medium == cur.medium):
                cur.block_hashes.append(h)
                cur.token_ids.extend(b.tokens)
                continue
            cur = BlockStored(block_hashes=[h], parent_block_hash=b.parent, token_ids=list(b.tokens),
                              block_size=bs, lora_id=b.lora_id, medium=b.medium, lora_name=b.lora_name)
            out.append(cur)
        return out

    def check_integrity(self) -> None:
        """Every block holds exactly one block of tokens (for tests)."""
        for h, b in self._blocks.items():
            if len(b.tokens) != self.block_size:
                raise AssertionError(f"block {h:#x} holds {len(b.tokens)} tokens, block size {self.block_size}")


@dataclass
class RelayStats:
    batches: int = 0
    events: int = 0
    gaps: int = 0  # times a sequence gap was seen
    replayed: int = 0  # batches recovered from vLLM's replay buffer
    lost: int = 0  # batches neither received nor replayable
    undecodable: int = 0


class KvEventRelay:
    """Subscribe to one vLLM publisher; deliver its events in sequence order to ``on_events``."""

    def __init__(self, endpoint: str, on_events: Callable[[list[KVEvent]], None], *,
                 replay_endpoint: str | None = None, topic: str = "") -> None:
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic.encode()
        self.on_events = on_events
        self.stats = RelayStats()
        self.decoder = KvEventDecoder()
        self._next_seq = 0  # vLLM numbers batches from 0
        self._ctx: zmq.asyncio.Context | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is not None:
            return
        self._ctx = zmq.asyncio.Context()
        sub = self._sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 0)  # never drop here: vLLM's own queue bounds the stream
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, self.topic)
        sub.connect(self.endpoint)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="vllm-kv-relay")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if self._sub is not None:
            self._sub.close(linger=0)
            self._sub = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    # -- the stream ---------------------------------------------------------------------------------
    async def _run(self) -> None:
        assert self._sub is not None
        while True:
            frames = await self._sub.recv_multipart()
            if len(frames) != 3:
                log.warning("vLLM KV publisher sent %d frames (expected 3); skipped", len(frames))
                continue
            await self.receive(int.from_bytes(frames[1], "big"), frames[2])

    async def receive(self, seq: int, payload: bytes) -> None:
        """One published batch: fill any gap before it, then deliver it."""
        if seq < self._next_seq:
            return  # already delivered (from a replay)
        if seq > self._next_seq:
            self.stats.gaps += 1
            await self._fill(self._next_seq, seq)
        self._deliver(seq, payload)

    def _deliver(self, seq: int, payload: bytes) -> None:
        self._next_seq = seq + 1
        self.stats.batches += 1
        try:
            batch = self.decoder.decode(payload)
        except ValueError as e:
            self.stats.undecodable += 1
            log.warning("undecodable vLLM KV event batch %d (%s): clearing the mirror", seq, e)
            self.on_events([AllBlocksCleared()])
            return
        self.stats.events += len(batch.events)
        if batch.events:
            self.on_events(batch.events)

    async def _fill(self, first: int, end: int) -> None:
        """Deliver batches ``first .. end-1`` from vLLM's replay buffer, or declare them lost."""
        got = await self._replay(first) if self.replay_endpoint else []
        wanted = [(s, p) for s, p in got if first <= s < end]
        if not wanted or wanted[0][0] != first or len(wanted) != end - first:
            have = {s for s, _ in wanted}
            missing = [s for s in range(first, end) if s not in have]
            self.stats.lost += len(missing)
            log.warning("vLLM KV event batches %d..%d lost (%d not replayable): the router forgets this "
                        "worker's cached blocks and relearns them from new requests", first, end - 1, len(missing))
            self.on_events([AllBlocksCleared()])
            wanted = [(s, p) for s, p in wanted if s > missing[-1]]
        for s, p in wanted:
            self.stats.replayed += 1
            self._deliver(s, p)
        self._next_seq = end

    async def _replay(self, start: int) -> list[tuple[int, bytes]]:
        """Ask vLLM's replay socket for every buffered batch from ``start`` on."""
        assert self._ctx is not None and self.replay_endpoint is not None
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        out: list[tuple[int, bytes]] = []
        try:
            sock.connect(self.replay_endpoint)
            await sock.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                if not await sock.poll(REPLAY_TIMEOUT_S * 1000):
                    log.warning("vLLM KV replay from %d timed out after %.1f s", start, REPLAY_TIMEOUT_S)
                    return out
                frames = await sock.recv_multipart()
                if len(frames) != 4:
                    continue
                _, _, seq_b, payload = frames
                if seq_b == END_SEQ:
                    return out
                out.append((int.from_bytes(seq_b, "big"), payload))
        finally:
            sock.close(linger=0)
