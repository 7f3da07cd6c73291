"""Paged KV blocks with prefix caching: ref counts, a free list and LRU eviction.

Every block is in exactly one of three states:

    free          ref 0, holds no hash     -> ``_free`` (recycled ids) or never used yet
    evictable     ref 0, holds a hash      -> ``_evictable`` (LRU order: oldest first)
    referenced    ref > 0, hash optional   -> in the block_table of ``ref`` sequences

    allocate: free ──▶ referenced            (free list empty: evict the LRU evictable block)
    free seq: referenced ──▶ evictable (hash) | free (no hash)
    prefix hit: evictable ──▶ referenced      (its KV is reused, not recomputed)

Prefix caching keys a block by the chained sequence hash of its tokens
(``turbine.router.hashing``), so two requests sharing a prefix share its blocks. Only full,
computed blocks are registered; the manager queues vLLM-layout KV events (BlockStored,
BlockRemoved, AllBlocksCleared) that the caller drains with ``take_events()`` and numbers.
"""
from __future__ import annotations

from array import array
from collections import OrderedDict, deque
from collections.abc import Callable
from functools import partial
from itertools import islice
from typing import NamedTuple

from turbine.engine.sequence import Sequence
from turbine.protocols.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from turbine.router.hashing import SequenceHash


class IntegrityError(RuntimeError):
    """The block manager's bookkeeping is inconsistent (a bug, never a user error)."""


class _Cached(NamedTuple):
    """What a registered block holds, kept to rebuild BlockStored events for a resync."""

    seq_hash: SequenceHash
    parent_hash: SequenceHash | None
    token_ids: array  # u32, compact: cached blocks outlive their sequences
    position: int  # block index within its chain (parents sort first)


