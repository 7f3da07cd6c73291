"""Router micro-benchmarks: routing decision latency and KV block events applied per second.

Builds a fleet-sized index through the real event path (``Router.apply_kv_events``): by default
64 workers x ~16k blocks = ~1M indexed (worker, block) pairs, block size 64. Each worker's cache
is a mix of shared prefixes and private ones, the way a prefix cache fills up under chat traffic:

    system prompt (8 of them, 4 blocks) ─▶ document (512, 8-48 blocks, Zipf popularity)
                                             ─▶ conversation suffix (8-48 private blocks)

Then it measures, on that index:
- routing decisions: ``Router.route`` ("kv" policy) for requests of 16-64 blocks plus a partial
  tail (new questions on a popular document, later turns of an existing conversation, fresh
  prompts), with ~256 requests in flight so the load view is not empty; p50/p90/p99/max, and the
  same requests split into hashing / index walk / selection;
- KV events: BlockStored batches of 16 blocks x 64 tokens and BlockRemoved batches keeping the
  index at ~1M (store, remove, mixed), the same with msgpack decoding included, and a
  breakdown of where a stored block's time goes;
- the frontend's threaded path: msgpack batches through ``KvEventApplier`` (decoded and applied
  on its thread, in slices under the index lock), alone and while this thread routes requests at
  a steady rate, sleeping between them as an event loop does: the decisions' latency then, and
  how late the sleeping thread gets going again (its wait for the GIL), against the same loop
  with the applier idle.

Prints a table and appends it, with the machine and the date, to bench/RESULTS.md.

    python bench/router_bench.py                     # the full 1M-block run (~1 min, ~1 GB RSS)
    python bench/router_bench.py --blocks-per-worker 2000 --requests 2000 --no-results   # quick
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import random
import sys
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from turbine.protocols.kv_events import BlockRemoved, BlockStored, KVEvent, KVEventBatch  # noqa: E402
from turbine.router.indexer import hash_blocks  # noqa: E402
from turbine.router.kv_event_applier import DEFAULT_SLICE_S, KvEventApplier  # noqa: E402
from turbine.router.kv_event_decoder import KvEventDecoder  # noqa: E402
from turbine.router.router import Router  # noqa: E402
from turbine.router.selector import select_worker  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _procs import machine  # noqa: E402  (bench/ helper, shared with the other scripts)

TARGET_P99_US = 100.0
TARGET_BLOCKS_PER_S = 1_000_000
EVENT_BLOCKS = 16  # blocks per BlockStored, as a vLLM step over a long prompt emits them
SYS_BLOCKS = 4


# ---- a fleet's cache contents ------------------------------------------------------------------
class Corpus:
    """Shared system prompts and documents, and private conversations, as block ids."""

    def __init__(self, rng: random.Random, block_size: int, n_sys: int = 8, n_docs: int = 512):
        self.rng = rng
        self.bs = block_size
        self._next = 0
        self.n_sys = n_sys
        sys_prompts = [self.fresh(SYS_BLOCKS) for _ in range(n_sys)]
        self.docs = [sys_prompts[d % n_sys] + self.fresh(rng.randint(8, 48)) for d in range(n_docs)]
        self.doc_weights = [1.0 / (i + 1) ** 1.1 for i in range(n_docs)]

    def fresh(self, n: int) -> list[int]:
        out = list(range(self._next, self._next + n))
        self._next += n
        return out

    def doc(self) -> int:
        return self.rng.choices(range(len(self.docs)), self.doc_weights)[0]

    def tokens(self, bids: list[int]) -> list[int]:
        """Deterministic tokens of blocks: two tokens spell the block id, the rest fill it."""
        filler = list(range(1000, 1000 + self.bs - 2))
        out: list[int] = []
        for b in bids:
            out.append(b & 0xFFFF)
            out.append(b >> 16)
            out.extend(filler)
        return out


class Worker:
    """One worker's cache as its engine would report it: sequence hash per prefix."""

    def __init__(self, wid: str):
        self.wid = wid
        self.doc_tail: dict[int, int] = {}  # doc -> sequence hash of its last block here
        self.sys_held: set[int] = set()  # system prompts cached here (shared by several docs)
        self.blocks = 0


