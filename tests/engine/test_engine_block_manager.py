"""KVBlockManager: unit cases, and a hypothesis state machine that checks integrity after every
operation and replays the KV events into a model of the router's view."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from turbine.engine.block_manager import IntegrityError, KVBlockManager
from turbine.engine.sequence import Sequence
from turbine.protocols.generate import StopConditions
from turbine.protocols.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from turbine.protocols.block_hashing import block_hashes

STOP = StopConditions(max_tokens=16)


def seq(rid: str, tokens: list[int], lora: str | None = None) -> Sequence:
    return Sequence(rid, tokens, stop=STOP, lora_name=lora)


def admit_and_compute(bm: KVBlockManager, s: Sequence) -> int:
    """Admission as the scheduler does it, then compute the whole sequence."""
    cached = bm.match_prefix(s)
    assert bm.allocate_slots(s, s.num_tokens - cached, cached)
    s.num_computed_tokens = s.num_tokens
    bm.register_full_blocks(s)
    return cached


class EventModel:
    """What a router learns from the events: the set of cached sequence hashes."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.hashes: set[int] = set()

    def apply(self, events: list) -> None:
        for ev in events:
            if isinstance(ev, BlockStored):
                assert ev.block_size == self.block_size
                assert len(ev.token_ids) == self.block_size * len(ev.block_hashes)
                # The hashes must be the chain of the tokens (what a router recomputes). The
                # event carries no LoRA name, so the model tries the adapters the tests use.
                chains = [bh for lora in (None, "x")
                          if (bh := block_hashes(ev.token_ids, self.block_size, lora,
                                                 parent=ev.parent_block_hash)).sequence == ev.block_hashes]
                assert chains
                # the local hashes it carries (the router chains them instead of hashing tokens)
                assert ev.local_hashes is None or ev.local_hashes == chains[0].local
                for h in ev.block_hashes:
                    assert h not in self.hashes, "block registered twice"
                    self.hashes.add(h)
            elif isinstance(ev, BlockRemoved):
                for h in ev.block_hashes:
                    assert h in self.hashes, "removed a block never stored"
                    self.hashes.remove(h)
            else:
                assert isinstance(ev, AllBlocksCleared)
                self.hashes.clear()


# -- unit cases ------------------------------------------------------------------------------------
def test_prefix_hit_leaves_the_last_token_to_compute() -> None:
    bm = KVBlockManager(16, 4)
    admit_and_compute(bm, seq("a", list(range(12))))  # 3 full blocks
    assert bm.match_prefix(seq("b", list(range(12)))) == 8  # whole prompt cached: keep 1 token
    assert bm.match_prefix(seq("c", list(range(13)))) == 12
    assert bm.match_prefix(seq("d", list(range(6)) + [99] * 7)) == 4
    assert bm.match_prefix(seq("e", [7] + list(range(1, 12)))) == 0  # chain breaks at block 0


def test_lora_salts_the_hashes() -> None:
    bm = KVBlockManager(16, 4)
    admit_and_compute(bm, seq("a", list(range(9))))
    assert bm.match_prefix(seq("b", list(range(9)))) == 8
    assert bm.match_prefix(seq("c", list(range(9)), lora="adapter")) == 0


def test_cached_blocks_are_not_active_and_are_reused() -> None:
    bm = KVBlockManager(8, 4)
    a = seq("a", list(range(9)))
    admit_and_compute(bm, a)
    assert bm.num_active_blocks == 3 and bm.usage == 3 / 8
    a_table = list(a.block_table)
    bm.free(a)
    assert bm.num_active_blocks == 0 and bm.num_free_blocks == 8 and bm.num_cached_blocks == 2
    b = seq("b", list(range(9)))
    assert admit_and_compute(bm, b) == 8
    assert b.block_table[:2] == a_table[:2]
    assert bm.num_active_blocks == 3
    bm.check_integrity()


def test_shared_blocks_count_every_holder() -> None:
    bm = KVBlockManager(8, 4)
    a, b = seq("a", list(range(9))), seq("b", list(range(9)))
    admit_and_compute(bm, a)
    admit_and_compute(bm, b)
    assert bm.num_active_blocks == 4  # 2 shared + 1 tail each
    bm.free(a)
    bm.check_integrity()
    assert bm.num_active_blocks == 3
    bm.free(b)
    bm.free(b)  # idempotent
    bm.check_integrity()
    assert bm.num_active_blocks == 0


