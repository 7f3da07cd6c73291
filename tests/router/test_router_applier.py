"""KvEventApplier and KvEventSync: events applied on the applier's thread, in FIFO order with
resets and removals, failures and a full queue sent back to the loop as resyncs, a clean stop, and
routing while the thread applies (against an index fed the same events synchronously)."""
from __future__ import annotations

import asyncio
import random
import threading
import time

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from turbine.protocols.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventBatch,
    KvStateSnapshot,
)
from turbine.router import kv_event_applier
from turbine.router.event_sync import KvEventSync
from turbine.router.indexer import KvIndexer
from turbine.router.kv_event_applier import KvEventApplier
from turbine.router.router import Router
from turbine.runtime.events import ReceivedEvent

BS = 4
enc = msgspec.msgpack.Encoder()


def payload(*events: KVEvent) -> bytes:
    return enc.encode(KVEventBatch(ts=time.time(), events=list(events)))


def state(ix: KvIndexer) -> tuple[dict[str, dict[int, int]], dict[int, frozenset[str]], dict[str, int]]:
    """What an index says, independent of slot numbering: each worker's hash -> node map, each
    node's holders, each worker's tier bits."""
    ix.check_integrity()
    holders = {nid: frozenset(w for w, b in ix._bit.items() if m & b) for nid, m in ix._mask.items()}
    return ({w: dict(b) for w, b in ix._blocks.items() if b}, holders,
            {w: len(t) for w, t in ix._tiers.items() if t})


_earlier: set[threading.Thread] = set()


@pytest.fixture(autouse=True, scope="module")
def _threads_from_earlier_suites() -> None:
    """Applier threads that another suite's failed shutdown left behind are its failure, not
    this module's: these tests check only for threads they started."""
    _earlier.clear()
    _earlier.update(_applier_threads())


def _applier_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("kv-event-applier")}


def no_applier_threads() -> bool:
    """No applier thread this test started is still alive."""
    return not (_applier_threads() - _earlier)


class Chains:
    """Random chains of blocks as one worker's engine would report them."""

    def __init__(self, rng: random.Random, worker: str):
        self.rng = rng
        self.worker = worker
        self.held: dict[int, BlockStored] = {}  # sequence hash -> its one-block store (a snapshot's items)
        self.children: dict[int | None, set[int]] = {}
        self._next = rng.randrange(1 << 40)

    def store(self, n: int, *, shared: bool = True) -> BlockStored:
        """``n`` new blocks below a random held block (or the root); tokens from a small
        alphabet, so workers share prefixes."""
        parent = self.rng.choice([None, *self.held]) if self.held else None
        hashes, tokens, p = [], [], parent
        for _ in range(n):
            self._next += 1
            h = self._next
            toks = [self.rng.randrange(3 if shared else 1 << 20) for _ in range(BS)]
            hashes.append(h)
            tokens += toks
            self.held[h] = BlockStored(block_hashes=[h], parent_block_hash=p, token_ids=toks, block_size=BS)
            self.children.setdefault(p, set()).add(h)
            p = h
        return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=BS)

    def remove_leaves(self, n: int) -> BlockRemoved:
        """Up to ``n`` blocks no other held block hangs below (what is held stays prefix-closed)."""
        gone: list[int] = []
        for _ in range(n):
            leaves = [h for h in self.held if not self.children.get(h)]
            if not leaves:
                break
            h = self.rng.choice(leaves)
            ev = self.held.pop(h)
            self.children[ev.parent_block_hash].discard(h)
            gone.append(h)
        return BlockRemoved(block_hashes=gone)

    def snapshot(self, last_seq: int) -> KvStateSnapshot:
        return KvStateSnapshot(last_seq=last_seq, blocks=list(self.held.values()))


def random_events(rng: random.Random, chains: Chains, n: int) -> list[KVEvent]:
    out: list[KVEvent] = []
    for _ in range(n):
        r = rng.random()
        out.append(chains.store(rng.randint(1, 6)) if r < 0.6 or not chains.held else chains.remove_leaves(rng.randint(1, 4)))
    return out