def chain_events(corpus: Corpus, parent: int | None, bids: list[int]) -> tuple[list[BlockStored], list[int]]:
    """BlockStored events (EVENT_BLOCKS blocks each) for a chain of blocks below ``parent``."""
    events, seqs = [], []
    p = parent
    for i in range(0, len(bids), EVENT_BLOCKS):
        chunk = bids[i : i + EVENT_BLOCKS]
        hashes = []
        for b in chunk:
            p = hash((p, b))
            hashes.append(p)
        events.append(BlockStored(block_hashes=hashes, parent_block_hash=parent if i == 0 else seqs[-1],
                                  token_ids=corpus.tokens(chunk), block_size=corpus.bs))
        seqs.extend(hashes)
    return events, seqs


class Conversation:
    __slots__ = ("worker", "doc", "bids", "seqs")

    def __init__(self, worker: str, doc: int, bids: list[int], seqs: list[int]):
        self.worker, self.doc, self.bids, self.seqs = worker, doc, bids, seqs


def conversation(corpus: Corpus, w: Worker) -> tuple[list[KVEvent], Conversation]:
    """One request's worth of stored blocks on ``w``: its document (if new there) and a suffix."""
    rng = corpus.rng
    d = corpus.doc()
    events: list[KVEvent] = []
    tail = w.doc_tail.get(d)
    if tail is None:
        ev, seqs = chain_events(corpus, None, corpus.docs[d])
        events += ev
        tail = w.doc_tail[d] = seqs[-1]
        w.blocks += len(seqs) - (SYS_BLOCKS if d % corpus.n_sys in w.sys_held else 0)
        w.sys_held.add(d % corpus.n_sys)
    bids = corpus.fresh(rng.randint(8, 48))
    ev, seqs = chain_events(corpus, tail, bids)
    events += ev
    w.blocks += len(seqs)
    return events, Conversation(w.wid, d, bids, seqs)


# ---- measurements -----------------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build(router: Router, corpus: Corpus, workers: list[Worker], per_worker: int) -> tuple[list[Conversation], float, int]:
    """Fill the index through the event path; returns conversations, seconds applying, blocks."""
    convs: list[Conversation] = []
    apply_s, blocks = 0.0, 0
    pending = list(workers)
    while pending:
        batch = []
        for w in pending:
            events, conv = conversation(corpus, w)
            batch.append((w.wid, events))
            convs.append(conv)
            blocks += sum(len(e.block_hashes) for e in events)  # type: ignore[union-attr]
        t0 = time.perf_counter()
        for wid, events in batch:
            if not router.apply_kv_events(wid, events):
                raise RuntimeError("the benchmark's own events could not be placed")
        apply_s += time.perf_counter() - t0
        pending = [w for w in pending if w.blocks < per_worker]
    return convs, apply_s, blocks


def request_tokens(corpus: Corpus, convs: list[Conversation], rng: random.Random) -> list[int]:
    """16-64 blocks plus a partial tail: doc + question, a later turn, or a fresh prompt."""
    n = rng.randint(16, 64)
    r = rng.random()
    if r < 0.5:
        bids = corpus.docs[corpus.doc()][:n]
    elif r < 0.8:
        c = rng.choice(convs)
        bids = (corpus.docs[c.doc] + c.bids)[:n]
    else:
        bids = []
    bids = bids + corpus.fresh(n - len(bids))
    return corpus.tokens(bids) + list(range(7, 7 + rng.randrange(corpus.bs)))