_new_cached = partial(tuple.__new__, _Cached)  # _Cached from a tuple, without the Python-level __new__


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
        self._free: deque[int] = deque()  # recycled ids; ids >= _next_fresh were never used
        self._next_fresh = 0
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[int, _Cached] = {}  # block id -> registered contents
        self._hash_to_block: dict[int, int] = {}
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
        return len(self._cached)

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
            hits = [self._hash_to_block[h] for h in seq.block_hashes(bs)[:k]]
        except KeyError:
            raise ValueError(f"stale prefix match for {seq.request_id!r}: call match_prefix again") from None
        if len(hits) != k:
            raise ValueError(f"sequence {seq.request_id!r} has fewer than {k} full blocks")
        ref = self._ref
        revived = sum(1 for b in hits if ref[b] == 0)  # evictable now, referenced after
        need = -(-total // bs) - k
        if need > self.num_free_blocks - revived:
            return False
        self._claim_owner(seq)
        for b in hits:
            if ref[b] == 0:
                del self._evictable[b]
            ref[b] += 1
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
        h2b, cached = self._hash_to_block, self._cached
        packed = seq.hashed_tokens_u32()
        new = hashes[start:n_full]
        if len(new) > 1 and h2b.keys().isdisjoint(new) and len(set(new)) == len(new):
            # no block computed twice (the common case): the loop below, in bulk
            blocks = table[start:n_full]
            parent = hashes[start - 1] if start else None
            offsets = range(start * bs, n_full * bs, bs)
            contents = map(packed.__getitem__, map(slice, offsets, range((start + 1) * bs, (n_full + 1) * bs, bs)))
            cached.update(zip(blocks, map(_new_cached, zip(new, [parent, *new[:-1]], contents, range(start, n_full)))))
            h2b.update(zip(new, blocks))
            self._events.append(BlockStored(new, parent, tokens[start * bs : n_full * bs], bs))
            return
        run: list[SequenceHash] = []  # a chain of new blocks: one BlockStored event
        run_start = start
        run_parent = hashes[start - 1] if start else None
        for i in range(start, n_full):
            h = hashes[i]
            if h in h2b:  # duplicate computation: another block already holds this prefix
                if run:
                    self._events.append(BlockStored(run, run_parent, tokens[run_start * bs : i * bs], bs))
                    run = []
                run_parent = h
                run_start = i + 1
                continue
            b = table[i]
            cached[b] = _Cached(h, hashes[i - 1] if i else None, packed[i * bs : (i + 1) * bs], i)
            h2b[h] = b
            run.append(h)
        if run:
            self._events.append(BlockStored(run, run_parent, tokens[run_start * bs : n_full * bs], bs))

    def free(self, seq: Sequence) -> None:
        """Release every block of ``seq`` (idempotent). Cached blocks stay reusable until evicted.

        Blocks go back tail first, so eviction takes a chain's leaves before its prefix.
        """
        if self._owners.get(seq.request_id) is seq:
            del self._owners[seq.request_id]
        ref = self._ref
        for b in reversed(seq.block_table):
            r = ref[b] - 1
            ref[b] = r
            if r == 0:
                if b in self._cached:
                    self._evictable[b] = None
                else:
                    self._free.append(b)
        seq.block_table = []
        seq.num_registered_blocks = 0

    def evict(self, num_blocks: int) -> int:
        """Drop up to ``num_blocks`` least recently used unreferenced cached blocks."""
        n = min(num_blocks, len(self._evictable))
        if n <= 0:
            return 0
        evictable = self._evictable
        blocks = list(islice(evictable, n))  # the n least recently used
        for b in blocks:
            del evictable[b]
        infos = list(map(self._cached.pop, blocks))
        removed: list[SequenceHash] = [info.seq_hash for info in infos]
        h2b = self._hash_to_block
        for h in removed:
            del h2b[h]
        self._free.extend(blocks)
        on_evict = self.on_evict
        if on_evict is not None:
            for b, info in zip(blocks, infos):
                on_evict(b, info)
        self._events.append(BlockRemoved(removed))
        return n

    def clear(self) -> None:
        """Forget the whole prefix cache; sequences keep their blocks, now unregistered."""
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._cached.clear()
        self._hash_to_block.clear()
        self._events.append(AllBlocksCleared())

    def stored_blocks_snapshot(self) -> list[BlockStored]:
        """BlockStored events (parents first) that rebuild the current cache on a fresh router."""
        infos = sorted(self._cached.values(), key=lambda c: c.position)
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
        fresh = min(n - len(self._free), self.num_blocks - self._next_fresh)
        if fresh > 0:
            start = self._next_fresh
            self._next_fresh = start + fresh
            out = list(range(start, start + fresh))
        else:
            out = []
        short = n - len(out) - len(self._free)
        if short > 0:
            self.evict(short)
        free = self._free
        while len(out) < n:
            out.append(free.pop())
        ref = self._ref
        for b in out:
            ref[b] = 1
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
        for b in range(n):
            ref = self._ref[b]
            states = (b in free) + (b in self._evictable) + (ref > 0) + (b >= self._next_fresh)
            if states != 1:
                fail(f"block {b} is in {states} states (ref={ref})")
            if ref != holders[b]:
                fail(f"block {b} has ref {ref} but {holders[b]} sequences hold it")
            if (b in free or b >= self._next_fresh) and b in self._cached:
                fail(f"free block {b} holds a hash")
            if b in self._evictable and b not in self._cached:
                fail(f"evictable block {b} holds no hash")
        if len(self._cached) != len(self._hash_to_block):
            fail("hash map and block contents differ in size")
        for h, b in self._hash_to_block.items():
            info = self._cached.get(b)
            if info is None or info.seq_hash != h:
                fail(f"hash {h:#x} maps to block {b}, which does not hold it")
            if len(info.token_ids) != self.block_size:
                fail(f"cached block {b} holds {len(info.token_ids)} tokens")
        if not self.enable_prefix_caching and (self._cached or self._evictable):
            fail("prefix caching is off but blocks are cached")
