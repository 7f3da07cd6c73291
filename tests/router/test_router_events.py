"""KV event decoding (both msgpack layouts vLLM has used) and engine events end to end."""
from __future__ import annotations

import msgspec
import pytest
import xxhash

from turbine.engine.block_manager import KVBlockManager
from turbine.engine.sequence import Sequence
from turbine.protocols.generate import StopConditions
from turbine.protocols.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch, enc_hook
from turbine.router.indexer import KvIndexer, hash_blocks
from turbine.router.kv_event_decoder import (
    KvEventDecoder,
    block_hash_to_int,
    decode_kv_event_batch,
    default_decoder,
)

enc = msgspec.msgpack.Encoder(enc_hook=enc_hook)  # the worker's: engines' events carry token arrays
STORED = BlockStored(block_hashes=[11, 12], parent_block_hash=None, token_ids=[1, 2, 3, 4], block_size=2)


def test_array_layout_round_trips_on_the_fast_path() -> None:
    batch = KVEventBatch(ts=12.5, events=[STORED, BlockRemoved(block_hashes=[12]), AllBlocksCleared()],
                         data_parallel_rank=1)
    dec = KvEventDecoder()
    assert dec.decode(enc.encode(batch)) == batch
    assert dec.slow_path == 0
    assert decode_kv_event_batch(enc.encode(batch)) == batch


def test_array_layout_with_newer_trailing_fields() -> None:
    raw = [1.0, [["BlockStored", [5], 4, [7, 7], 2, None, "gpu", "my-lora", [["mm"]], None, "future"],
                 ["BlockRemoved", [5], "gpu", "future"], ["AllBlocksCleared", "future"]], 0, "future"]
    b = KvEventDecoder().decode(enc.encode(raw))
    assert b.events[0] == BlockStored(block_hashes=[5], parent_block_hash=4, token_ids=[7, 7], block_size=2,
                                      medium="gpu", lora_name="my-lora")
    assert b.events[1] == BlockRemoved(block_hashes=[5], medium="gpu")
    assert b.events[2] == AllBlocksCleared() and b.data_parallel_rank == 0


def test_map_layout() -> None:
    raw = {"ts": 3, "dp_rank": 2, "events": [
        {"type": "BlockStored", "block_hashes": [11, 12], "parent_block_hash": None, "token_ids": [1, 2, 3, 4],
         "block_size": 2, "lora_id": None, "unknown_key": 1},
        {"type": "BlockRemoved", "block_hashes": [12]},
        {"type": "AllBlocksCleared"},
    ]}
    dec = KvEventDecoder()
    b = dec.decode(enc.encode(raw))
    assert b == KVEventBatch(ts=3.0, events=[STORED, BlockRemoved(block_hashes=[12]), AllBlocksCleared()],
                             data_parallel_rank=2)
    assert dec.slow_path == 1
    raw2 = {"ts": 1.5, "events": [], "data_parallel_rank": None}
    assert dec.decode(enc.encode(raw2)) == KVEventBatch(ts=1.5, events=[])


def test_bytes_hashes_map_to_ints_deterministically() -> None:
    h1, h2 = b"\x01" * 32, b"\x02" * 32
    assert block_hash_to_int(h1) == xxhash.xxh3_64_intdigest(h1) == block_hash_to_int(bytearray(h1))
    assert block_hash_to_int(-5) == -5
    for layout in ("array", "map"):
        if layout == "array":
            raw = [1.0, [["BlockStored", [h1], None, [1, 2], 2], ["BlockStored", [h2], h1, [3, 4], 2],
                         ["BlockRemoved", [h2]]]]
        else:
            raw = [1.0, [{"type": "BlockStored", "block_hashes": [h1], "token_ids": [1, 2], "block_size": 2},
                         {"type": "BlockStored", "block_hashes": [h2], "parent_block_hash": h1,
                          "token_ids": [3, 4], "block_size": 2},
                         {"type": "BlockRemoved", "block_hashes": [h2]}]]
        b = KvEventDecoder().decode(enc.encode(raw))
        i1, i2 = block_hash_to_int(h1), block_hash_to_int(h2)
        assert b.events[0].block_hashes == [i1]
        assert b.events[1].parent_block_hash == i1 and b.events[1].block_hashes == [i2]
        assert b.events[2].block_hashes == [i2]
        ix = KvIndexer(2)
        assert all(ix.apply("w", ev) for ev in b.events)  # the child finds its bytes-named parent
        assert ix.find_matches_for_tokens([1, 2, 3, 4]) == {"w": 1}


def test_unknown_event_types_are_skipped_and_counted() -> None:
    dec = KvEventDecoder()
    raw = [1.0, [["BlockMoved", 1, 2], ["BlockRemoved", [3]], {"type": "BlockMoved"}, {"type": "Other", "x": 1}]]
    b = dec.decode(enc.encode(raw))
    assert b.events == [BlockRemoved(block_hashes=[3])]
    assert dec.unknown_events == {"BlockMoved": 2, "Other": 1}
    assert default_decoder() is not dec


