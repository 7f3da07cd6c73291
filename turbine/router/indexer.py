"""The KV indexer: which worker holds which prefix of KV blocks, fed by KV events.

A prefix tree keyed by *local* block hash (the router computes those from a prompt) whose
edges are implicit: a node is named by its *path id*, ``hash((parent_path_id, local_hash))``
with the root at 0, so a child is found by hashing, never by following a pointer. The whole tree
is then one int -> int dict from path id to the workers holding that prefix's last block:

    root 0 ──L0──▶ p1 = H(0, L0) ──L1──▶ p2 = H(p1, L1) ──L2──▶ ...
    _mask[p]     bitmask of the workers holding the block at p (bit = the worker's slot), > 0

No per-node objects (nothing for the cyclic GC to walk, ~100 bytes a node), no parent links or
child lists to maintain: a node nobody holds is simply deleted, and its descendants stay valid,
because their ids depend on the path's contents, not on the parent's entry.

Workers name blocks by their engine's *sequence* hash, so each worker also has a map
``sequence hash -> path id`` (``_blocks[w]``): a BlockStored finds its parent node there, a
BlockRemoved finds the nodes to release. Path ids are CPython tuple hashes of ints: stable
across processes (int hashing is not randomised) but internal, never on any wire.

A worker matches a prompt to depth d when it holds every one of the prompt's first d blocks.

KV tiers: an event's ``medium`` (vLLM's field: None/"GPU", "CPU", "DISK") says which tier of
the worker holds the block. The tree holds the union (a block in any tier is held); only nodes
not in GPU memory get an entry in ``_tiers[w]`` (path id -> tier bits: 1 GPU, 2 CPU, 4 DISK), so
GPU-only fleets pay nothing. A removal clears one tier's bit; the node goes when none is left.
``lower_tier_blocks`` tells the router how much of a match would be onboarded, not reused.
"""
from __future__ import annotations

import threading
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from itertools import compress, repeat
from operator import and_, is_, or_, xor

import xxhash

from turbine.protocols.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from turbine.protocols.block_hashing import HASH_SEED, LocalBlockHash, lora_seed

ROOT = 0
CLEAR_PIECE = 512  # blocks dropped between two ``pace`` calls when clearing a worker
GPU_TIER = 1
TIER_BITS = {None: GPU_TIER, "GPU": GPU_TIER, "gpu": GPU_TIER, "CPU": 2, "cpu": 2, "CPU_PINNED": 2,
             "DISK": 4, "disk": 4}
_SMALL_INTS = frozenset(range(-5, 257))  # CPython's cached ints: the same object wherever made
if array("I").itemsize != 4:  # pragma: no cover - every platform Turbine runs on has 4-byte uint
    raise ImportError("turbine.router.indexer needs a 4-byte array('I')")


class IndexIntegrityError(RuntimeError):
    """The indexer's bookkeeping is inconsistent (a bug, never a user error)."""


def _pack_u32(tokens: Sequence[int]) -> array:
    """``tokens`` as a u32 array: itself if it is one (read, never changed), else a packed copy."""
    try:
        if type(tokens) is array and tokens.typecode == "I":
            return tokens
        if type(tokens) is list:
            arr = array("I")
            arr.fromlist(tokens)  # 1.5x faster than array("I", tokens), which goes item by item
            return arr
        return array("I", tokens)
    except (OverflowError, TypeError):
        raise ValueError("token ids must be ints in [0, 2**32)") from None