def test_lru_evicts_least_recent_and_tails_first() -> None:
    bm = KVBlockManager(4, 2)
    a = seq("a", [1, 2, 3, 4, 5])  # blocks [1,2] [3,4] + tail
    admit_and_compute(bm, a)
    bm.take_events()
    bm.free(a)
    a_hashes = a.block_hashes(2)
    # Need 3 blocks out of 4 free (1 free + 2 evictable + 1 fresh-free): one eviction.
    b = seq("b", [9, 9, 9, 9, 9])
    assert bm.allocate_slots(b, 5)
    (removed,) = bm.take_events()
    assert isinstance(removed, BlockRemoved)
    assert removed.block_hashes == [a_hashes[1]]  # the chain's leaf goes first
    assert bm.match_prefix(seq("c", [1, 2, 3, 4, 5])) == 2
    bm.check_integrity()


def test_touching_a_cached_block_refreshes_its_lru_position() -> None:
    bm = KVBlockManager(4, 2)
    a, b = seq("a", [1, 1, 0]), seq("b", [2, 2, 0])
    admit_and_compute(bm, a)
    admit_and_compute(bm, b)
    bm.free(a)
    bm.free(b)
    again = seq("a2", [1, 1, 7])
    assert admit_and_compute(bm, again) == 2  # a's block is used again
    bm.free(again)
    bm.take_events()
    assert bm.evict(1) == 1
    (removed,) = bm.take_events()
    assert removed.block_hashes == b.block_hashes(2)  # b's block is now the LRU one


def test_allocation_failure_changes_nothing() -> None:
    bm = KVBlockManager(4, 4)
    a = seq("a", list(range(9)))
    admit_and_compute(bm, a)
    bm.take_events()
    b = seq("b", list(range(9)))
    cached = bm.match_prefix(b)
    assert cached == 8
    assert not bm.allocate_slots(b, 100, cached)
    assert b.block_table == [] and bm.num_active_blocks == 3 and bm.take_events() == []
    bm.check_integrity()


def test_duplicate_computation_registers_once() -> None:
    bm = KVBlockManager(16, 4)
    a, b = seq("a", list(range(9))), seq("b", list(range(9)))
    for s in (a, b):  # admitted in the same step: neither sees a cache hit
        assert bm.match_prefix(s) == 0
        assert bm.allocate_slots(s, 9)
    for s in (a, b):
        s.num_computed_tokens = 9
        bm.register_full_blocks(s)
    stored = bm.take_events()
    assert len(stored) == 1 and len(stored[0].block_hashes) == 2
    bm.check_integrity()
    bm.free(b)  # b's duplicate blocks hold no hash: straight to the free list
    bm.free(a)
    assert bm.num_cached_blocks == 2
    bm.check_integrity()


def test_stored_events_carry_the_blocks_local_hashes_unless_they_were_adopted() -> None:
    bm = KVBlockManager(32, 4)
    a = seq("a", list(range(13)), lora="x")
    admit_and_compute(bm, a)
    (ev,) = bm.take_events()
    assert ev.local_hashes == block_hashes(list(range(12)), 4, "x").local and len(ev.local_hashes) == 3
    a.token_ids.extend([50, 51, 52])  # decode fills block 3: an event of that block alone
    a.num_computed_tokens = 16
    assert bm.allocate_slots(a, 3)
    bm.register_full_blocks(a)
    (ev,) = bm.take_events()
    assert ev.local_hashes == block_hashes(list(range(13)) + [50, 51, 52], 4, "x").local[3:]
    b = seq("b", list(range(100, 109)))
    b.adopt_block_hashes(4, block_hashes(list(range(100, 109)), 4).sequence)  # a caller's hashes
    admit_and_compute(bm, b)
    (ev,) = bm.take_events()
    assert ev.local_hashes is None and len(ev.block_hashes) == 2  # the router hashes the tokens
    c = seq("c", list(range(200, 209)))
    given = block_hashes(list(range(200, 209)), 4)
    c.adopt_block_hashes(4, given.sequence, given.local)  # the simulator has both from its trace
    admit_and_compute(bm, c)
    (ev,) = bm.take_events()
    assert ev.local_hashes == given.local
    with pytest.raises(ValueError, match="local hashes"):
        seq("d", list(range(9))).adopt_block_hashes(4, given.sequence, given.local[:1])