@pytest.mark.parametrize("payload, match", [
    (b"\xc1", "not valid msgpack"),
    (enc.encode(5), "array or a map"),
    (enc.encode([1.0]), "ts, events"),
    (enc.encode({"ts": 1.0}), "'ts' and 'events'"),
    (enc.encode(["now", []]), "'ts' must be a number"),
    (enc.encode([1.0, {}]), "'events' must be an array"),
    (enc.encode([1.0, [7]]), "event 0 .* array or a map"),
    (enc.encode([1.0, [[]]]), "start with its type name"),
    (enc.encode([1.0, [{"block_hashes": []}]]), "string 'type'"),
    (enc.encode([1.0, [["BlockStored", [1], None]]]), "lacks 'token_ids'"),
    (enc.encode([1.0, [["BlockStored", [1], None, [1, "x"], 2]]]), "token_ids must be a list of ints"),
    (enc.encode([1.0, [["BlockStored", ["h"], None, [1, 2], 2]]]), "int or bytes, got str"),
    (enc.encode([1.0, [["BlockStored", [b"h"], None, [1, 2], 0]]]), "block_size must be a positive int"),
    (enc.encode([1.0, [["BlockRemoved", 5]]]), "block_hashes list"),
    (enc.encode([1.0, [["BlockStored", [b"h"], None, [1, 2], 2, "id"]]]), "lora_id must be int"),
    (enc.encode([1.0, [], "rank"]), "data_parallel_rank must be int"),
])
def test_malformed_payloads_raise_value_error(payload: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        KvEventDecoder().decode(payload)


def _run(bm: KVBlockManager, rid: str, tokens: list[int]) -> None:
    s = Sequence(rid, tokens, stop=StopConditions(max_tokens=1))
    cached = bm.match_prefix(s)
    assert bm.allocate_slots(s, s.num_tokens - cached, cached)
    s.num_computed_tokens = s.num_tokens
    bm.register_full_blocks(s)
    bm.free(s)


def test_engine_events_through_the_wire_into_the_index() -> None:
    """The engine's block manager emits, the decoder decodes, the index agrees with the engine."""
    bs = 4
    engines = {"w1": KVBlockManager(6, bs), "w2": KVBlockManager(8, bs)}
    ix = KvIndexer(bs)
    dec = KvEventDecoder()
    shared = list(range(100, 112))  # 3 blocks
    _run(engines["w1"], "a", shared + [1, 2, 3, 4, 5])
    _run(engines["w2"], "b", shared[:8] + [9, 9, 9, 9])
    _run(engines["w1"], "c", [7] * 16)  # 4 more blocks on w1's 6: evicts the LRU ones
    for w, bm in engines.items():
        events = bm.take_events()
        assert (w == "w1") == any(type(ev) is BlockRemoved for ev in events)
        payload = enc.encode(KVEventBatch(ts=0.0, events=events))
        for ev in dec.decode(payload).events:
            assert ix.apply(w, ev)
    ix.check_integrity()
    seen = []
    for probe in (shared + [1, 2, 3, 4, 0], shared[:8] + [9, 9, 9, 9, 0], [7] * 17, [5] * 8):
        s = Sequence("probe", probe, stop=StopConditions(max_tokens=1))
        want = {w: bm.match_prefix(Sequence("p", probe, stop=StopConditions(max_tokens=1))) // bs
                for w, bm in engines.items()}
        got = ix.find_matches_for_tokens(s.token_ids)
        assert {w: got.get(w, 0) for w in engines} == want
        seen.append(want)
    assert seen[0] == {"w1": 2, "w2": 2} and seen[2] == {"w1": 4, "w2": 0}  # eviction took w1's tail
    # a resync from the engine's full-state dump rebuilds the same view
    fresh = KvIndexer(bs)
    for w, bm in engines.items():
        for ev in bm.stored_blocks_snapshot():
            assert fresh.apply(w, ev)
    assert fresh.block_counts() == ix.block_counts()
    assert set(fresh._mask) == set(ix._mask)


def test_engine_events_hold_token_arrays_and_the_wire_holds_lists() -> None:
    """In process a BlockStored carries a slice of the sequence's u32 tokens; the worker's encoder
    (``enc_hook``) writes the list vLLM's layout has, and the index takes either."""
    from array import array

    bm = KVBlockManager(8, 4)
    _run(bm, "a", list(range(100, 111)))
    (ev,) = bm.take_events()
    assert type(ev.token_ids) is array and ev.token_ids.tolist() == list(range(100, 108))
    with pytest.raises(TypeError):
        msgspec.msgpack.encode(KVEventBatch(ts=0.0, events=[ev]))  # no hook: arrays are not msgpack
    (wire,) = KvEventDecoder().decode(enc.encode(KVEventBatch(ts=0.0, events=[ev]))).events
    assert wire == BlockStored(ev.block_hashes, None, list(range(100, 108)), 4,
                               local_hashes=hash_blocks(list(range(100, 108)), 4))  # the engine's, carried
    a, b = KvIndexer(4), KvIndexer(4)
    assert a.apply("w", ev) and b.apply("w", wire)
    assert a.find_matches_for_tokens(list(range(100, 112))) == b.find_matches_for_tokens(list(range(100, 112))) == {"w": 2}