# -- the applier on its own ------------------------------------------------------------------------
async def test_fifo_order_of_events_resets_and_removals_matches_applying_inline() -> None:
    rng = random.Random(1)
    workers = {w: Chains(rng, w) for w in ("w0", "w1", "w2")}
    ref, threaded = Router("kv", block_size=BS), Router("kv", block_size=BS)
    failed: list[object] = []
    ap = KvEventApplier(failed.append)
    ap.start()
    try:
        for step in range(300):
            w = rng.choice(list(workers))
            r = rng.random()
            if r < 0.03:  # the worker leaves; a later event brings it back
                ref.worker_removed(w)
                threaded.worker_removed(w, index=False)
                ap.submit_removal(threaded, w)
                workers[w] = Chains(rng, w)
            elif r < 0.06:  # a resync from the worker's full state
                snap = workers[w].snapshot(step).blocks
                ref.reset_worker(w, snap)
                ap.submit_reset(threaded, w, snap)
            elif r < 0.07:
                ref.apply_kv_events(w, [AllBlocksCleared()])
                assert ap.submit_events(threaded, w, payload(AllBlocksCleared()), (w, step))
                workers[w] = Chains(rng, w)
            else:
                evs = random_events(rng, workers[w], rng.randint(1, 3))
                assert ref.apply_kv_events(w, evs)
                assert ap.submit_events(threaded, w, payload(*evs), (w, step))
        assert await asyncio.to_thread(ap.wait_idle, 10)
    finally:
        ap.close()
    assert not failed
    assert state(threaded.index) == state(ref.index)
    s1, s2 = ref.stats, threaded.stats
    assert (s1.blocks_stored, s1.blocks_removed, s1.resyncs) == (s2.blocks_stored, s2.blocks_removed, s2.resyncs)
    assert ap.done == ap.submitted and ap.queued_bytes == 0 and no_applier_threads()


async def test_unplaceable_and_undecodable_batches_come_back_on_the_loop() -> None:
    loop_thread = threading.get_ident()
    got: list[tuple[object, int]] = []
    done = asyncio.Event()

    def on_failed(token: object) -> None:
        got.append((token, threading.get_ident()))
        if len(got) == 2:
            done.set()

    r = Router("kv", block_size=BS)
    ap = KvEventApplier(on_failed)
    ap.start()
    try:
        orphan = BlockStored(block_hashes=[2], parent_block_hash=1, token_ids=[1, 2, 3, 4], block_size=BS)
        ok = BlockStored(block_hashes=[5], parent_block_hash=None, token_ids=[5, 6, 7, 8], block_size=BS)
        ap.submit_events(r, "w", payload(orphan, ok), "orphan")  # the good event still lands
        ap.submit_events(r, "w", b"\xc1 not msgpack", "garbage")
        await asyncio.wait_for(done.wait(), 5)
    finally:
        ap.close()
    assert got == [("orphan", loop_thread), ("garbage", loop_thread)]
    assert r.index.block_counts() == {"w": 1} and r.stats.events_unplaced == 1 and ap.failed == 2


async def test_the_queue_is_bounded_and_refuses_what_does_not_fit() -> None:
    r = Router("kv", block_size=BS)
    p = payload(BlockStored(block_hashes=[1], parent_block_hash=None, token_ids=[1, 2, 3, 4], block_size=BS))
    ap = KvEventApplier(lambda t: None, max_queued_bytes=3 * (len(p) + kv_event_applier.ITEM_BYTES))
    # not started: nothing drains
    assert [ap.submit_events(r, "w", p, None) for _ in range(4)] == [True, True, True, False]
    assert ap.refused == 1 and ap.queued_bytes == 3 * (len(p) + kv_event_applier.ITEM_BYTES)
    ap.submit_reset(r, "w", [])  # resets and removals are never refused
    ap.submit_removal(r, "w")
    ap.start()
    assert await asyncio.to_thread(ap.wait_idle, 5)
    assert ap.queued_bytes == 0 and ap.submit_events(r, "w", p, None)
    ap.close()
    assert not ap.running and no_applier_threads()
    with pytest.raises(RuntimeError, match="closed"):
        ap.submit_removal(r, "w")


