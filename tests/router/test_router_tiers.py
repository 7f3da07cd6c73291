"""The router and its index with KV tiers: events carry the tier (vLLM's ``medium``); a block in
host memory or on disk still matches, but counts for less than one in GPU memory."""
from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from turbine.protocols.kv_events import BlockRemoved, BlockStored
from turbine.protocols.block_hashing import chain_hash, local_block_hash
from turbine.router.indexer import KvIndexer
from turbine.router.router import Router

BS = 4


def chain(tokens: list[int]) -> list[int]:
    out, parent = [], None
    for i in range(len(tokens) // BS):
        parent = chain_hash(parent, local_block_hash(tokens[i * BS:(i + 1) * BS]))
        out.append(parent)
    return out


def stored(tokens: list[int], start: int, end: int, medium: str | None = None) -> BlockStored:
    hs = chain(tokens)
    return BlockStored(hs[start:end], hs[start - 1] if start else None, tokens[start * BS:end * BS], BS, medium=medium)


P = list(range(100, 132))  # 8 blocks


def test_a_block_moving_between_tiers_stays_matched() -> None:
    idx = KvIndexer(BS)
    idx.apply("w", stored(P, 0, 8))
    hs = chain(P)
    idx.apply("w", BlockStored(hs[4:8], hs[3], P[16:32], BS, medium="CPU"))  # offloaded...
    idx.apply("w", BlockRemoved(hs[4:8]))  # ...then evicted from the GPU
    assert idx.find_matches(idx.local_hashes(P)) == {"w": 8}
    paths = KvIndexer.path_ids(idx.local_hashes(P))
    assert idx.lower_tier_blocks("w", paths, 8) == (4, 0)
    idx.apply("w", BlockRemoved(hs[6:8], medium="CPU"))  # the host tier drops two
    assert idx.find_matches(idx.local_hashes(P)) == {"w": 6}
    idx.apply("w", BlockStored(hs[4:6], hs[3], P[16:24], BS))  # onboarded back to the GPU
    assert idx.lower_tier_blocks("w", paths, 6) == (0, 0)
    idx.check_integrity()


def test_routing_prefers_a_gpu_hit_to_a_host_hit() -> None:
    r = Router("kv", block_size=BS, seed=0)
    r.apply_kv_events("gpu", [stored(P, 0, 8)])
    r.apply_kv_events("host", [stored(P, 0, 8, medium="CPU")])
    assert r.route("a", ["gpu", "host"], P + [1]).worker_id == "gpu"
    r.finished("a")
    r.apply_kv_events("disk", [stored(P, 0, 8, medium="DISK")])
    r.apply_kv_events("gpu", [BlockRemoved(chain(P))])  # now only in lower tiers
    assert r.route("b", ["host", "disk"], P + [1]).worker_id == "host"
    r.finished("b")
    # a host hit still beats no hit at all
    assert r.route("c", ["host", "none"], P + [1]).worker_id == "host"



def test_predicted_routing_with_tier_discounted_overlaps() -> None:
    """Tier weights make overlaps fractional; the predicted policy prices them in whole tokens."""
    r = Router("predicted", block_size=BS, seed=0)
    for w in ("gpu", "host", "none"):
        r.worker_added(w, 1000)
    r.apply_kv_events("gpu", [stored(P, 0, 8)])
    r.apply_kv_events("host", [stored(P, 0, 8, medium="CPU")])
    d = r.route("a", ["gpu", "host", "none"], P + [1])
    assert d.worker_id == "gpu" and d.overlap_blocks == 8 and d.predicted_ttft_s is not None
    r.finished("a")
    r.apply_kv_events("gpu", [BlockRemoved(chain(P))])
    assert r.route("b", ["host", "none"], P + [1]).worker_id == "host"

@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["store", "remove"]), st.sampled_from([None, "CPU", "DISK"]),
                          st.integers(0, 7), st.integers(1, 8)), max_size=60))
def test_tiers_in_the_index_match_a_model(ops) -> None:  # type: ignore[no-untyped-def]
    idx = KvIndexer(BS)
    hs = chain(P)
    model: dict[int, set[str | None]] = {}
    for op, medium, start, n in ops:
        end = min(8, start + n)
        if op == "store":
            if start and not model.get(hs[start - 1]):
                continue  # the parent is unknown: an engine never sends that
            idx.apply("w", stored(P, start, end, medium))
            for h in hs[start:end]:
                model.setdefault(h, set()).add(medium)
        else:
            idx.apply("w", BlockRemoved(hs[start:end], medium=medium))
            for h in hs[start:end]:
                model.get(h, set()).discard(medium)
        idx.check_integrity()
        held = {h for h, tiers in model.items() if tiers}
        depth = next((i for i, h in enumerate(hs) if h not in held), 8)
        got = idx.find_matches(idx.local_hashes(P)).get("w", 0)
        assert got == depth
        paths = KvIndexer.path_ids(idx.local_hashes(P))
        host = sum(1 for h in hs[:depth] if None not in model[h] and "CPU" in model[h])
        disk = sum(1 for h in hs[:depth] if model[h] == {"DISK"})
        assert idx.lower_tier_blocks("w", paths, depth) == (host, disk)
    random.seed(0)