def hash_blocks(tokens: Sequence[int], block_size: int, seed: int = HASH_SEED) -> list[LocalBlockHash]:
    """Local hashes of every full block of ``tokens`` in one pass (same values as ``hashing``).

    One u32 conversion of the whole token list, then one xxh3 call per block on a zero-copy
    slice: about 3x faster than hashing block by block.
    """
    step = block_size * 4
    end = (len(tokens) // block_size) * step
    if not end:
        return []
    buf = memoryview(_pack_u32(tokens)).cast("B")
    h = xxhash.xxh3_64_intdigest
    return [h(buf[i : i + step], seed) for i in range(0, end, step)]  # type: ignore[misc]


class KvIndexer:
    """Which workers hold which block prefixes; see the module docstring for the layout."""

    def __init__(self, block_size: int):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        # Held by readers for one query, and by the one thread that changes the index for a
        # slice of its work (the frontend's event applier; see kv_event_applier.py). The
        # methods that change the index never take it themselves.
        self.lock = threading.Lock()
        self._mask: dict[int, int] = {}
        self._blocks: dict[str, dict[int, int]] = {}  # worker -> engine sequence hash -> path id
        # worker -> path id -> extra sequence hashes of that worker naming the same node (rare:
        # the same tokens under different engine hashes, e.g. a cache salt)
        self._dups: dict[str, dict[int, int]] = {}
        self._tiers: dict[str, dict[int, int]] = {}  # worker -> path id -> tier bits, for non-GPU-only nodes
        self._bit: dict[str, int] = {}  # worker -> 1 << slot
        self._slots: list[str | None] = []  # slot -> worker
        self._free_slots: list[int] = []
        self._num_blocks = 0
        self._decoded: dict[int, tuple[str, ...]] = {}  # worker mask -> workers (reset on slot changes)
        self._seeds: dict[str | None, int] = {None: HASH_SEED}
        self._slices: dict[int, list[slice]] = {}  # n -> byte slices of n blocks (n <= 256; both threads read it)
        self.unplaced_events = 0  # BlockStored whose parent this index does not know
        self.unknown_removals = 0  # BlockRemoved hashes this index does not know

    # -- hashing ------------------------------------------------------------------------------
    def seed(self, lora_name: str | None) -> int:
        s = self._seeds.get(lora_name)
        if s is None:
            s = self._seeds[lora_name] = lora_seed(lora_name)
        return s

    def local_hashes(self, tokens: Sequence[int], lora_name: str | None = None) -> list[LocalBlockHash]:
        return hash_blocks(tokens, self.block_size, self.seed(lora_name))

    @staticmethod
    def path_ids(local_hashes: Iterable[int], start: int = ROOT) -> list[int]:
        """The path id of each prefix of ``local_hashes`` (a node's identity in this index),
        below the node ``start`` (the root by default)."""
        out = []
        nid = start
        for lh in local_hashes:
            nid = hash((nid, lh))
            out.append(nid)
        return out

    # -- events -----------------------------------------------------------------------------
    def apply(self, worker_id: str, event: BlockStored | BlockRemoved | AllBlocksCleared) -> bool:
        """Apply one KV event; False when a BlockStored's parent is unknown (resync the worker).

        Raises ValueError for an event that contradicts this index's block size.
        """
        if type(event) is BlockStored:
            return self._stored(worker_id, event)
        if type(event) is BlockRemoved:
            medium = event.medium
            self.remove(worker_id, event.block_hashes, GPU_TIER if medium is None else TIER_BITS.get(medium, GPU_TIER))
            return True
        if type(event) is AllBlocksCleared:
            self.clear_worker(worker_id)
            return True
        raise ValueError(f"not a KV event: {type(event).__name__}")

    def _stored(self, worker_id: str, ev: BlockStored) -> bool:
        """``apply`` of a BlockStored: pack its tokens once, then one loop hashes each block and
        chains its path id (no list of local hashes, no second pass). An event that carries its
        blocks' local hashes (Turbine's engines send them) skips the packing and hashing."""
        hashes = ev.block_hashes
        n = len(hashes)
        bs = self.block_size
        if ev.block_size != bs:
            raise ValueError(f"worker {worker_id!r} stores blocks of {ev.block_size} tokens; "
                             f"this index uses {bs}")
        tokens = ev.token_ids
        if len(tokens) != n * bs:
            raise ValueError(f"worker {worker_id!r}: BlockStored has {n} hashes but "
                             f"{len(tokens)} tokens (block size {bs})")
        locs = ev.local_hashes
        buf = None
        if locs is not None:
            if len(locs) != n:
                raise ValueError(f"worker {worker_id!r}: BlockStored has {n} hashes but {len(locs)} local hashes")
        elif type(tokens) is list:  # off the wire (_pack_u32, inlined)
            arr = array("I")
            try:
                arr.fromlist(tokens)
            except (OverflowError, TypeError):
                raise ValueError("token ids must be ints in [0, 2**32)") from None
            buf = memoryview(arr).cast("B")
        else:
            buf = memoryview(_pack_u32(tokens)).cast("B")  # raises ValueError before anything changes
        blocks = self._blocks.get(worker_id)
        parent = ev.parent_block_hash
        if parent is None:
            nid = ROOT
        else:
            nid = blocks.get(parent) if blocks is not None else None
            if nid is None:
                self.unplaced_events += 1
                return False
        if buf is None:
            cids = self.path_ids(locs, nid)  # type: ignore[arg-type]
        else:
            name = ev.lora_name
            if name is None and ev.lora_id is not None:
                name = f"lora_id:{ev.lora_id}"  # no name: a namespace no request matches
            seed = HASH_SEED if name is None else self.seed(name)
            h = xxhash.xxh3_64_intdigest
            cids = []
            append = cids.append
            slices = self._slices.get(n)
            for sl in slices if slices is not None else self._block_slices(n):
                nid = hash((nid, h(buf[sl], seed)))
                append(nid)
        if blocks is None:
            blocks = self._add_worker(worker_id)
        medium = ev.medium
        self._place(worker_id, blocks, cids, hashes, GPU_TIER if medium is None else TIER_BITS.get(medium, GPU_TIER))
        return True

    def store(self, worker_id: str, parent_hash: int | None, local_hashes: Sequence[int],
              seq_hashes: Sequence[int], tier: int = GPU_TIER) -> bool:
        """Record that ``worker_id`` holds a chain of blocks below its block ``parent_hash``
        (in KV tier ``tier``; the parent may live in any tier).

        Returns False (and stores nothing) when the worker's ``parent_hash`` is unknown here.
        """
        if len(local_hashes) != len(seq_hashes):
            raise ValueError(f"{len(local_hashes)} local hashes for {len(seq_hashes)} block hashes")
        blocks = self._blocks.get(worker_id)
        nid: int | None = ROOT
        if parent_hash is not None:
            nid = blocks.get(parent_hash) if blocks is not None else None
            if nid is None:
                self.unplaced_events += 1
                return False
        if blocks is None:
            blocks = self._add_worker(worker_id)
        self._place(worker_id, blocks, self.path_ids(local_hashes, nid), seq_hashes, tier)  # type: ignore[arg-type]
        return True

    def _place(self, worker_id: str, blocks: dict[int, int], cids: list[int], seq_hashes: Sequence[int],
               tier: int) -> None:
        """The worker holds the nodes ``cids`` (a chain) under its ``seq_hashes``, in ``tier``."""
        bit = self._bit[worker_id]
        tiers = self._tiers.get(worker_id)
        if tiers is None:
            if tier == GPU_TIER:
                if self._place_new(blocks, bit, cids, seq_hashes):
                    return
            else:
                tiers = self._tiers[worker_id] = {}
        mask = self._mask
        setdefault, mget = blocks.setdefault, mask.get
        size = size0 = len(blocks)
        for cid, sh in zip(cids, seq_hashes):
            old = setdefault(sh, cid)  # one dict operation for the common case, a new hash
            if len(blocks) != size:
                size += 1
                old = None
                if tier != GPU_TIER:
                    tiers[cid] = tier  # type: ignore[index]
            elif old == cid:  # already known (a replayed event, or the block in another tier now)
                if tiers is not None:
                    bits = tiers.get(cid, GPU_TIER) | tier
                    if bits == GPU_TIER:
                        tiers.pop(cid, None)
                    else:
                        tiers[cid] = bits
                continue
            m = mget(cid, 0)
            if m & bit:
                self._add_dup(worker_id, cid)
            else:
                mask[cid] = m | bit
            if old is not None:  # the engine reused a hash for other tokens
                blocks[sh] = cid
                self._release(worker_id, bit, old)
                if tiers is not None:
                    tiers.pop(old, None)
                    if tier != GPU_TIER:
                        tiers[cid] = tier
        self._num_blocks += size - size0

    def _place_new(self, blocks: dict[int, int], bit: int, cids: list[int], seq_hashes: Sequence[int]) -> bool:
        """``_place`` for the common case, in bulk: GPU blocks all new to the worker (no hash it
        knows, no node it holds, none twice). False (and nothing done) otherwise.

        One probe of the worker's map per hash (``setdefault`` inserts the new ones; the map's
        size tells whether all were new), one of the tree per node; a chain of nodes nobody
        holds yet (a new conversation) skips the per-node checks, as the tree's size tells
        whether a node came twice. A store that turns out not to be new is undone."""
        mask = self._mask
        ms = list(map(mask.get, cids, repeat(0)))
        n = len(cids)
        fresh = ms.count(0) == n
        if not fresh and (any(map(and_, ms, repeat(bit))) or len(set(cids)) != n):
            return False
        if not _SMALL_INTS.isdisjoint(cids):  # the undo below tells ints made here by identity
            return False
        size0 = len(blocks)
        got = list(map(blocks.setdefault, seq_hashes, cids))
        if len(blocks) != size0 + n:  # a hash it knew, or one twice: take out what went in
            deque(map(blocks.pop, compress(seq_hashes, map(is_, got, cids))), maxlen=0)
            return False
        nodes0 = len(mask)
        if fresh:
            mask.update(zip(cids, repeat(bit)))  # one shared int object for all of them
            if len(mask) != nodes0 + n:  # a path id twice in the chain: undo (they were all new)
                deque(map(mask.pop, cids, repeat(None)), maxlen=0)
                deque(map(blocks.pop, seq_hashes), maxlen=0)
                return False
        else:
            mask.update(zip(cids, map(or_, ms, repeat(bit))))
        self._num_blocks += n
        return True

    def remove(self, worker_id: str, seq_hashes: Iterable[int], tier: int = GPU_TIER) -> int:
        """Release the worker's blocks ``seq_hashes`` from KV tier ``tier``; returns how many it
        stopped holding altogether (a block still in another tier stays)."""
        blocks = self._blocks.get(worker_id)
        if blocks is None:
            self.unknown_removals += sum(1 for _ in seq_hashes)
            return 0
        tiers = self._tiers.get(worker_id)
        if tiers is not None or tier != GPU_TIER:
            seq_hashes = self._leaving(blocks, tiers or {}, seq_hashes, tier)
        bit = self._bit[worker_id]
        mask, dups = self._mask, self._dups
        pop = blocks.pop
        if not (dups and worker_id in dups):  # each node held through one hash: in bulk
            nids = list(map(pop, seq_hashes, repeat(None)))
            unknown = nids.count(None)
            if unknown:
                nids = [nid for nid in nids if nid is not None]
            # one dict operation per node this worker alone held (the common case: evicting a
            # private suffix); a node others hold goes back in with this worker's bit cleared
            ms = list(map(mask.pop, nids))
            if ms.count(bit) != len(ms):
                left = list(map(xor, ms, repeat(bit)))
                mask.update(compress(zip(nids, left), left))
            self._num_blocks -= len(nids)
            self.unknown_removals += unknown
            return len(nids)
        removed = unknown = 0
        for sh in seq_hashes:
            nid = pop(sh, None)
            if nid is None:
                unknown += 1
                continue
            removed += 1
            self._release(worker_id, bit, nid)
        self._num_blocks -= removed
        self.unknown_removals += unknown
        return removed

    def _leaving(self, blocks: dict[int, int], tiers: dict[int, int], seq_hashes: Iterable[int],
                 tier: int) -> list[int]:
        """Of ``seq_hashes`` removed from ``tier``, those held in no other tier (the rest keep
        their node, one tier bit fewer)."""
        out = []
        for sh in seq_hashes:
            nid = blocks.get(sh)
            if nid is None:
                out.append(sh)  # unknown: counted by remove
                continue
            left = tiers.get(nid, GPU_TIER) & ~tier
            if not left:
                tiers.pop(nid, None)
                out.append(sh)
            elif left == GPU_TIER:
                tiers.pop(nid, None)
            else:
                tiers[nid] = left
        return out

    def lower_tier_blocks(self, worker_id: str, path_ids: Sequence[int], depth: int) -> tuple[int, int]:
        """Of a match's first ``depth`` blocks (``path_ids`` of the prompt), how many the worker
        holds only in host memory, and only on disk."""
        with self.lock:
            tiers = self._tiers.get(worker_id)
            if not tiers:
                return 0, 0
            host = disk = 0
            tget = tiers.get
            for nid in path_ids[:depth]:
                bits = tget(nid)
                if bits is not None and not bits & GPU_TIER:
                    if bits & 2:
                        host += 1
                    else:
                        disk += 1
            return host, disk

    def has_tiers(self) -> bool:
        """Some worker holds blocks outside its GPU cache (routing then weighs tiers)."""
        with self.lock:
            return bool(self._tiers) and any(self._tiers.values())

    def clear_worker(self, worker_id: str, pace: Callable[[], object] | None = None) -> None:
        """Drop every block of ``worker_id`` (AllBlocksCleared); the worker keeps its slot.

        ``pace``: called after every ``CLEAR_PIECE`` blocks (the event applier lets readers in)."""
        blocks = self._blocks.get(worker_id)
        self._tiers.pop(worker_id, None)
        if not blocks:
            return
        hashes = list(blocks)
        if pace is None:
            self.remove(worker_id, hashes)
            return
        for i in range(0, len(hashes), CLEAR_PIECE):
            self.remove(worker_id, hashes[i : i + CLEAR_PIECE])
            pace()

    def remove_worker(self, worker_id: str, pace: Callable[[], object] | None = None) -> None:
        """Forget ``worker_id`` entirely (it left discovery); ``pace`` as for ``clear_worker``."""
        if worker_id not in self._blocks:
            return
        self.clear_worker(worker_id, pace)
        self._tiers.pop(worker_id, None)
        del self._blocks[worker_id]
        bit = self._bit.pop(worker_id)
        slot = bit.bit_length() - 1
        self._slots[slot] = None
        self._free_slots.append(slot)
        self._decoded.clear()

    # -- queries ------------------------------------------------------------------------------
    def find_matches(self, local_hashes: Iterable[int], workers: Iterable[str] | None = None) -> dict[str, int]:
        """Matched prefix depth in blocks per worker; workers that match nothing are left out.

        The walk stops as soon as no worker (of ``workers``, when given) is left, and takes no
        more hashes from ``local_hashes`` than it walked: pass a lazy iterator to save hashing.
        """
        with self.lock:
            alive = -1 if workers is None else self._mask_of(workers)
            out: dict[str, int] = {}
            if not alive:
                return out
            mget = self._mask.get
            nid = ROOT
            depth = 0
            for lh in local_hashes:
                nid = hash((nid, lh))
                m = mget(nid)
                if m is None:
                    break
                new = alive & m
                if new != alive:
                    if depth:  # these workers held the blocks so far, not this one
                        self._record(out, alive ^ new, depth)
                    if not new:
                        return out
                    alive = new
                depth += 1
            if depth:
                self._record(out, alive, depth)
            return out

    def find_matches_for_tokens(self, tokens: Sequence[int], lora_name: str | None = None,
                                workers: Iterable[str] | None = None,
                                paths: list[int] | None = None) -> dict[str, int]:
        """``find_matches`` of a prompt's full blocks, hashing each block only when the walk gets there.

        The same walk as ``find_matches`` with the hashing inlined: this is the routing hot path.
        ``paths``: appended the path id of every block walked (for ``lower_tier_blocks``).
        """
        bs = self.block_size
        step = bs * 4
        end = (len(tokens) // bs) * step
        out: dict[str, int] = {}
        if not end:
            return out
        buf = memoryview(_pack_u32(tokens)).cast("B")
        h, seed = xxhash.xxh3_64_intdigest, self.seed(lora_name)
        with self.lock:
            alive = -1 if workers is None else self._mask_of(workers)
            if not alive:
                return out
            mget = self._mask.get
            nid = ROOT
            depth = 0
            n = end // step
            for sl in self._slices.get(n) or self._block_slices(n):
                nid = hash((nid, h(buf[sl], seed)))  # type: ignore[misc]
                if paths is not None:
                    paths.append(nid)
                m = mget(nid)
                if m is None:
                    break
                new = alive & m
                if new != alive:
                    if depth:
                        self._record(out, alive ^ new, depth)
                    if not new:
                        return out
                    alive = new
                depth += 1
            if depth:
                self._record(out, alive, depth)
            return out

    @property
    def num_blocks(self) -> int:
        """Index size: (worker, block) pairs held, over all workers."""
        return self._num_blocks

    @property
    def num_nodes(self) -> int:
        """Distinct prefixes in the tree (shared prefixes count once)."""
        return len(self._mask)

    @property
    def workers(self) -> list[str]:
        return list(self._blocks)

    def worker_blocks(self, worker_id: str) -> int:
        blocks = self._blocks.get(worker_id)
        return len(blocks) if blocks is not None else 0

    def block_counts(self) -> dict[str, int]:
        with self.lock:
            return {w: len(b) for w, b in self._blocks.items()}

    # -- internals ------------------------------------------------------------------------------
    def _block_slices(self, n: int) -> list[slice]:
        """Slices of the first ``n`` blocks of a u32 byte buffer (made once: slicing with a ready
        slice object is ~20% cheaper than with offsets)."""
        sl = self._slices.get(n)
        if sl is None:
            step = self.block_size * 4
            sl = [slice(off, off + step) for off in range(0, n * step, step)]
            if n <= 256:  # the sizes events and most prompts come in; a huge one is not kept
                self._slices[n] = sl
        return sl

    def _add_worker(self, worker_id: str) -> dict[int, int]:
        if self._free_slots:
            slot = self._free_slots.pop()
            self._slots[slot] = worker_id
        else:
            slot = len(self._slots)
            self._slots.append(worker_id)
        self._bit[worker_id] = 1 << slot
        self._decoded.clear()
        blocks = self._blocks[worker_id] = {}
        return blocks

    def _mask_of(self, workers: Iterable[str]) -> int:
        bits = self._bit
        m = 0
        for w in workers:
            m |= bits.get(w, 0)
        return m

    def _record(self, out: dict[str, int], bits: int, depth: int) -> None:
        """Set ``depth`` for the workers in ``bits``; masks repeat, so their decoding is memoised."""
        ws = self._decoded.get(bits)
        if ws is None:
            slots = self._slots
            found = []
            rest = bits
            while rest:
                low = rest & -rest
                found.append(slots[low.bit_length() - 1])
                rest ^= low
            if len(self._decoded) >= 4096:
                self._decoded.clear()
            ws = self._decoded[bits] = tuple(found)  # type: ignore[arg-type]
        out.update(dict.fromkeys(ws, depth))

    def _add_dup(self, worker_id: str, nid: int) -> None:
        dups = self._dups.setdefault(worker_id, {})
        dups[nid] = dups.get(nid, 0) + 1

    def _release(self, worker_id: str, bit: int, nid: int) -> None:
        """The worker stops holding ``nid`` through one of its sequence hashes."""
        dups = self._dups.get(worker_id)
        if dups is not None and nid in dups:
            c = dups[nid] - 1
            if c:
                dups[nid] = c
            else:
                del dups[nid]
                if not dups:
                    del self._dups[worker_id]
            return
        m = self._mask[nid] ^ bit
        if m:
            self._mask[nid] = m
        else:
            del self._mask[nid]

    # -- checking -------------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise IndexIntegrityError unless every invariant in the module docstring holds."""
        with self.lock:
            self._check()

    def _check(self) -> None:

        def fail(msg: str) -> None:
            raise IndexIntegrityError(msg)

        mask = self._mask
        for nid, m in mask.items():
            if m <= 0:
                fail(f"node {nid:#x} is held by nobody (mask {m}), yet still indexed")
        if set(self._bit) != set(self._blocks):
            fail("workers with a slot and workers with a block map differ")
        used = 0
        for w, bit in self._bit.items():
            slot = bit.bit_length() - 1
            if bit != 1 << slot or self._slots[slot] != w:
                fail(f"worker {w!r} has a bad slot")
            if used & bit:
                fail(f"worker {w!r} shares a slot")
            used |= bit
        for slot in self._free_slots:
            if self._slots[slot] is not None or used >> slot & 1:
                fail(f"free slot {slot} is in use")
        holders: dict[int, int] = {}
        for w, blocks in self._blocks.items():
            bit = self._bit[w]
            refs: dict[int, int] = {}
            for nid in blocks.values():
                if nid not in mask:
                    fail(f"worker {w!r} maps a block to a node not in the tree")
                refs[nid] = refs.get(nid, 0) + 1
            extra = {nid: c - 1 for nid, c in refs.items() if c > 1}
            if extra != self._dups.get(w, {}):
                fail(f"worker {w!r} has wrong duplicate counts")
            for nid in refs:
                holders[nid] = holders.get(nid, 0) | bit
        if self._dups.keys() - self._blocks.keys() or any(not d for d in self._dups.values()):
            fail("duplicate counts kept for a worker without duplicates")
        for nid, m in mask.items():
            if m != holders.get(nid, 0):
                fail(f"node {nid:#x} has mask {m:#x}, but its holders are {holders.get(nid, 0):#x}")
        if self._num_blocks != sum(len(b) for b in self._blocks.values()):
            fail("num_blocks is wrong")
        for w, tiers in self._tiers.items():
            held = set(self._blocks.get(w, {}).values())
            for nid, bits in tiers.items():
                if nid not in held:
                    fail(f"worker {w!r} has tier bits for a node it does not hold")
                if bits in (0, GPU_TIER) or bits & ~7:
                    fail(f"worker {w!r} keeps tier bits {bits} (GPU-only and empty are not kept)")
        if used & ~((1 << len(self._slots)) - 1):
            fail("a slot beyond the slot table is in use")