def test_long_events_are_cut_into_pieces_that_mean_the_same() -> None:
    rng = random.Random(4)
    ch = Chains(rng, "w")
    big = ch.store(kv_event_applier.PIECE_BLOCKS * 2 + 17)
    small = [ch.store(3) for _ in range(40)]
    gone = ch.remove_leaves(kv_event_applier.PIECE_BLOCKS + 60)
    after = Chains(rng, "w").store(5)  # below the root: the first store after a clear
    batches = [[big, *small], [gone, AllBlocksCleared(), after]]
    ref = Router("kv", block_size=BS)
    r = Router("kv", block_size=BS)
    ap = KvEventApplier(lambda t: None, call_soon=lambda f, *a: f(*a), slice_s=1e-5)
    ap.start()
    try:
        for b in batches:
            assert ref.apply_kv_events("w", b)
            ap.submit_events(r, "w", payload(*b), None)
            assert ap.wait_idle(10)
            assert state(r.index) == state(ref.index)
    finally:
        ap.close()
    pieces = list(kv_event_applier._pieces(batches[0]))
    assert all(sum(len(e.block_hashes) for e in p) <= kv_event_applier.PIECE_BLOCKS for p in pieces)
    assert ap.yields > 0 and ap.failed == 0


def test_routing_while_the_thread_applies_sees_whole_events_and_ends_where_inline_does() -> None:
    """Each stored event is 8 blocks of one chain, so a reader must see depths in multiples of 8
    (the lock covers whole events), and the final index equals one fed the same events inline."""
    rng = random.Random(7)
    ref, r = Router("kv", block_size=BS, seed=1), Router("kv", block_size=BS, seed=1)
    ap = KvEventApplier(lambda t: None, call_soon=lambda f, *a: f(*a), slice_s=2e-4)
    chain_tokens = [rng.randrange(1 << 20) for _ in range(BS * 8 * 40)]
    noise = {w: Chains(rng, w) for w in ("w1", "w2")}
    parent: int | None = None
    items: list[tuple[str, list[KVEvent]]] = []
    for i in range(40):  # w0 grows one long chain, 8 blocks an event
        hashes = list(range(1000 + i * 8, 1008 + i * 8))
        items.append(("w0", [BlockStored(block_hashes=hashes, parent_block_hash=parent, block_size=BS,
                                         token_ids=chain_tokens[i * 8 * BS : (i + 1) * 8 * BS])]))
        parent = hashes[-1]
        for w, ch in noise.items():  # other workers store and evict meanwhile
            items.append((w, random_events(rng, ch, 20)))
    for w, evs in items:
        assert ref.apply_kv_events(w, evs)
        ap.submit_events(r, w, payload(*evs), None)
    ap.start()
    seen = set()
    i = 0
    try:
        while ap.done < ap.submitted:
            i += 1
            d = r.route(f"q{i}", ["w0", "w1", "w2"], chain_tokens)
            assert d is not None and d.overlap_blocks % 8 == 0 or d.overlap_blocks == 319, d
            depth = r.index.find_matches_for_tokens(chain_tokens).get("w0", 0)
            assert depth % 8 == 0, depth
            seen.add(depth)
            r.finished(f"q{i}")
            time.sleep(0.0002)  # a loop idles between requests (and gives up the GIL)
        assert ap.wait_idle(10)
    finally:
        ap.close()
    assert state(r.index) == state(ref.index)
    assert r.index.find_matches_for_tokens(chain_tokens)["w0"] == 320
    assert len(seen) > 1  # the reader did run while the chain grew


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), slice_us=st.sampled_from([5, 50, 500]),
       ops=st.lists(st.tuples(st.sampled_from(["w0", "w1", "w2"]), st.sampled_from(["events", "reset", "remove", "clear"]),
                              st.integers(1, 4)), min_size=1, max_size=40))