def test_clear_forgets_the_cache_but_not_the_holders() -> None:
    bm = KVBlockManager(8, 2)
    a, b = seq("a", [1, 2, 3]), seq("b", [4, 5, 6])
    admit_and_compute(bm, a)
    admit_and_compute(bm, b)
    bm.free(b)
    bm.clear()
    assert isinstance(bm.take_events()[-1], AllBlocksCleared)
    assert bm.num_cached_blocks == 0 and bm.stored_blocks_snapshot() == []
    assert bm.num_active_blocks == 2  # a still holds its blocks
    bm.check_integrity()
    bm.free(a)
    assert bm.num_active_blocks == 0
    bm.check_integrity()


def test_prefix_caching_off() -> None:
    bm = KVBlockManager(8, 2, enable_prefix_caching=False)
    a = seq("a", [1, 2, 3, 4, 5])
    admit_and_compute(bm, a)
    bm.free(a)
    assert bm.match_prefix(seq("b", [1, 2, 3, 4, 5])) == 0
    assert bm.take_events() == [] and bm.num_cached_blocks == 0
    bm.check_integrity()


def test_snapshot_rebuilds_the_cache() -> None:
    bm = KVBlockManager(32, 2)
    model = EventModel(2)
    for i, toks in enumerate(([1, 2, 3, 4, 5], [1, 2, 3, 9, 9], [7, 7, 7])):
        s = seq(f"s{i}", toks)
        admit_and_compute(bm, s)
    model.apply(bm.take_events())
    fresh = EventModel(2)
    snapshot = bm.stored_blocks_snapshot()
    fresh.apply(snapshot)
    assert fresh.hashes == model.hashes
    seen: set[int] = set()
    for ev in snapshot:  # parents come first
        assert ev.parent_block_hash is None or ev.parent_block_hash in seen
        seen.update(ev.block_hashes)


def test_integrity_check_catches_corruption() -> None:
    bm = KVBlockManager(8, 2)
    a = seq("a", [1, 2, 3])
    admit_and_compute(bm, a)
    bm.check_integrity()
    bm._ref[a.block_table[0]] += 1  # a leaked reference
    with pytest.raises(IntegrityError):
        bm.check_integrity()
    bm._ref[a.block_table[0]] -= 1
    bm._free.append(a.block_table[1])  # a referenced block on the free list
    with pytest.raises(IntegrityError):
        bm.check_integrity()


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        KVBlockManager(0, 4)
    with pytest.raises(ValueError):
        KVBlockManager(4, 0)
    bm = KVBlockManager(8, 4)
    a = seq("a", list(range(9)))
    assert bm.allocate_slots(a, 1)
    with pytest.raises(ValueError):
        bm.match_prefix(a)  # already holds blocks
    with pytest.raises(ValueError):
        bm.allocate_slots(seq("x", list(range(9))), 1, num_cached_tokens=3)  # not whole blocks
    with pytest.raises(ValueError):
        bm.allocate_slots(seq("y", list(range(9))), 1, num_cached_tokens=4)  # nothing cached


# -- property: random operation sequences ---------------------------------------------------------
DOCS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 50, 60, 70, 80], [5, 5, 5, 5, 5, 5]]