def decisions(router: Router, corpus: Corpus, convs: list[Conversation], n: int, rng: random.Random,
              inflight: int = 256) -> dict[str, float]:
    cands = sorted(router.index.workers)
    q: deque[str] = deque()
    lat: list[float] = []
    hits = 0
    gc_before = gc.get_stats()[2]["collections"]
    for i in range(n + 500):
        tokens = request_tokens(corpus, convs, rng)
        rid = f"r{i}"
        t0 = time.perf_counter_ns()
        d = router.route(rid, cands, tokens)
        t1 = time.perf_counter_ns()
        if i >= 500:
            lat.append((t1 - t0) / 1000)
            hits += d.overlap_blocks > 0
        q.append(rid)
        if len(q) > inflight // 2:
            router.first_token(q[len(q) - inflight // 2])
        if len(q) > inflight:
            router.finished(q.popleft())
    for rid in q:
        router.finished(rid)
    return {"p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99), "max": max(lat),
            "hit_frac": hits / n, "gen2": gc.get_stats()[2]["collections"] - gc_before}


def decision_breakdown(router: Router, corpus: Corpus, convs: list[Conversation], n: int,
                       rng: random.Random) -> dict[str, tuple[float, float]]:
    """The parts of a decision, timed separately on the same requests: (p50, p99) in µs."""
    cands = sorted(router.index.workers)
    parts: dict[str, list[float]] = {"lookup": [], "hash": [], "select": []}
    ix, loads = router.index, router.loads.workers
    for _ in range(n):
        tokens = request_tokens(corpus, convs, rng)
        t0 = time.perf_counter_ns()
        ov = ix.find_matches_for_tokens(tokens)  # what route() does: hash lazily while walking
        t1 = time.perf_counter_ns()
        select_worker(cands, ov, loads, -(-len(tokens) // corpus.bs), block_size=corpus.bs, rng=router.rng)
        t2 = time.perf_counter_ns()
        ix.local_hashes(tokens)  # for reference: hashing every full block
        t3 = time.perf_counter_ns()
        parts["lookup"].append((t1 - t0) / 1000)
        parts["select"].append((t2 - t1) / 1000)
        parts["hash"].append((t3 - t2) / 1000)
    return {k: (pct(v, 50), pct(v, 99)) for k, v in parts.items()}


def churn_stream(corpus: Corpus, workers: list[Worker], convs: list[Conversation],
                 rng: random.Random) -> Iterator[tuple[str, list[KVEvent], int, int]]:
    """Steady state: each new conversation stores blocks, an old one's suffix is evicted (leaves
    first), so the index stays the same size. Yields (worker, events, stored, removed)."""
    old = deque(convs)
    by_id = {w.wid: w for w in workers}
    ids = list(by_id)
    debt = 0  # blocks stored but not yet balanced by evictions
    while True:
        w = by_id[rng.choice(ids)]
        before = w.blocks
        events, conv = conversation(corpus, w)
        old.append(conv)
        stored = sum(len(e.block_hashes) for e in events)  # type: ignore[union-attr]
        yield w.wid, events, stored, 0
        debt += w.blocks - before  # (a document's system prompt may already be there: not new)
        while debt > 0 and old:
            c = old.popleft()
            by_id[c.worker].blocks -= len(c.seqs)
            debt -= len(c.seqs)
            seqs = c.seqs[::-1]
            for i in range(0, len(seqs), EVENT_BLOCKS):
                yield c.worker, [BlockRemoved(block_hashes=seqs[i : i + EVENT_BLOCKS])], 0, len(seqs[i : i + EVENT_BLOCKS])


def churn(router: Router, stream: Iterator[tuple[str, list[KVEvent], int, int]], target_blocks: int,
          mode: str = "apply", local_hashes: bool = False) -> dict[str, float]:
    """Apply ~target_blocks stored + removed blocks; blocks/s of what ``mode`` times.

    apply: ``apply_kv_events`` on event structs; decode+apply: msgpack payload to index;
    decode-bytes: only decoding payloads whose block hashes are 32-byte digests (newer vLLM; the
    decoder's slow path), the events then applied untimed. ``local_hashes``: the stores carry
    their blocks' local hashes, as Turbine's engines send them (computed untimed: the engine
    hashed the blocks anyway); without, as vLLM's events come, the router hashes the tokens.
    """
    enc = msgspec.msgpack.Encoder()
    dec = KvEventDecoder()
    chunk: list[tuple[str, list[KVEvent], bytes, int, int]] = []
    t_store = t_remove = 0.0
    n_store = n_remove = 0
    done = 0
    while done < target_blocks:
        chunk.clear()
        while len(chunk) < 512:
            wid, events, s, r = next(stream)
            if local_hashes:
                events = [msgspec.structs.replace(e, local_hashes=hash_blocks(e.token_ids, e.block_size))
                          if type(e) is BlockStored else e for e in events]
            payload = b""
            if mode == "decode+apply":
                payload = enc.encode(KVEventBatch(ts=time.time(), events=events))
            elif mode == "decode-bytes":
                raw = msgspec.msgpack.decode(enc.encode(KVEventBatch(ts=time.time(), events=events)))
                for ev in raw[1]:
                    ev[1] = [h.to_bytes(8, "little", signed=True) * 4 for h in ev[1]]
                    if ev[0] == "BlockStored" and ev[2] is not None:
                        ev[2] = ev[2].to_bytes(8, "little", signed=True) * 4
                payload = enc.encode(raw)
            chunk.append((wid, events, payload, s, r))
        for wid, events, payload, s, r in chunk:
            t0 = time.perf_counter()
            if mode == "apply":
                router.apply_kv_events(wid, events)
            elif mode == "decode+apply":
                b = dec.decode(payload)
                router.apply_kv_events(wid, b.events, b.ts)
            else:
                dec.decode(payload)
            dt_ = time.perf_counter() - t0
            if mode == "decode-bytes":
                router.apply_kv_events(wid, events)
            if s:
                t_store += dt_
                n_store += s
            else:
                t_remove += dt_
                n_remove += r
            done += s + r
    return {"store": n_store / t_store, "remove": n_remove / t_remove,
            "mixed": (n_store + n_remove) / (t_store + t_remove)}


def payloads(stream: Iterator[tuple[str, list[KVEvent], int, int]], target_blocks: int) -> tuple[list[tuple[str, bytes]], int]:
    """~target_blocks stored + removed blocks of the churn, as the msgpack batches workers send."""
    enc = msgspec.msgpack.Encoder()
    out: list[tuple[str, bytes]] = []
    n = 0
    while n < target_blocks:
        wid, events, s, r = next(stream)
        out.append((wid, enc.encode(KVEventBatch(ts=time.time(), events=events))))
        n += s + r
    return out, n


def threaded(router: Router, stream: Iterator[tuple[str, list[KVEvent], int, int]], target_blocks: int,
             slice_s: float, route: Callable[[float], None] | None = None, rate: float = 0.0) -> float:
    """Blocks/s through ``KvEventApplier`` (queued up front, then the thread started); with
    ``route``, this thread calls ``route(deadline)`` ``rate`` times a second meanwhile, sleeping in
    between. Unplaced batches would be counted as a failure of the benchmark."""
    items, n = payloads(stream, target_blocks)
    failed: list[object] = []
    ap = KvEventApplier(failed.append, call_soon=lambda f, *a: f(*a), max_queued_bytes=1 << 40, slice_s=slice_s)
    for wid, p in items:
        ap.submit_events(router, wid, p, wid)
    t0 = time.perf_counter()
    ap.start()
    if route is None:
        ap.wait_idle()
    else:
        period, deadline = 1.0 / rate, t0
        while ap.done < ap.submitted:
            deadline += period
            route(deadline)
    dt_ = time.perf_counter() - t0
    ap.close()
    if failed:
        raise RuntimeError(f"{len(failed)} of the benchmark's own batches could not be placed")
    return n / dt_


class PacedRouting:
    """Routes one request per call at ``deadline`` (sleeping until then), recording the decision's
    latency and how late the thread got going after its sleep (timer slack, plus any wait for
    the GIL while another thread runs). Prompts are made up front (2,000, then reused), so this
    thread does little but route."""

    def __init__(self, router: Router, corpus: Corpus, convs: list[Conversation], rng: random.Random,
                 inflight: int = 256):
        self.router = router
        self.prompts = [request_tokens(corpus, convs, rng) for _ in range(2000)]
        self.cands = sorted(router.index.workers)
        self.inflight = inflight
        self.q: deque[str] = deque()
        self.lat: list[float] = []
        self.late: list[float] = []
        self.i = 0

    def __call__(self, deadline: float) -> None:
        tokens = self.prompts[self.i % len(self.prompts)]
        delay = deadline - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        woke = time.perf_counter()
        rid = f"p{self.i}"
        self.i += 1
        t0 = time.perf_counter_ns()
        self.router.route(rid, self.cands, tokens)
        t1 = time.perf_counter_ns()
        self.lat.append((t1 - t0) / 1000)
        self.late.append(max(0.0, woke - deadline) * 1e6)
        q = self.q
        q.append(rid)
        if len(q) > self.inflight // 2:
            self.router.first_token(q[len(q) - self.inflight // 2])
        if len(q) > self.inflight:
            self.router.finished(q.popleft())

    def run_idle(self, n: int, rate: float) -> None:
        deadline = time.perf_counter()
        for _ in range(n):
            deadline += 1.0 / rate
            self(deadline)

    def summary(self) -> dict[str, float]:
        return {"p50": pct(self.lat, 50), "p99": pct(self.lat, 99), "max": max(self.lat), "n": len(self.lat),
                "late50": pct(self.late, 50), "late99": pct(self.late, 99)}

    def close(self) -> None:
        for rid in self.q:
            self.router.finished(rid)
        self.q.clear()


def python_speed() -> float:
    """Seconds for a 10M-iteration pure-Python loop (compares this machine with others')."""
    t0 = time.perf_counter()
    s = 0
    for i in range(10_000_000):
        s += i
    return time.perf_counter() - t0



def store_breakdown(router: Router, corpus: Corpus, workers: list[Worker], n_events: int) -> dict[str, float]:
    """Where a stored block's time goes (µs per block), on fresh conversations of the full index."""
    ix = router.index
    evs: list[tuple[str, BlockStored]] = []
    while len(evs) < n_events:
        w = random.choice(workers)
        events, _ = conversation(corpus, w)
        evs += [(w.wid, e) for e in events if isinstance(e, BlockStored)]
    n = sum(len(e.block_hashes) for _, e in evs)
    seed = ix.seed(None)
    t0 = time.perf_counter()
    for _, e in evs:
        array("I").fromlist(e.token_ids)  # what the index does with a list off the wire
    t1 = time.perf_counter()
    locals_ = [hash_blocks(e.token_ids, corpus.bs, seed) for _, e in evs]
    t2 = time.perf_counter()
    for (wid, e), lh in zip(evs, locals_):
        ix.store(wid, e.parent_block_hash, lh, e.block_hashes)
    t3 = time.perf_counter()
    for wid, e in reversed(evs):
        ix.remove(wid, e.block_hashes[::-1])
    t4 = time.perf_counter()
    for wid, e in evs:
        router.apply_kv_events(wid, [e])
    t5 = time.perf_counter()
    for wid, e in reversed(evs):
        ix.remove(wid, e.block_hashes[::-1])
    us = 1e6 / n
    return {"u32": (t1 - t0) * us, "xxh3": (t2 - t1 - (t1 - t0)) * us, "tree": (t3 - t2) * us,
            "remove": (t4 - t3) * us, "total": (t5 - t4) * us}


# ---- report -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--blocks-per-worker", type=int, default=16384)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--churn-blocks", type=int, default=400_000, help="stored + removed blocks per churn row")
    p.add_argument("--rate", type=float, default=2000.0,
                   help="requests/s routed while the applier thread applies events (the threaded rows)")
    p.add_argument("--slice-ms", type=float, default=DEFAULT_SLICE_S * 1e3,
                   help="the applier thread's longest hold of the index lock and the GIL")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    p.add_argument("--no-results", action="store_true")
    p.add_argument("--note", action="append", default=[], help="a line added to the RESULTS.md entry")
    a = p.parse_args(argv)
    if min(a.workers, a.blocks_per_worker, a.block_size, a.requests, a.churn_blocks) < 1:
        p.error("all sizes must be >= 1")
    if a.rate <= 0 or a.slice_ms <= 0:
        p.error("--rate and --slice-ms must be positive")
    load_before = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    py_s = python_speed()

    rng = random.Random(a.seed)
    random.seed(a.seed)
    corpus = Corpus(rng, a.block_size)
    workers = [Worker(f"worker-{i:03d}") for i in range(a.workers)]
    router = Router("kv", block_size=a.block_size, seed=a.seed)
    print(f"building the index: {a.workers} workers x ~{a.blocks_per_worker} blocks ...", flush=True)
    convs, build_s, built = build(router, corpus, workers, a.blocks_per_worker)
    ix = router.index
    size = f"{ix.num_blocks:,} (worker, block) pairs, {ix.num_nodes:,} distinct prefixes"
    rss = rss_mb()
    print(f"  {size}, RSS {rss:,.0f} MB", flush=True)

    dec = decisions(router, corpus, convs, a.requests, rng)
    parts = decision_breakdown(router, corpus, convs, min(a.requests, 5000), rng)
    stream = churn_stream(corpus, workers, convs, rng)
    mix = churn(router, stream, a.churn_blocks)
    mix_dec = churn(router, stream, a.churn_blocks // 2, "decode+apply")
    mix_bytes = churn(router, stream, a.churn_blocks // 4, "decode-bytes")
    mix_loc = churn(router, stream, a.churn_blocks, local_hashes=True)
    mix_loc_dec = churn(router, stream, a.churn_blocks // 2, "decode+apply", local_hashes=True)
    slice_s = a.slice_ms / 1e3
    print("the threaded path ...", flush=True)
    thr_alone = threaded(router, stream, a.churn_blocks // 2, slice_s)
    idle = PacedRouting(router, corpus, convs, rng)
    idle.run_idle(min(a.requests, 4000), a.rate)
    idle.close()
    busy = PacedRouting(router, corpus, convs, rng)
    thr_busy = threaded(router, stream, a.churn_blocks, slice_s, route=busy, rate=a.rate)
    busy.close()
    pi, pb = idle.summary(), busy.summary()
    # last: its conversations leave workers' document tails that it then evicts
    runs = [store_breakdown(router, corpus, workers, 1000) for _ in range(5)]
    prof = {k: min(r[k] for r in runs) for k in runs[0]}  # least disturbed by other processes
    ix.check_integrity()

    def ok(good: bool) -> str:
        return "met" if good else "MISSED"

    build_rate = built / build_s
    rows = [
        ("routing decision p50 / p90 / p99 / max (µs)",
         f"{dec['p50']:.1f} / {dec['p90']:.1f} / {dec['p99']:.1f} / {dec['max']:.0f}",
         f"p99 < {TARGET_P99_US:.0f}: {ok(dec['p99'] < TARGET_P99_US)}"),
        ("  index lookup: hashing + walk, p50 / p99 (µs)", f"{parts['lookup'][0]:.1f} / {parts['lookup'][1]:.1f}", ""),
        (f"  selection over {a.workers} candidates, p50 / p99 (µs)",
         f"{parts['select'][0]:.1f} / {parts['select'][1]:.1f}", ""),
        ("  (hashing every full block alone, p50 / p99 (µs))", f"{parts['hash'][0]:.1f} / {parts['hash'][1]:.1f}", ""),
        ("requests with a predicted prefix hit", f"{dec['hit_frac']:.0%}", ""),
        ("block events/s on the full index, Turbine's engines' events (local hashes carried): "
         "store / remove / mixed",
         f"{mix_loc['store']:,.0f} / {mix_loc['remove']:,.0f} / {mix_loc['mixed']:,.0f}",
         f"mixed >= 1M: {ok(mix_loc['mixed'] >= TARGET_BLOCKS_PER_S)}"),
        ("  with msgpack decoding: store / remove / mixed",
         f"{mix_loc_dec['store']:,.0f} / {mix_loc_dec['remove']:,.0f} / {mix_loc_dec['mixed']:,.0f}", ""),
        ("block events/s on the full index, vLLM's events (the router hashes the tokens): store / remove / mixed",
         f"{mix['store']:,.0f} / {mix['remove']:,.0f} / {mix['mixed']:,.0f}",
         f"mixed >= 1M: {ok(mix['mixed'] >= TARGET_BLOCKS_PER_S)}"),
        ("  with msgpack decoding: store / remove / mixed",
         f"{mix_dec['store']:,.0f} / {mix_dec['remove']:,.0f} / {mix_dec['mixed']:,.0f}", ""),
        ("  decoding alone, 32-byte block hashes (slow path)", f"{mix_bytes['mixed']:,.0f}", ""),
        ("block events/s while building the index (stores only)", f"{build_rate:,.0f}", ""),
        ("µs per stored block (best of 5): u32 pack / xxh3 / index / whole apply",
         f"{prof['u32']:.2f} / {prof['xxh3']:.2f} / {prof['tree']:.2f} / {prof['total']:.2f}", ""),
        ("µs per removed block (best of 5)", f"{prof['remove']:.2f}", ""),
        (f"block events/s through the applier thread (decode + apply): alone / while routing {a.rate:,.0f} req/s",
         f"{thr_alone:,.0f} / {thr_busy:,.0f}", ""),
        (f"routing {a.rate:,.0f} req/s, applier idle: decision p50 / p99 / max (µs)",
         f"{pi['p50']:.1f} / {pi['p99']:.1f} / {pi['max']:.0f}", ""),
        (f"routing {a.rate:,.0f} req/s while the applier applies: decision p50 / p99 / max (µs)",
         f"{pb['p50']:.1f} / {pb['p99']:.1f} / {pb['max']:.0f}",
         f"p99 < {TARGET_P99_US:.0f}: {ok(pb['p99'] < TARGET_P99_US)}"),
        ("  the router's thread late after its sleep, applier idle / applying, p50 / p99 (µs)",
         f"{pi['late50']:.0f} / {pi['late99']:.0f} vs {pb['late50']:.0f} / {pb['late99']:.0f}", ""),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    table = [f"| {'measure':<{w0}} | {'value':>{w1}} | target |", f"|{'-' * (w0 + 2)}|{'-' * (w1 + 1)}:|--------|"]
    table += [f"| {r[0]:<{w0}} | {r[1]:>{w1}} | {r[2]} |" for r in rows]
    text = "\n".join(table)
    print(text)

    notes = [
        f"index: {a.workers} workers, {size}, block size {a.block_size}; RSS {rss:,.0f} MB "
        f"(after the churn rows: {ix.num_blocks:,} pairs)",
        f"requests: {a.requests:,} routed after 500 warm-up, 16-64 blocks + a partial tail, ~256 in flight, "
        f"all {a.workers} workers candidates; GC on ({dec['gen2']} full collections during the run)",
        f"events: BlockStored of {EVENT_BLOCKS} blocks x {a.block_size} tokens, BlockRemoved of "
        f"{EVENT_BLOCKS} blocks evicting old conversations leaves first; ~{a.churn_blocks:,} blocks per row",
        f"threaded path: the churn's batches as msgpack, queued, then KvEventApplier started (slices of "
        f"{a.slice_ms:g} ms under the index lock, a sleep(0) between them); routing at {a.rate:,.0f} req/s "
        f"meanwhile ({pb['n']:,} decisions), against {pi['n']:,} at that rate with the applier idle; "
        "'late': how long after its sleep's deadline the routing thread ran again (timer slack, plus its "
        "wait for the GIL while the applier held it)",
        f"this machine: a 10M-iteration Python loop in {py_s:.2f} s; load average {load_before} at the start",
        *a.note,
    ]
    if dec["p99"] >= TARGET_P99_US:
        notes.append(
            f"decision p99 missed: a long prompt matched deep by many workers costs hashing (~"
            f"{prof['u32'] + prof['xxh3']:.2f} µs a block) plus a walk step per block plus selection; on a "
            "shared 2-core machine other processes' CPU also lands in the tail")
    if min(mix["store"], mix["mixed"]) < TARGET_BLOCKS_PER_S:
        notes.append(
            f"events: vLLM's stores run at {mix['store']:,.0f} blocks/s, below 1M. Per stored block: packing its "
            f"{a.block_size} token ids to u32 ({prof['u32']:.2f} µs, `array.fromlist`), xxh3 ({prof['xxh3']:.2f} µs), "
            f"index updates ({prof['tree']:.2f} µs: a path-id hash, one probe of the worker's map and one of "
            "the tree's ~1M-entry dict, mostly cache and TLB misses), the rest dispatch and counters. "
            f"Removals need no hashing ({prof['remove']:.2f} µs: a probe of each map). Pure Python packs "
            "and hashes no faster: Turbine's engines send the local hashes they computed anyway, which "
            "leaves the index updates (the first event row)")
    if not a.no_results:
        path = Path(a.results)
        header = "" if path.exists() else (
            "# Benchmark results\n\nAppended by the scripts in `bench/` (see bench/README.md); "
            "newest last. Never edit old entries.\n")
        when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        section = "\n".join([
            header, f"## router_bench — {when}", "",
            f"- machine: {machine(load_average=True)}",
            *[f"- {n}" for n in notes], "",
            text, "", ""])
        with open(path, "a") as f:  # one write: another script may be appending too
            f.write(section)
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
