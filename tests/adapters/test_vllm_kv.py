"""vLLM KV event relay and prefix-cache mirror, against a publisher speaking vLLM's wire (no vLLM needed).

The fake publisher copies vLLM 0.32's ZmqEventPublisher: PUB frames ``[topic, seq, payload]`` with
an array-like batch holding map-layout (tagged, not array-like) events, and a ROUTER replay socket
that answers ``[b"", start_seq]`` with every buffered batch from there on, then an end marker.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest
import zmq
import zmq.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from turbine.adapters.vllm_kv import END_SEQ, BlockMirror, KvEventRelay
from turbine.protocols.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from turbine.router.router import Router

BS = 4
_enc = msgspec.msgpack.Encoder()


def stored(hashes: list[int], parent: int | None, first_token: int = 0) -> BlockStored:
    tokens = [first_token + i for i in range(BS * len(hashes))]
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=BS,
                       medium="GPU")


def vllm_payload(events: list[KVEvent]) -> bytes:
    """A batch as vLLM 0.32 encodes it: array batch, map events with vLLM-only extra fields."""
    out = []
    for ev in events:
        if type(ev) is BlockStored:
            out.append({"type": "BlockStored", "block_hashes": ev.block_hashes,
                        "parent_block_hash": ev.parent_block_hash, "token_ids": ev.token_ids,
                        "block_size": ev.block_size, "lora_id": None, "medium": ev.medium, "lora_name": None,
                        "extra_keys": [None] * len(ev.block_hashes), "group_idx": 0,
                        "kv_cache_spec_kind": "full_attention"})
        elif type(ev) is BlockRemoved:
            out.append({"type": "BlockRemoved", "block_hashes": ev.block_hashes, "medium": "GPU", "group_idx": 0})
        else:
            out.append({"type": "AllBlocksCleared"})
    return _enc.encode([1.0, out, 0])


class FakeVllmPublisher:
    def __init__(self, tmp: Path, buffer_steps: int = 100) -> None:
        self.ctx = zmq.asyncio.Context()
        self.endpoint, self.replay_endpoint = f"ipc://{tmp}/kv", f"ipc://{tmp}/kv-replay"
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.bind(self.endpoint)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind(self.replay_endpoint)
        self.buffer: list[tuple[int, bytes]] = []
        self.buffer_steps = buffer_steps
        self.seq = 0
        self.replays = 0
        self.task = asyncio.get_running_loop().create_task(self._serve_replay())

    async def publish(self, events: list[KVEvent], *, drop: bool = False) -> None:
        """Publish one batch (``drop``: keep it only in the replay buffer, as if PUB lost it)."""
        payload = vllm_payload(events)
        if not drop:
            await self.pub.send_multipart([b"kv", self.seq.to_bytes(8, "big"), payload])
        self.buffer = (self.buffer + [(self.seq, payload)])[-self.buffer_steps:]
        self.seq += 1

    async def _serve_replay(self) -> None:
        while True:
            client, _, start = await self.router.recv_multipart()
            self.replays += 1
            for seq, payload in self.buffer:
                if seq >= int.from_bytes(start, "big"):
                    await self.router.send_multipart([client, b"", b"kv", seq.to_bytes(8, "big"), payload])
            await self.router.send_multipart([client, b"", b"", END_SEQ, b""])

    async def close(self) -> None:
        self.task.cancel()
        self.pub.close(0)
        self.router.close(0)
        self.ctx.term()


async def wait_for(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def rig(tmp_path: Path):  # type: ignore[no-untyped-def]
    pub = FakeVllmPublisher(tmp_path)
    mirror = BlockMirror()
    got: list[KVEvent] = []
    relay = KvEventRelay(pub.endpoint, lambda evs: got.extend(mirror.apply(evs)),
                         replay_endpoint=pub.replay_endpoint, topic="kv")
    await relay.start()
    await asyncio.sleep(0.1)  # let the subscription reach the publisher
    yield pub, relay, mirror, got
    await relay.close()
    await pub.close()


async def test_relay_delivers_vllm_batches_in_order(rig) -> None:  # type: ignore[no-untyped-def]
    pub, relay, mirror, got = rig
    await pub.publish([stored([1, 2], None)])
    await pub.publish([stored([3], 2, 8), BlockRemoved(block_hashes=[3])])
    await wait_for(lambda: len(got) == 3)
    assert got == [stored([1, 2], None), stored([3], 2, 8), BlockRemoved(block_hashes=[3], medium="GPU")]
    assert relay.stats.batches == 2 and relay.stats.gaps == 0 and pub.replays == 0
    assert mirror.snapshot() == [stored([1, 2], None)]


async def test_a_gap_is_filled_from_vllms_replay_buffer(rig) -> None:  # type: ignore[no-untyped-def]
    pub, relay, mirror, got = rig
    await pub.publish([stored([1], None)])
    await pub.publish([stored([2], 1, 4)], drop=True)
    await pub.publish([stored([3], 2, 8)])
    await wait_for(lambda: len(got) == 3)
    assert [ev.block_hashes for ev in got] == [[1], [2], [3]]  # type: ignore[union-attr]
    assert relay.stats.gaps == 1 and relay.stats.replayed == 1 and relay.stats.lost == 0
    assert mirror.snapshot() == [stored([1, 2, 3], None)]  # one chain, one event


async def test_a_slow_joiner_recovers_the_first_batches(tmp_path: Path) -> None:
    pub = FakeVllmPublisher(tmp_path)
    await pub.publish([stored([1], None)])  # before anyone subscribed
    mirror = BlockMirror()
    relay = KvEventRelay(pub.endpoint, mirror.apply, replay_endpoint=pub.replay_endpoint, topic="kv")
    await relay.start()
    await asyncio.sleep(0.1)
    await pub.publish([stored([2], 1, 4)])
    try:
        await wait_for(lambda: len(mirror) == 2)
        assert relay.stats.replayed == 1
    finally:
        await relay.close()
        await pub.close()


async def test_lost_batches_clear_the_state_and_orphans_stay_out(tmp_path: Path) -> None:
    pub = FakeVllmPublisher(tmp_path, buffer_steps=1)
    mirror = BlockMirror()
    got: list[KVEvent] = []
    relay = KvEventRelay(pub.endpoint, lambda evs: got.extend(mirror.apply(evs)),
                         replay_endpoint=pub.replay_endpoint, topic="kv")
    await relay.start()
    await asyncio.sleep(0.1)
    try:
        await pub.publish([stored([1], None)])
        await pub.publish([stored([2], 1, 4)], drop=True)  # lost: the buffer keeps only the newest
        await pub.publish([stored([3], 2, 8)], drop=True)
        await pub.publish([stored([9], None, 40)])  # a fresh root: forwarded
        await pub.publish([stored([4], 3, 12)])  # child of a lost block: an orphan
        await wait_for(lambda: relay.stats.batches >= 3)
        assert relay.stats.lost == 2
        assert got[0] == stored([1], None) and got[1] == AllBlocksCleared()
        assert got[2:] == [stored([9], None, 40)]
        assert mirror.snapshot() == [stored([9], None, 40)] and mirror.orphans_dropped == 1
    finally:
        await relay.close()
        await pub.close()


# --- the mirror: snapshots rebuild exactly what the event stream built ---------------------------
ops = st.lists(st.tuples(st.sampled_from(["store", "store", "store", "remove", "clear"]),
                         st.integers(0, 30), st.integers(1, 3)), max_size=40)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_snapshot_rebuilds_the_router_index_of_the_stream(script: list[tuple[str, int, int]]) -> None:
    """Random vLLM-like streams: a router fed the stream and one reset from the snapshot agree."""
    mirror = BlockMirror()
    live, rebuilt = Router("kv", block_size=BS), Router("kv", block_size=BS)
    next_hash = 100
    held: dict[int, list[int]] = {}  # hash -> tokens of the prefix ending there
    for op, pick, n in script:
        if op == "store":
            keys = sorted(held)
            parent = keys[pick % len(keys)] if keys and pick % 3 else None
            prefix = held[parent] if parent is not None else []
            hashes = list(range(next_hash, next_hash + n))
            next_hash += n
            ev = BlockStored(block_hashes=hashes, parent_block_hash=parent, block_size=BS,
                             token_ids=[(next_hash * 7 + i) % 97 for i in range(BS * n)])
            for i, h in enumerate(hashes):
                held[h] = prefix + ev.token_ids[: BS * (i + 1)]
        elif op == "remove" and held:
            keys = sorted(held)
            h = keys[pick % len(keys)]
            ev = BlockRemoved(block_hashes=[h])  # type: ignore[assignment]
            held.pop(h)
        elif op == "clear":
            ev = AllBlocksCleared()  # type: ignore[assignment]
            held.clear()
        else:
            continue
        forwarded = mirror.apply([ev])
        assert forwarded == [ev]  # a complete stream never has orphans
        assert live.apply_kv_events("w", forwarded)
        mirror.check_integrity()
    assert len(mirror) == len(held)
    rebuilt.reset_worker("w", mirror.snapshot())
    for tokens in held.values():
        a = live.index.find_matches_for_tokens(tokens)
        b = rebuilt.index.find_matches_for_tokens(tokens)
        assert a == b, tokens


def test_mirror_refuses_a_malformed_store() -> None:
    with pytest.raises(ValueError, match="tokens"):
        BlockMirror().apply([BlockStored(block_hashes=[1, 2], parent_block_hash=None, token_ids=[1] * BS,
                                         block_size=BS)])