class BlockManagerMachine(RuleBasedStateMachine):
    NUM_BLOCKS = 12
    BLOCK_SIZE = 2
    PREFIX_CACHING = True

    def __init__(self) -> None:
        super().__init__()
        self.bm = KVBlockManager(self.NUM_BLOCKS, self.BLOCK_SIZE, self.PREFIX_CACHING)
        self.model = EventModel(self.BLOCK_SIZE)
        self.seqs: dict[str, Sequence] = {}
        self.pending: dict[str, int] = {}  # slots allocated for tokens not computed yet
        self.counter = 0

    def pick(self, data: st.DataObject) -> Sequence:
        return self.seqs[data.draw(st.sampled_from(sorted(self.seqs)))]

    @rule(data=st.data(), doc=st.sampled_from(DOCS), cut=st.integers(1, 10),
          tail=st.lists(st.integers(0, 3), max_size=4), lora=st.sampled_from([None, None, "x"]))
    def admit(self, data: st.DataObject, doc: list[int], cut: int, tail: list[int], lora: str | None) -> None:
        self.counter += 1
        s = seq(f"s{self.counter}", doc[:cut] + tail, lora)
        cached = self.bm.match_prefix(s)
        assert cached % self.BLOCK_SIZE == 0 and cached <= s.num_tokens - 1
        if self.PREFIX_CACHING:  # the router's view predicts the hit exactly
            hashes = s.block_hashes(self.BLOCK_SIZE)
            expect = 0
            while expect < (s.num_tokens - 1) // self.BLOCK_SIZE and hashes[expect] in self.model.hashes:
                expect += 1
            assert cached == expect * self.BLOCK_SIZE
        else:
            assert cached == 0
        n = data.draw(st.integers(1, s.num_tokens - cached))
        free_before = self.bm.num_free_blocks
        if self.bm.allocate_slots(s, n, cached):
            s.num_computed_tokens = cached
            self.seqs[s.request_id] = s
            self.pending[s.request_id] = n
        else:
            assert s.block_table == [] and self.bm.num_free_blocks == free_before

    @precondition(lambda self: any(self.pending.values()))
    @rule(data=st.data(), token=st.integers(0, 3))
    def compute(self, data: st.DataObject, token: int) -> None:
        rid = data.draw(st.sampled_from(sorted(r for r, n in self.pending.items() if n)))
        s = self.seqs[rid]
        s.num_computed_tokens += self.pending[rid]
        self.pending[rid] = 0
        self.bm.register_full_blocks(s)
        if s.num_computed_tokens == s.num_tokens:
            s.append_token(token)  # sampled: its KV is computed in a later step

    @precondition(lambda self: any(not n for n in self.pending.values()))
    @rule(data=st.data())
    def extend(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(r for r, n in self.pending.items() if not n)))
        s = self.seqs[rid]
        n = data.draw(st.integers(1, s.num_tokens - s.num_computed_tokens))
        table_before = list(s.block_table)
        if self.bm.allocate_slots(s, n):
            self.pending[rid] = n
        else:
            assert s.block_table == table_before

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), twice=st.booleans())
    def free(self, data: st.DataObject, twice: bool) -> None:
        s = self.pick(data)
        self.bm.free(s)
        if twice:
            self.bm.free(s)
        del self.seqs[s.request_id], self.pending[s.request_id]

    @rule(n=st.integers(0, 4))
    def evict(self, n: int) -> None:
        before = self.bm.num_cached_blocks
        evicted = self.bm.evict(n)
        assert evicted <= n and self.bm.num_cached_blocks == before - evicted

    @rule(go=st.sampled_from([False] * 9 + [True]))
    def clear(self, go: bool) -> None:
        if go:  # rare, or the cache would rarely hold anything
            self.bm.clear()

    @invariant()
    def consistent(self) -> None:
        self.bm.check_integrity()
        self.model.apply(self.bm.take_events())
        dump = self.bm.stored_blocks_snapshot()
        snapshot = {h for ev in dump for h in ev.block_hashes}
        assert snapshot == self.model.hashes
        EventModel(self.BLOCK_SIZE).apply(dump)  # every cached block's tokens hash to its hash
        bs = self.BLOCK_SIZE
        for rid, s in self.seqs.items():
            assert len(s.block_table) * bs >= s.num_computed_tokens + self.pending[rid]

    def teardown(self) -> None:
        for s in self.seqs.values():
            self.bm.free(s)
        self.bm.check_integrity()
        assert self.bm.num_active_blocks == 0
        assert self.bm.num_free_blocks == self.NUM_BLOCKS


class NoPrefixCachingMachine(BlockManagerMachine):
    PREFIX_CACHING = False


class TinyPoolMachine(BlockManagerMachine):
    NUM_BLOCKS = 5
    BLOCK_SIZE = 3


_settings = settings(max_examples=200, stateful_step_count=40, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
TestBlockManagerProperties = BlockManagerMachine.TestCase
TestBlockManagerProperties.settings = _settings
TestNoPrefixCaching = NoPrefixCachingMachine.TestCase
TestNoPrefixCaching.settings = _settings
TestTinyPool = TinyPoolMachine.TestCase
TestTinyPool.settings = _settings