def test_threaded_path_ends_where_inline_does(seed: int, slice_us: int, ops: list[tuple[str, str, int]]) -> None:
    rng = random.Random(seed)
    ws = {w: Chains(rng, w) for w in ("w0", "w1", "w2")}
    ref, r = Router("kv", block_size=BS), Router("kv", block_size=BS)
    ap = KvEventApplier(lambda t: None, call_soon=lambda f, *a: f(*a), slice_s=slice_us * 1e-6)
    ap.start()
    try:
        for i, (w, kind, n) in enumerate(ops):
            if kind == "events":
                evs = random_events(rng, ws[w], n)
                ref.apply_kv_events(w, evs)
                assert ap.submit_events(r, w, payload(*evs), None)
            elif kind == "reset":
                snap = ws[w].snapshot(i).blocks
                rng.shuffle(snap)
                ref.reset_worker(w, snap)
                ap.submit_reset(r, w, snap)
            elif kind == "remove":
                ref.worker_removed(w)
                r.worker_removed(w, index=False)
                ap.submit_removal(r, w)
                ws[w] = Chains(rng, w)
            else:
                ref.apply_kv_events(w, [AllBlocksCleared()])
                assert ap.submit_events(r, w, payload(AllBlocksCleared()), None)
                ws[w] = Chains(rng, w)
            if rng.random() < 0.3:  # a lookup while the thread may be mid-way
                r.index.find_matches_for_tokens([0] * BS * 6)
        assert ap.wait_idle(10)
    finally:
        ap.close()
    assert state(r.index) == state(ref.index)
    assert ap.failed == 0 and no_applier_threads()


