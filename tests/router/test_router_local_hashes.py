"""KV events that carry their blocks' local hashes (Turbine's engines send them) build the same
index as events the router hashes itself, through the inline path, the wire and the applier's
split; a malformed one is refused whole."""
from __future__ import annotations

import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_router_applier import BS, Chains, random_events, state
from turbine.protocols.kv_events import BlockStored, KVEventBatch, enc_hook
from turbine.router import kv_event_applier
from turbine.router.indexer import hash_blocks
from turbine.router.router import Router


def with_locals(ev: object) -> object:
    if type(ev) is BlockStored:
        return msgspec.structs.replace(ev, local_hashes=hash_blocks(ev.token_ids, BS))
    return ev


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), steps=st.integers(1, 60))
def test_local_hashes_index_exactly_as_the_tokens_do(seed: int, steps: int) -> None:
    rng = random.Random(seed)
    workers = {w: Chains(rng, w) for w in ("w0", "w1")}
    hashed, given_ = Router("kv", block_size=BS), Router("kv", block_size=BS)
    for _ in range(steps):
        w = rng.choice(list(workers))
        evs = random_events(rng, workers[w], rng.randint(1, 3))
        assert hashed.apply_kv_events(w, evs) == given_.apply_kv_events(w, [with_locals(e) for e in evs])
        assert state(hashed.index) == state(given_.index)
    probe = rng.choice(list(workers["w0"].held.values()) or [None])
    if probe is not None:
        toks = probe.token_ids
        assert hashed.index.find_matches_for_tokens(toks) == given_.index.find_matches_for_tokens(toks)


class VllmBlockStored(msgspec.Struct, array_like=True, tag="BlockStored"):
    """vLLM's own layout (no local hashes): a consumer that knows only it."""
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None


def test_the_wire_keeps_vllms_layout_and_carries_them() -> None:
    ev = with_locals(BlockStored(block_hashes=[7, 8], parent_block_hash=None, token_ids=list(range(2 * BS)),
                                 block_size=BS, medium="cpu"))
    wire = msgspec.msgpack.encode(KVEventBatch(ts=0.0, events=[ev]), enc_hook=enc_hook)
    assert msgspec.msgpack.decode(wire, type=KVEventBatch).events[0] == ev  # Turbine's router gets them
    raw = msgspec.msgpack.decode(wire)[1][0]
    assert raw[:7] == ["BlockStored", [7, 8], None, list(range(2 * BS)), BS, None, "cpu"]  # vLLM's positions
    assert raw[8] == hash_blocks(ev.token_ids, BS)  # appended after them
    old = msgspec.msgpack.decode(msgspec.msgpack.encode(raw), type=VllmBlockStored)  # a vLLM-layout reader
    assert (old.block_hashes, old.token_ids, old.medium) == ([7, 8], list(range(2 * BS)), "cpu")


def test_the_applier_splits_them_with_their_blocks(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(kv_event_applier, "PIECE_BLOCKS", 3)
    rng = random.Random(3)
    ev = with_locals(Chains(rng, "w").store(8, shared=False))
    pieces = kv_event_applier._split(ev)
    assert len(pieces) == 3
    assert [h for p in pieces for h in p.local_hashes] == ev.local_hashes
    a, b = Router("kv", block_size=BS), Router("kv", block_size=BS)
    assert a.apply_kv_events("w", [ev]) and b.apply_kv_events("w", pieces)
    assert state(a.index) == state(b.index)


def test_a_wrong_count_of_local_hashes_is_refused_and_changes_nothing() -> None:
    r = Router("kv", block_size=BS)
    ev = BlockStored(block_hashes=[1, 2], parent_block_hash=None, token_ids=list(range(2 * BS)), block_size=BS,
                     local_hashes=[5])
    with pytest.raises(ValueError, match="local hashes"):
        r.index.apply("w", ev)
    assert r.index.num_blocks == 0
