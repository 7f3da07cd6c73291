"""KvIndexer and ApproxIndexer: unit cases, and random event sequences against a brute-force model."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pytest

from turbine.protocols.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from turbine.router.approx import ApproxIndexer
from turbine.protocols.block_hashing import block_hashes
from turbine.router.indexer import IndexIntegrityError, KvIndexer

BS = 2


def stored(hashes: list[int], parent: int | None, blocks: list[tuple[int, ...]], **kw: object) -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_block_hash=parent,
                       token_ids=[t for b in blocks for t in b], block_size=BS, **kw)  # type: ignore[arg-type]


def toks(*blocks: tuple[int, ...]) -> list[int]:
    return [t for b in blocks for t in b]


A, B, C, D = (1, 1), (2, 2), (3, 3), (4, 4)


# -- unit cases --------------------------------------------------------------------------------
def test_shared_prefix_depths_per_worker() -> None:
    ix = KvIndexer(BS)
    assert ix.apply("w1", stored([10, 11, 12], None, [A, B, C]))
    assert ix.apply("w2", stored([20, 21], None, [A, B]))
    assert ix.apply("w2", stored([22], 21, [D]))  # w2 branches off at depth 2
    ix.check_integrity()
    assert ix.find_matches_for_tokens(toks(A, B, C, D)) == {"w1": 3, "w2": 2}
    assert ix.find_matches_for_tokens(toks(A, B, D) + [9]) == {"w1": 2, "w2": 3}  # the tail is ignored
    assert ix.find_matches_for_tokens(toks(B, A)) == {}
    assert ix.find_matches_for_tokens(toks(A, B, C), ) == {"w1": 3, "w2": 2}
    assert ix.find_matches(ix.local_hashes(toks(A, B, C)), workers=["w2"]) == {"w2": 2}
    assert ix.find_matches(ix.local_hashes(toks(A)), workers=["nobody"]) == {}
    assert ix.num_blocks == 6 and ix.num_nodes == 4
    assert ix.block_counts() == {"w1": 3, "w2": 3} and ix.worker_blocks("w3") == 0


def test_unknown_parent_needs_resync_and_stores_nothing() -> None:
    ix = KvIndexer(BS)
    assert not ix.apply("w1", stored([11], 999, [B]))
    ix.apply("w1", stored([10], None, [A]))
    assert not ix.apply("w1", stored([11], 999, [B]))
    assert ix.unplaced_events == 2 and ix.num_blocks == 1
    ix.check_integrity()


def test_removal_deletes_unheld_nodes_and_their_children_stay_valid() -> None:
    ix = KvIndexer(BS)
    ix.apply("w1", stored([10, 11, 12], None, [A, B, C]))
    ix.apply("w1", BlockRemoved(block_hashes=[11]))  # a middle block goes: depth stops at 1
    ix.check_integrity()
    assert ix.find_matches_for_tokens(toks(A, B, C)) == {"w1": 1}
    assert ix.num_nodes == 2 and ix.num_blocks == 2
    ix.apply("w1", stored([11], 10, [B]))  # stored again: C, never removed, matches again
    assert ix.find_matches_for_tokens(toks(A, B, C)) == {"w1": 3}
    ix.apply("w1", BlockRemoved(block_hashes=[12, 404]))
    ix.check_integrity()
    assert ix.num_nodes == 2 and ix.unknown_removals == 1
    ix.apply("w1", AllBlocksCleared())
    assert ix.num_nodes == 0 and ix.num_blocks == 0 and ix.workers == ["w1"]
    ix.check_integrity()


def test_remove_worker_frees_its_slot_for_reuse() -> None:
    ix = KvIndexer(BS)
    ix.apply("w1", stored([1], None, [A]))
    ix.apply("w1", stored([5], None, [C]))
    assert ix.find_matches_for_tokens(tuple(toks(C))) == {"w1": 1}  # (any sequence of ints)
    ix.apply("w2", stored([2], None, [A]))
    ix.remove_worker("w1")
    ix.remove_worker("w1")  # idempotent
    ix.check_integrity()
    assert ix.find_matches_for_tokens(toks(A)) == {"w2": 1}
    ix.apply("w3", stored([3], None, [A, ][:1]))
    ix.check_integrity()
    assert ix.find_matches_for_tokens(toks(A)) == {"w2": 1, "w3": 1}
    assert ix._bit["w3"] == 1  # took w1's freed slot
    ix.apply("w3", stored([6], None, [C]))
    assert ix.find_matches_for_tokens(toks(C)) == {"w3": 1}  # the same mask now names w3


def test_same_tokens_under_two_engine_hashes_are_refcounted() -> None:
    ix = KvIndexer(BS)
    ix.apply("w1", stored([10], None, [A]))
    ix.apply("w1", stored([77], None, [A]))  # e.g. a cache salt: other hash, same tokens
    ix.check_integrity()
    ix.apply("w1", BlockRemoved(block_hashes=[10]))
    assert ix.find_matches_for_tokens(toks(A)) == {"w1": 1}
    ix.apply("w1", BlockRemoved(block_hashes=[77]))
    assert ix.find_matches_for_tokens(toks(A)) == {}
    ix.check_integrity()


def test_lora_blocks_match_only_requests_of_that_adapter() -> None:
    ix = KvIndexer(BS)
    ix.apply("w1", stored([1, 2], None, [A, B], lora_name="ad"))
    ix.apply("w2", stored([1, 2], None, [A, B], lora_id=7))  # id only: a namespace nothing matches
    assert ix.find_matches_for_tokens(toks(A, B), lora_name="ad") == {"w1": 2}
    assert ix.find_matches_for_tokens(toks(A, B)) == {}
    assert ix.local_hashes(toks(A, B), "ad") == block_hashes(toks(A, B), BS, "ad").local


def test_events_that_contradict_the_index_raise_value_error() -> None:
    ix = KvIndexer(BS)
    with pytest.raises(ValueError, match="blocks of 4 tokens"):
        ix.apply("w1", BlockStored(block_hashes=[1], parent_block_hash=None, token_ids=[1] * 4, block_size=4))
    with pytest.raises(ValueError, match="1 hashes but 3 tokens"):
        ix.apply("w1", BlockStored(block_hashes=[1], parent_block_hash=None, token_ids=[1] * 3, block_size=BS))
    with pytest.raises(ValueError, match="not a KV event"):
        ix.apply("w1", "BlockStored")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="token ids"):
        ix.apply("w1", BlockStored(block_hashes=[1], parent_block_hash=None, token_ids=[-1, 2], block_size=BS))
    with pytest.raises(ValueError, match="token ids"):
        ix.find_matches_for_tokens([2**32, 0])
    with pytest.raises(ValueError):
        KvIndexer(0)


def test_integrity_check_catches_corruption() -> None:
    ix = KvIndexer(BS)
    ix.apply("w1", stored([10, 11], None, [A, B]))
    ix.check_integrity()
    nid = next(iter(ix._mask))
    ix._mask[nid] = 0b10
    with pytest.raises(IndexIntegrityError):
        ix.check_integrity()


def test_the_walk_takes_only_the_hashes_it_needs() -> None:
    ix = KvIndexer(BS)
    ix.apply("w1", stored([10, 11], None, [A, B]))
    taken = []

    def hashes():  # type: ignore[no-untyped-def]
        for h in ix.local_hashes(toks(A, B, C, D, A, B)):
            taken.append(h)
            yield h

    assert ix.find_matches(hashes()) == {"w1": 2}
    assert len(taken) == 3  # A, B, and the C that nobody holds


def test_path_ids_name_the_nodes_find_matches_walks() -> None:
    ix = KvIndexer(BS)
    local = ix.local_hashes(toks(A, B, C))
    ids = ix.path_ids(local)
    ix.store("w1", None, local, ids)
    assert set(ix._mask) == set(ids)
    assert ix.find_matches(local) == {"w1": 3}
    assert ix.store("w1", None, local, ids) and ix.num_blocks == 3  # a replay changes nothing


def test_a_bulk_store_that_is_not_new_is_undone_and_placed_one_by_one() -> None:
    """The bulk path (``_place_new``) learns late, from the maps' sizes, that a store repeats a
    hash or a node; it must take back what it put in and leave the careful path a clean slate."""
    ix = KvIndexer(BS)
    assert ix.apply("w1", stored([10, 11, 10], None, [A, B, C]))  # a hash twice in one event
    ix.check_integrity()  # 10 names A, then A-B-C (an engine reusing a hash): A is released
    assert ix.block_counts() == {"w1": 2} and ix.num_nodes == 2
    assert ix.find_matches_for_tokens(toks(A, B, C)) == {}
    ix.apply("w2", stored([20], None, [A]))
    assert ix.apply("w2", stored([21, 20, 22], 20, [B, C, D]))  # a known hash among new ones
    ix.check_integrity()
    assert ix.block_counts() == {"w1": 2, "w2": 3} and ix._blocks["w2"][20] == ix._blocks["w1"][10]
    # a path id twice in one chain (a hash collision: forced here) on nodes nobody holds
    ix.apply("w3", stored([30], None, [D]))
    blocks = ix._blocks["w3"]
    cid = 12345678901234
    ix._place("w3", blocks, [cid, cid], [31, 32], 1)
    ix.check_integrity()
    assert ix._dups == {"w3": {cid: 1}} and ix._mask[cid] == ix._bit["w3"]
    ix.apply("w3", BlockRemoved(block_hashes=[31, 32]))
    ix.check_integrity()
    assert cid not in ix._mask and ix.block_counts()["w3"] == 1


# -- property test against a brute-force model -----------------------------------------------
WORKERS = ["w0", "w1", "w2"]
BLOCKS = [(a, b) for a in range(2) for b in range(2)]  # 4 distinct blocks: prefixes collide often


class Model:
    """worker -> engine hash -> the prefix (tuple of token blocks) it names."""

    def __init__(self) -> None:
        self.held: dict[str, dict[int, tuple[tuple[int, ...], ...]]] = {}

    def store(self, w: str, parent: int | None, blocks: list[tuple[int, ...]], hashes: list[int]) -> bool:
        d = self.held.get(w)
        if parent is None:
            prefix: tuple[tuple[int, ...], ...] = ()
        elif d is None or parent not in d:
            return False
        else:
            prefix = d[parent]
        d = self.held.setdefault(w, {})
        for blk, h in zip(blocks, hashes):
            prefix = (*prefix, blk)
            d[h] = prefix
        return True

    def matches(self, query: list[tuple[int, ...]]) -> dict[str, int]:
        out = {}
        for w, d in self.held.items():
            have = set(d.values())
            k = 0
            while k < len(query) and tuple(query[: k + 1]) in have:
                k += 1
            if k:
                out[w] = k
        return out


block = st.sampled_from(BLOCKS)
op = st.one_of(
    st.tuples(st.just("store"), st.sampled_from(WORKERS), st.one_of(st.none(), st.integers(-1, 50)),
              st.lists(st.tuples(block, st.integers(0, 11)), min_size=1, max_size=4)),
    st.tuples(st.just("remove"), st.sampled_from(WORKERS), st.lists(st.integers(0, 12), max_size=4)),
    st.tuples(st.just("clear"), st.sampled_from(WORKERS)),
    st.tuples(st.just("remove_worker"), st.sampled_from(WORKERS)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, max_size=30), queries=st.lists(st.lists(block, min_size=1, max_size=5), max_size=3))
def test_indexer_matches_brute_force_model(ops: list[tuple], queries: list[list[tuple[int, ...]]]) -> None:
    ix, model = KvIndexer(BS), Model()
    for o in ops:
        kind, w = o[0], o[1]
        if kind == "store":
            known = sorted(model.held.get(w, {}))
            sel = o[2]
            parent = None if sel is None else (999 if sel < 0 or not known else known[sel % len(known)])
            blocks = [b for b, _ in o[3]]
            hashes = [h for _, h in o[3]]
            assert ix.apply(w, stored(hashes, parent, blocks)) == model.store(w, parent, blocks, hashes)
        elif kind == "remove":
            ix.apply(w, BlockRemoved(block_hashes=o[2]))
            for h in o[2]:
                model.held.get(w, {}).pop(h, None)
        elif kind == "clear":
            ix.apply(w, AllBlocksCleared())
            model.held.get(w, {}).clear()
        else:
            ix.remove_worker(w)
            model.held.pop(w, None)
        ix.check_integrity()
        assert ix.num_blocks == sum(len(d) for d in model.held.values())
        probes = [list(p) + [(9, 9)] for d in model.held.values() for p in d.values()] + queries
        for q in probes:
            want = model.matches(q)
            assert ix.find_matches_for_tokens(toks(*q)) == want, q
            some = {w: d for w, d in want.items() if w != "w1"}
            assert ix.find_matches(ix.local_hashes(toks(*q)), workers=["w0", "w2", "w9"]) == some


# -- approximate mode --------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_approx_remembers_decisions_until_ttl_expires() -> None:
    clock = FakeClock()
    ap = ApproxIndexer(BS, ttl_s=10.0, clock=clock)
    ix = ap.index
    ap.record("w1", ix.local_hashes(toks(A, B, C)))
    clock.t += 5
    ap.record("w2", ix.local_hashes(toks(A, B)))
    ap.record("w1", ix.local_hashes(toks(A)))  # refreshes only A on w1
    assert ap.find_matches(ix.local_hashes(toks(A, B, C))) == {"w1": 3, "w2": 2}
    ap.check_integrity()
    clock.t += 5  # w1's first record expires: B and C go, the refreshed A stays
    assert ap.find_matches(ix.local_hashes(toks(A, B, C))) == {"w1": 1, "w2": 2}
    ap.check_integrity()
    clock.t += 5
    assert ap.find_matches(ix.local_hashes(toks(A, B, C))) == {}
    assert ap.num_blocks == 0 and ix.num_nodes == 0
    ap.check_integrity()


def test_approx_worker_removal_and_bad_ttl() -> None:
    clock = FakeClock()
    ap = ApproxIndexer(BS, ttl_s=1.0, clock=clock)
    ap.record("w1", ap.index.local_hashes(toks(A, B)))
    ap.record("w1", [])
    ap.remove_worker("w1")
    clock.t += 2
    assert ap.expire() == 0 and ap.num_blocks == 0
    ap.check_integrity()
    with pytest.raises(ValueError):
        ApproxIndexer(BS, ttl_s=0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(WORKERS), st.lists(block, min_size=1, max_size=4), st.floats(0, 4)),
                max_size=25))
def test_approx_matches_a_ttl_model(records: list[tuple[str, list[tuple[int, ...]], float]]) -> None:
    clock = FakeClock()
    ap = ApproxIndexer(BS, ttl_s=5.0, clock=clock)
    last_seen: dict[tuple[str, tuple], float] = {}  # (worker, prefix) -> expiry
    for w, blocks, dt in records:
        clock.t += dt
        ap.record(w, ap.index.local_hashes(toks(*blocks)))
        for k in range(1, len(blocks) + 1):
            last_seen[(w, tuple(blocks[:k]))] = clock.t + 5.0
        ap.expire()
        ap.check_integrity()
        live = {k for k, t in last_seen.items() if t > clock.t}
        assert ap.num_blocks == len(live)
        for q in {blocks_ for _, blocks_ in live}:
            want = {}
            for ww in WORKERS:
                d = 0
                while d < len(q) and (ww, q[: d + 1]) in live:
                    d += 1
                if d:
                    want[ww] = d
            assert ap.find_matches(ap.index.local_hashes(toks(*q))) == want
