"""Paged KV blocks with prefix caching: ref counts, a free list and LRU eviction.

Every block is in exactly one of three states:

    free          ref 0, holds no hash     -> ``_free`` (recycled ids) or never used yet
    evictable     ref 0, holds a hash      -> ``_evictable`` (LRU order: oldest first)
    referenced    ref > 0, hash optional   -> in the block_table of ``ref`` sequences

    allocate: free ──▶ referenced            (free list empty: evict the LRU evictable block)
    free seq: referenced ──▶ evictable (hash) | free (no hash)
    prefix hit: evictable ──▶ referenced      (its KV is reused, not recomputed)

Prefix caching keys a block by the chained sequence hash of its tokens
(``turbine.protocols.block_hashing``), so two requests sharing a prefix share its blocks. Only full,
computed blocks are registered; the manager queues vLLM-layout KV events (BlockStored,
BlockRemoved, AllBlocksCleared) that the caller drains with ``take_events()`` and numbers.

What a registered block holds (its hash, parent, position and tokens) lives in flat arrays
indexed by block id (``_Registry``), not in an object per block: registering a run of blocks is
a few slice copies, and the cyclic GC has nothing to walk.
"""
from __future__ import annotations

from array import array
from collections import OrderedDict, deque
from collections.abc import Callable
from functools import partial
from itertools import compress, islice, repeat
from operator import add, ne, not_, sub
from typing import Any, NamedTuple

from turbine.engine.sequence import Sequence
from turbine.protocols.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from turbine.protocols.block_hashing import SequenceHash


_consume = partial(deque, maxlen=0)  # runs an iterator (a map of calls) to its end at C speed
_ONES = b"\x01" * 1024


class IntegrityError(RuntimeError):
    """The block manager's bookkeeping is inconsistent (a bug, never a user error)."""


class _Registry:
    """What each registered block holds, in arrays indexed by block id (no object per block):

        on[b]       1: b holds a hash (registered), 0: it does not (the other fields are stale)
        pos[b]      its index within its chain (parents sort first)
        hash[b]     its sequence hash (u64)          parent[b]   its parent's (when pos[b] > 0)
        tokens      its token ids (u32) at bytes [b * stride, (b + 1) * stride)

    Written when blocks are registered (a run of consecutive block ids in one slice each), read
    for a resync or a lower tier. The arrays grow with the highest block id handed out, so an idle
    manager holds next to nothing."""

    __slots__ = ("hash", "on", "parent", "pos", "stride", "tokens")

    def __init__(self, block_size: int) -> None:
        self.on = bytearray()
        self.pos = array("q")
        self.hash = array("Q")
        self.parent = array("Q")
        self.tokens = bytearray()
        self.stride = 4 * block_size

    def grow(self, num_blocks: int) -> None:
        k = num_blocks - len(self.on)
        if k > 0:
            self.on += bytes(k)
            zeros = bytes(8 * k)
            self.pos.frombytes(zeros)
            self.hash.frombytes(zeros)
            self.parent.frombytes(zeros)
            self.tokens += bytes(k * self.stride)

    def store(self, blocks: list[int], hashes: list[SequenceHash], parent: SequenceHash | None, first: int,
              src: array) -> None:
        """Block ``blocks[i]`` holds block ``first + i`` of the u32 tokens ``src``, hash ``hashes[i]``,
        chained below ``parent`` (the previous block's hash, None for the first of a chain)."""
        n = len(blocks)
        s = self.stride
        on, pos, hash_, par, tokens = self.on, self.pos, self.hash, self.parent, self.tokens
        b = blocks[0]
        with memoryview(src) as m, m.cast("B") as raw:
            if blocks[-1] - b == n - 1 and (n < 3 or blocks == list(range(b, b + n))):  # the common case
                on[b : b + n] = _ONES[:n] if n <= len(_ONES) else b"\x01" * n
                pos[b : b + n] = array("q", range(first, first + n))
                hash_[b : b + n] = array("Q", hashes)
                par[b : b + n] = array("Q", [0 if parent is None else parent, *hashes[:-1]])
                tokens[b * s : (b + n) * s] = raw[first * s : (first + n) * s]
                return
            # runs of consecutive block ids, one slice each
            breaks = list(compress(range(1, n), map(ne, map(sub, blocks[1:], blocks), repeat(1))))
            all_pos = array("q", range(first, first + n))
            all_hash = array("Q", hashes)
            all_par = array("Q", [0 if parent is None else parent, *hashes[:-1]])
            for i, j in zip([0, *breaks], [*breaks, n]):
                b = blocks[i]
                e = b + j - i
                on[b:e] = _ONES[: j - i] if j - i <= len(_ONES) else b"\x01" * (j - i)
                pos[b:e] = all_pos[i:j]
                hash_[b:e] = all_hash[i:j]
                par[b:e] = all_par[i:j]
                tokens[b * s : e * s] = raw[(first + i) * s : (first + j) * s]

    def info(self, block: int, copy: bool = False) -> _Cached:
        """Block ``block``'s registration (a registered block); ``copy``: with its tokens copied,
        to outlive the block's reuse."""
        p = self.pos[block]
        return _Cached(self.hash[block], self.parent[block] if p else None, p, block,
                       self.token_ids(block) if copy else self)

    def token_ids(self, block: int) -> array:
        s = self.stride
        return array("I", self.tokens[block * s : (block + 1) * s])