# -- KvEventSync over the applier ------------------------------------------------------------------
class FakeFleet:
    """Workers' event streams and their ``kv_state`` snapshots, without sockets."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.chains: dict[str, Chains] = {}
        self.seq: dict[str, int] = {}
        self.snapshots = 0

    def worker(self, addr: str) -> Chains:
        if addr not in self.chains:
            self.chains[addr] = Chains(self.rng, addr)
            self.seq[addr] = 0
        return self.chains[addr]

    def publish(self, addr: str, events: list[KVEvent]) -> ReceivedEvent:
        self.seq[addr] += 1
        return ReceivedEvent("kv", self.seq[addr], payload(*events), addr)

    # the request plane client KvEventSync fetches snapshots with
    def stream(self, address: str, endpoint: str, body: bytes, *, timeout: float | None = None):  # type: ignore[no-untyped-def]
        assert endpoint == "kv_state"
        addr = address.removeprefix("req-")
        snap = self.chains[addr].snapshot(self.seq[addr])
        self.snapshots += 1

        async def frames():  # type: ignore[no-untyped-def]
            await asyncio.sleep(0)
            yield msgspec.msgpack.encode(snap)
        return frames()

    async def close(self) -> None:
        pass


async def settle(sync: KvEventSync, timeout: float = 10.0) -> None:
    """Until no worker is resyncing and the applier has applied all it was given, twice running
    (a failure the thread reports gets its resync going in between)."""
    t_end = time.monotonic() + timeout
    calm = 0
    while time.monotonic() < t_end:
        await asyncio.sleep(0.02)
        ap = sync.applier
        if any(p.syncing for p in sync.peers.values()) or ap.done != ap.submitted:
            calm = 0
        else:
            calm += 1
            if calm == 2:
                return
    raise AssertionError("KvEventSync did not settle")


def truth(fleet: FakeFleet, addrs: list[str]) -> KvIndexer:
    ref = Router("kv", block_size=BS)
    for a in addrs:
        ref.reset_worker(a, fleet.chains[a].snapshot(0).blocks)
    return ref.index


async def test_sync_applies_on_the_thread_and_resyncs_an_unplaceable_batch() -> None:
    fleet = FakeFleet(random.Random(3))
    router = Router("kv", block_size=BS)
    sync = KvEventSync(fleet)  # type: ignore[arg-type]
    addrs = ["a", "b"]
    for a in addrs:
        fleet.worker(a).store(4)
        sync.add_worker(a, a, "req-" + a, router)
    await settle(sync)
    assert sync.resyncs == 2 and sync.applier.running
    for _ in range(50):
        for a in addrs:
            sync.on_event(fleet.publish(a, random_events(fleet.rng, fleet.chains[a], 3)))
    await settle(sync)
    assert state(router.index) == state(truth(fleet, addrs))
    # the engine announces a block below one it never reported: the index cannot place it
    ch = fleet.chains["a"]
    ch.held[999] = BlockStored(block_hashes=[999], parent_block_hash=None, token_ids=[9] * BS, block_size=BS)
    orphan = BlockStored(block_hashes=[1000], parent_block_hash=999, token_ids=[8] * BS, block_size=BS)
    ch.held[1000] = BlockStored(block_hashes=[1000], parent_block_hash=999, token_ids=[8] * BS, block_size=BS)
    sync.on_event(fleet.publish("a", [orphan]))
    await settle(sync)
    assert sync.resyncs == 3 and sync.applier.failed == 1
    assert state(router.index) == state(truth(fleet, addrs))
    await sync.close()
    assert not sync.applier.running and no_applier_threads()


async def test_sync_resyncs_the_workers_a_full_queue_refused() -> None:
    fleet = FakeFleet(random.Random(5))
    router = Router("kv", block_size=BS)
    failed: list[object] = []
    sync = KvEventSync(fleet)  # type: ignore[arg-type]
    sync.applier = KvEventApplier(lambda t: (failed.append(t), sync._failed(t)), max_queued_bytes=4000)
    addrs = ["a", "b", "c"]
    for a in addrs:
        fleet.worker(a)
        sync.add_worker(a, a, "req-" + a, router)
    await settle(sync)
    for _ in range(200):  # a burst, handed over without yielding to the loop: more than the queue holds
        for a in addrs:
            sync.on_event(fleet.publish(a, random_events(fleet.rng, fleet.worker(a), 2)))
    assert sync.overflows > 0 and sync.applier.refused == sync.overflows
    await settle(sync)
    assert state(router.index) == state(truth(fleet, addrs))
    assert sync.resyncs >= 3 + 1
    await sync.close()
    assert no_applier_threads()


async def test_a_removed_worker_leaves_no_blocks_behind_its_queued_events() -> None:
    fleet = FakeFleet(random.Random(6))
    router = Router("kv", block_size=BS)
    sync = KvEventSync(fleet)  # type: ignore[arg-type]
    for a in ("a", "b"):
        fleet.worker(a)
        sync.add_worker(a, a, "req-" + a, router)
    await settle(sync)
    for _ in range(100):
        sync.on_event(fleet.publish("a", random_events(fleet.rng, fleet.chains["a"], 3)))
        sync.on_event(fleet.publish("b", random_events(fleet.rng, fleet.chains["b"], 3)))
    sync.remove_worker("a")  # what the registry does when a worker leaves discovery
    sync.worker_removed(router, "a")
    await settle(sync)
    assert "a" not in router.index.workers and state(router.index) == state(truth(fleet, ["b"]))
    await sync.close()
    sync.worker_removed(router, "b")  # after close: inline
    assert router.index.num_blocks == 0 and no_applier_threads()


async def test_close_stops_and_joins_the_thread_even_while_it_applies() -> None:
    fleet = FakeFleet(random.Random(8))
    router = Router("kv", block_size=BS)
    sync = KvEventSync(fleet)  # type: ignore[arg-type]
    fleet.worker("a")
    sync.add_worker("a", "a", "req-a", router)
    await settle(sync)
    for _ in range(300):
        sync.on_event(fleet.publish("a", random_events(fleet.rng, fleet.chains["a"], 4)))
    await sync.close()
    assert not sync.applier.running and no_applier_threads()
    sync.add_worker("b", "b", "req-b", router)  # shutting down: ignored, no thread restarted
    assert "b" not in sync.peers and no_applier_threads()
