"""KV tiers under the scheduler and block manager: offload on eviction, frequency-gated spills to
disk, onboarding on a prefix hit, and the integrity of every tier under random interleavings."""
from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from turbine.engine.block_manager import KVBlockManager
from turbine.engine.scheduler import Scheduler, SchedulerConfig
from turbine.engine.sequence import Sequence, SequenceStatus
from turbine.kvbm import DISK, HOST, TieredCache, TierSource
from turbine.protocols.generate import StopConditions
from turbine.protocols.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

BS = 4


def make(num_blocks: int = 16, host: int = 8, disk: int = 8, **cfg: Any) -> Scheduler:
    bm = KVBlockManager(num_blocks, BS)
    tiers = TieredCache(host, disk, BS, bm.emit)
    return Scheduler(SchedulerConfig(**cfg), bm, tiers=tiers)


def seq(rid: str, prompt: list[int], max_tokens: int = 1) -> Sequence:
    return Sequence(rid, prompt, stop=StopConditions(max_tokens=max_tokens, ignore_eos=True))


def step(s: Scheduler) -> list:  # type: ignore[type-arg]
    out = s.schedule()
    results = s.postprocess(out, {e.seq.request_id: 7 for e in out.scheduled if e.produces_token})
    copies = s.tiers.take_copies()
    for c in copies:  # the bytes would move here; spills finish at once
        if c.kind != "offload":
            s.tiers.written(c.dst, c.hash, True)
    s.block_manager.check_integrity()
    s.tiers.check_integrity()
    return results


def run(s: Scheduler, rid: str, prompt: list[int], max_tokens: int = 1) -> Sequence:
    q = seq(rid, prompt, max_tokens)
    s.add(q)
    for _ in range(100):
        step(s)
        for order in s.take_pulls():
            s.finish_pull(order.request_id, True)
        if q.status is SequenceStatus.FINISHED:
            return q
    raise AssertionError("did not finish")


A = list(range(100, 124))  # 6 blocks
B = list(range(200, 224))


def test_evicted_blocks_go_to_host_and_come_back_on_a_hit() -> None:
    s = make(num_blocks=7)
    run(s, "a", A + [1])  # caches A's 6 blocks
    run(s, "b", B + [1])  # evicts A's blocks from G1: they go to the host tier
    assert {e.info.seq_hash for e in s.tiers.host.entries.values()} >= set(seq("x", A).block_hashes(BS)[:5])
    q = seq("a2", A + [9])
    s.add(q)
    step(s)
    (order,) = s.take_pulls()
    assert isinstance(order.source, TierSource) and order.source.tiers == {HOST}
    assert q.status is SequenceStatus.PULLING and len(order.local_blocks) >= 5
    assert all(s.tiers.host._pins.get(h) for _, _, h in order.source.entries)  # pinned while read
    s.finish_pull("a2", True)
    assert q.num_computed_tokens == 4 * len(order.local_blocks) + (q.num_computed_tokens % 4)
    assert q.num_cached_tokens == q.num_computed_tokens  # onboarded tokens count as cached
    for _ in range(5):
        step(s)
    assert q.status is SequenceStatus.FINISHED
    assert s.tiers.stats.hits[HOST] >= 5 and s.tiers.stats.onboarded[HOST] >= 5


def test_only_blocks_seen_twice_reach_the_disk() -> None:
    s = make(num_blocks=7, host=6, disk=20)
    run(s, "a", A + [1])  # A seen once
    run(s, "b", B + [1])  # evicts A to host
    run(s, "c", list(range(300, 324)) + [1])  # evicts B to host, A out of host: seen once, not spilled
    assert not s.tiers.disk.entries
    run(s, "a2", A + [2])  # A seen twice (onboarded back)
    run(s, "d", list(range(400, 424)) + [1])
    run(s, "e", list(range(500, 524)) + [1])
    assert set(seq("x", A).block_hashes(BS)[:5]) & {h for h in s.tiers.disk.entries}


def test_a_failed_onboarding_recomputes() -> None:
    s = make(num_blocks=7)
    run(s, "a", A + [1])
    run(s, "b", B + [1])
    q = seq("a2", A + [9])
    s.add(q)
    step(s)
    (order,) = s.take_pulls()
    s.finish_pull("a2", False)  # say a checksum failed: the reader gives up, then forgets the entries
    for tier, _, h in order.source.entries:
        s.tiers.drop(tier, h)
    assert q.block_table == [] and q.num_computed_tokens == 0 and q.status is SequenceStatus.WAITING
    out = s.schedule()
    assert out.scheduled[0].num_new_tokens == len(A) + 1


def _replay(events: list[Any]) -> dict[str | None, set[int]]:
    tiers: dict[str | None, set[int]] = {None: set(), "CPU": set(), "DISK": set()}
    for ev in events:
        if isinstance(ev, BlockStored):
            tiers[ev.medium].update(ev.block_hashes)
        elif isinstance(ev, BlockRemoved):
            tiers[ev.medium].difference_update(ev.block_hashes)
        elif isinstance(ev, AllBlocksCleared):
            tiers[None].clear()
    return tiers


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "step", "finish_ok", "finish_fail", "abort", "drop_disk"]),
                          st.integers(0, 7)), min_size=1, max_size=80))
def test_random_interleavings_keep_every_tier_consistent(ops: list[tuple[str, int]]) -> None:
    s = make(num_blocks=12, host=6, disk=6, max_num_seqs=3, max_num_batched_tokens=12)
    prompts = [list(range(10 * i, 10 * i + 6 + 3 * (i % 4))) for i in range(8)]  # shared prefixes below
    events: list[Any] = []
    n = 0
    for op, k in ops:
        n += 1
        if op == "add":
            try:
                s.add(seq(f"r{n}", prompts[k] + prompts[(k + 1) % 8][:k], max_tokens=1 + k % 3))
            except ValueError:
                pass
        elif op in ("finish_ok", "finish_fail") and s.pulling:
            s.finish_pull(sorted(s.pulling)[k % len(s.pulling)], op == "finish_ok")
        elif op == "abort":
            live = sorted({*s._seqs, *s.pulling})
            if live:
                s.abort(live[k % len(live)])
        elif op == "drop_disk" and s.tiers.disk.entries:
            s.tiers.drop(DISK, sorted(s.tiers.disk.entries)[k % len(s.tiers.disk.entries)])
        else:
            step(s)
        s.take_pulls()
        events += s.block_manager.take_events()
        s.block_manager.check_integrity()
        s.tiers.check_integrity()
        # nothing being read is ever handed out
        for src in s._onboarding.values():
            for tier, slot, h in src.entries:
                assert s.tiers.pools[tier].entries[h].slot == slot
        # events replayed reproduce every tier
        replay = _replay(events)
        assert replay[None] == set(s.block_manager._hash_to_block)
        assert replay["CPU"] == set(s.tiers.host.entries)
        assert replay["DISK"] == set(s.tiers.disk.entries)
    for _ in range(500):
        for rid in list(s.pulling):
            s.finish_pull(rid, True)
        if not (s.has_work() or s.pulling):
            break
        step(s)
        s.take_pulls()
    assert s.block_manager.num_active_blocks == 0
    assert not s.tiers.host._pins and not s.tiers.disk._pins