class _Cached(NamedTuple):
    """What a registered block holds (rebuilds BlockStored events for a resync or a lower tier)."""

    seq_hash: SequenceHash
    parent_hash: SequenceHash | None
    position: int  # block index within its chain (parents sort first)
    block: int  # the block holding it
    contents: Any  # the manager's _Registry (read at ``block``), or a copy of the tokens (u32 array)

    @property
    def token_ids(self) -> array:
        """Its token ids, u32 (a copy)."""
        c = self.contents
        return array("I", c) if type(c) is array else c.token_ids(self.block)


class KVBlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 on_evict: Callable[[int, _Cached], None] | None = None) -> None:
        """``on_evict(block, contents)``: called before an evicted cached block is reused (the
        lower KV tiers keep a copy: turbine/kvbm)."""
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = array("i", bytes(4 * num_blocks))
        self._free: list[int] = []  # recycled ids, taken from the end; ids >= _next_fresh were never used
        self._next_fresh = 0
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._reg = _Registry(block_size)  # registered blocks: hash, parent, position, tokens
        self._hash_to_block: dict[int, int] = {}  # every registered block, by its hash
        self._owners: dict[str, Sequence] = {}  # sequences holding blocks, by request id
        self._events: list[KVEvent] = []
        self.on_evict = on_evict

    # -- accounting -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: free ones plus cached-but-unreferenced ones."""
        return len(self._free) + (self.num_blocks - self._next_fresh) + len(self._evictable)

    @property
    def num_active_blocks(self) -> int:
        """Blocks referenced by at least one sequence (cached-but-unreferenced are not)."""
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, referenced or not."""
        return len(self._hash_to_block)

    @property
    def _cached(self) -> dict[int, _Cached]:
        """Block id -> what it holds, for every registered block (built on demand: checks, tests)."""
        info = self._reg.info
        return {b: info(b) for b in self._hash_to_block.values()}

    @property
    def usage(self) -> float:
        return self.num_active_blocks / self.num_blocks

    def emit(self, event: KVEvent) -> None:
        """Queue an event of a lower tier (turbine/kvbm), in order with this cache's own."""
        self._events.append(event)

    def take_events(self) -> list[KVEvent]:
        """Drain the KV events queued since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    # -- admission ----------------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> int:
        """Tokens of ``seq`` already cached (whole blocks); no side effects.

        At least the last token is always left to compute, so the step has logits to sample.
        """
        if not self.enable_prefix_caching:
            return 0
        if seq.block_table:
            raise ValueError(f"sequence {seq.request_id!r} already holds blocks")
        hashes = seq.block_hashes(self.block_size)
        limit = min(len(hashes), (seq.num_tokens - 1) // self.block_size)
        h2b = self._hash_to_block
        n = 0
        while n < limit and hashes[n] in h2b:
            n += 1
        return n * self.block_size

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, num_cached_tokens: int = 0) -> bool:
        """Make ``seq.block_table`` cover ``num_computed_tokens + num_cached_tokens + num_new_tokens``.

        ``num_cached_tokens`` is ``match_prefix(seq)``'s answer at admission: those blocks are
        referenced instead of allocated. All or nothing: False (and no change) when the free and
        evictable blocks cannot cover the request.
        """
        bs = self.block_size
        table = seq.block_table
        total = seq.num_computed_tokens + num_cached_tokens + num_new_tokens
        if not num_cached_tokens:
            need = -(-total // bs) - len(table)
            if need <= 0:
                return True
            if need > self.num_free_blocks:
                return False
            if not table:
                self._claim_owner(seq)
            table.extend(self._take_blocks(need))
            return True

        if table or seq.num_computed_tokens or num_cached_tokens % bs:
            raise ValueError("a cached prefix is whole blocks, matched before any allocation")
        k = num_cached_tokens // bs
        try:
            hits = list(map(self._hash_to_block.__getitem__, seq.block_hashes(bs)[:k]))
        except KeyError:
            raise ValueError(f"stale prefix match for {seq.request_id!r}: call match_prefix again") from None
        if len(hits) != k:
            raise ValueError(f"sequence {seq.request_id!r} has fewer than {k} full blocks")
        ref = self._ref
        refs = list(map(ref.__getitem__, hits))
        revived = refs.count(0)  # evictable now, referenced after
        need = -(-total // bs) - k
        if need > self.num_free_blocks - revived:
            return False
        self._claim_owner(seq)
        if revived:
            _consume(map(self._evictable.__delitem__, compress(hits, map(not_, refs))))
        _consume(map(ref.__setitem__, hits, map(add, refs, repeat(1))))  # distinct blocks: one each
        table.extend(hits)
        seq.num_registered_blocks = k
        if need > 0:
            table.extend(self._take_blocks(need))
        return True

    # -- after a step ---------------------------------------------------------------------------
    def register_full_blocks(self, seq: Sequence) -> None:
        """Offer the blocks that ``seq.num_computed_tokens`` filled to the prefix cache.

        A block whose hash another block already holds (the same prefix computed twice) stays
        unregistered and returns to the free list when its sequence frees it.
        """
        bs = self.block_size
        table = seq.block_table
        n_full = min(seq.num_computed_tokens // bs, len(table))
        start = seq.num_registered_blocks
        if n_full <= start:
            return
        if not self.enable_prefix_caching:
            seq.num_registered_blocks = n_full
            return
        hashes = seq.block_hashes(bs)
        n_full = min(n_full, len(hashes))  # a block holding an unread (placeholder) token waits
        if n_full <= start:
            return
        seq.num_registered_blocks = n_full
        tokens = seq.token_ids
        h2b, reg = self._hash_to_block, self._reg
        packed = seq.hashed_tokens_u32()
        new = hashes[start:n_full]
        if h2b.keys().isdisjoint(new) and (len(new) == 1 or len(set(new)) == len(new)):
            # no block computed twice (the common case): the loop below, in bulk
            blocks = table[start:n_full]
            parent = hashes[start - 1] if start else None
            reg.store(blocks, new, parent, start, packed)
            h2b.update(zip(new, blocks))
            self._events.append(BlockStored(new, parent, tokens[start * bs : n_full * bs], bs,
                                            local_hashes=seq.local_hashes(start, n_full)))
            return
        run: list[SequenceHash] = []  # a chain of new blocks: one BlockStored event
        run_start = start
        run_parent = hashes[start - 1] if start else None
        for i in range(start, n_full):
            h = hashes[i]
            if h in h2b:  # duplicate computation: another block already holds this prefix
                if run:
                    self._events.append(BlockStored(run, run_parent, tokens[run_start * bs : i * bs], bs,
                                                    local_hashes=seq.local_hashes(run_start, i)))
                    run = []
                run_parent = h
                run_start = i + 1
                continue
            b = table[i]
            reg.store([b], [h], hashes[i - 1] if i else None, i, packed)
            h2b[h] = b
            run.append(h)
        if run:
            self._events.append(BlockStored(run, run_parent, tokens[run_start * bs : n_full * bs], bs,
                                            local_hashes=seq.local_hashes(run_start, n_full)))

    def free(self, seq: Sequence) -> None:
        """Release every block of ``seq`` (idempotent). Cached blocks stay reusable until evicted.

        Blocks go back tail first, so eviction takes a chain's leaves before its prefix.
        """
        if self._owners.get(seq.request_id) is seq:
            del self._owners[seq.request_id]
        ref, on, evictable, free = self._ref, self._reg.on, self._evictable, self._free
        back = seq.block_table[::-1]
        refs = list(map(ref.__getitem__, back))
        if refs.count(1) == len(refs):  # held by this sequence alone (the common case): the loop below, in bulk
            _consume(map(ref.__setitem__, back, repeat(0)))
            registered = bytes(map(on.__getitem__, back))
            n_reg = registered.count(1)
            if n_reg == len(back):
                evictable.update(dict.fromkeys(back))
            elif not n_reg:
                free += back
            else:  # each list in its own order, as the loop would
                evictable.update(dict.fromkeys(compress(back, registered)))
                free += compress(back, map(not_, registered))
        else:
            for b in back:
                r = ref[b] - 1
                ref[b] = r
                if r == 0:
                    if on[b]:  # registered: stays cached until evicted
                        evictable[b] = None
                    else:
                        free.append(b)
        seq.block_table = []
        seq.num_registered_blocks = 0

    def evict(self, num_blocks: int) -> int:
        """Drop up to ``num_blocks`` least recently used unreferenced cached blocks."""
        n = min(num_blocks, len(self._evictable))
        if n <= 0:
            return 0
        evictable = self._evictable
        blocks = list(islice(evictable, n))  # the n least recently used
        _consume(map(evictable.__delitem__, blocks))
        reg = self._reg
        removed: list[SequenceHash] = list(map(reg.hash.__getitem__, blocks))
        on_evict = self.on_evict
        if on_evict is not None:  # with a copy of the tokens: the block is about to be reused
            infos = [reg.info(b, copy=True) for b in blocks]
        _consume(map(self._hash_to_block.__delitem__, removed))
        _consume(map(reg.on.__setitem__, blocks, repeat(0)))
        self._free.extend(blocks)
        if on_evict is not None:
            for b, info in zip(blocks, infos):
                on_evict(b, info)
        self._events.append(BlockRemoved(removed))
        return n

    def clear(self) -> None:
        """Forget the whole prefix cache; sequences keep their blocks, now unregistered."""
        self._free.extend(self._evictable)
        self._evictable.clear()
        on = self._reg.on
        for b in self._hash_to_block.values():
            on[b] = 0
        self._hash_to_block.clear()
        self._events.append(AllBlocksCleared())

    def stored_blocks_snapshot(self) -> list[BlockStored]:
        """BlockStored events (parents first) that rebuild the current cache on a fresh router."""
        infos = sorted(self._cached.values(), key=lambda c: c.position)  # parents first
        return [
            BlockStored([c.seq_hash], c.parent_hash, c.token_ids.tolist(), self.block_size)
            for c in infos
        ]

    # -- internals ----------------------------------------------------------------------------
    def _claim_owner(self, seq: Sequence) -> None:
        owner = self._owners.setdefault(seq.request_id, seq)
        if owner is not seq:
            raise ValueError(f"another sequence with request id {seq.request_id!r} holds blocks")

    def _take_blocks(self, n: int) -> list[int]:
        """``n`` blocks at ref 1; the caller checked ``n <= num_free_blocks``."""
        free = self._free
        fresh = min(n - len(free), self.num_blocks - self._next_fresh)
        if fresh > 0:
            start = self._next_fresh
            self._next_fresh = start + fresh
            out = list(range(start, start + fresh))
            self._reg.grow(start + fresh)
        else:
            out = []
        short = n - len(out) - len(free)
        if short > 0:
            self.evict(short)
        k = n - len(out)
        if k > 0:  # from the end of the free list, last first (as pop() would)
            tail = free[-k:]
            del free[-k:]
            tail.reverse()
            out += tail
        _consume(map(self._ref.__setitem__, out, repeat(1)))
        return out

    # -- checking -------------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise IntegrityError unless every invariant in the module docstring holds."""

        def fail(msg: str) -> None:
            raise IntegrityError(msg)

        n = self.num_blocks
        free = set(self._free)
        if len(free) != len(self._free):
            fail("a block is twice in the free list")
        holders = [0] * n
        for rid, seq in self._owners.items():
            if seq.request_id != rid or not seq.block_table:
                fail(f"owner entry {rid!r} holds no blocks")
            if len(set(seq.block_table)) != len(seq.block_table):
                fail(f"sequence {rid!r} holds a block twice")
            if seq.num_registered_blocks > len(seq.block_table):
                fail(f"sequence {rid!r} registered more blocks than it holds")
            for b in seq.block_table:
                if not 0 <= b < self._next_fresh:
                    fail(f"sequence {rid!r} holds block {b}, never allocated")
                holders[b] += 1
        reg = self._reg
        if not len(reg.on) == len(reg.pos) == len(reg.hash) == len(reg.parent) == len(reg.tokens) // reg.stride <= n:
            fail("the registry's arrays differ in size")
        registered = {b for b, f in enumerate(reg.on) if f}
        for b in range(n):
            ref = self._ref[b]
            states = (b in free) + (b in self._evictable) + (ref > 0) + (b >= self._next_fresh)
            if states != 1:
                fail(f"block {b} is in {states} states (ref={ref})")
            if ref != holders[b]:
                fail(f"block {b} has ref {ref} but {holders[b]} sequences hold it")
            if (b in free or b >= self._next_fresh) and b in registered:
                fail(f"free block {b} holds a hash")
            if b in self._evictable and b not in registered:
                fail(f"evictable block {b} holds no hash")
        if len(registered) != len(self._hash_to_block):
            fail("hash map and registered blocks differ in size")
        for h, b in self._hash_to_block.items():
            if b not in registered or reg.hash[b] != h:
                fail(f"hash {h:#x} maps to block {b}, which does not hold it")
        if not self.enable_prefix_caching and (registered or self._evictable):
            fail("prefix caching is off but blocks are cached")
