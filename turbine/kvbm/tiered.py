"""The KV tiers under an engine's paged cache (G1): host memory (G2) and local disk (G3).

    G1 evicts a cached block ──▶ G2 takes it (offload: copy the block to a host slot first)
    G2 evicts its LRU entry  ──▶ G3 takes it if its prefix was seen more than once (spill), else gone
    admission: G1's prefix hit, then consecutive blocks found in G2 or G3 ──▶ onboard: copied into
               newly allocated G1 blocks while other sequences run (the sequence is PULLING), then
               they count as cached

This is bookkeeping shared by every engine (no torch): it decides, names the copies in order and
emits the KV events of each tier (``medium`` "CPU" / "DISK"); the engine moves the bytes. The
copies of one step (``take_copies``) must run in list order before the step's kernels write the
blocks they read: a spill reads a host slot before the offload that reuses it overwrites it.
Entries being onboarded are pinned, disk slots being written are busy: neither is handed out.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from turbine.kvbm.pools import TierPool
from turbine.protocols.kv_events import BlockRemoved, BlockStored, KVEvent

HOST, DISK = "host", "disk"


class TierCopy(NamedTuple):
    kind: str  # "offload": G1 block -> host slot; "spill": host slot -> disk slot
    src: int
    dst: int
    hash: int


class TierSource(NamedTuple):
    """Where an onboarding reads each block: (tier, slot, hash), in the sequence's block order."""

    entries: tuple[tuple[str, int, int], ...]

    @property
    def tiers(self) -> set[str]:
        return {t for t, _, _ in self.entries}


class TierStats:
    __slots__ = ("hits", "onboarded", "offloaded", "spilled", "dropped", "spill_failures", "onboard_seconds")

    def __init__(self) -> None:
        self.onboard_seconds = {HOST: 0.0, DISK: 0.0}
        self.hits = {HOST: 0, DISK: 0}  # blocks found below G1 at admission
        self.onboarded = {HOST: 0, DISK: 0}  # blocks copied back into G1
        self.offloaded = 0  # G1 -> host
        self.spilled = 0  # host -> disk
        self.dropped = 0  # corrupt or unreadable entries forgotten
        self.spill_failures = 0


class TieredCache:
    def __init__(self, host_blocks: int, disk_blocks: int, block_size: int, emit: Callable[[KVEvent], None], *,
                 disk_min_seen: int = 2) -> None:
        """``emit``: where this cache's KV events go (the block manager's queue, ``KVBlockManager.emit``)."""
        if host_blocks < 0 or disk_blocks < 0:
            raise ValueError("tier sizes must be >= 0")
        self.block_size = block_size
        self.host = TierPool(HOST, "CPU", host_blocks)
        self.disk = TierPool(DISK, "DISK", disk_blocks)
        self.pools = {HOST: self.host, DISK: self.disk}
        self.disk_min_seen = disk_min_seen
        self.disk_enabled = disk_blocks > 0
        self.stats = TierStats()
        self._emit = emit
        self._copies: list[TierCopy] = []
        self._seen: OrderedDict[int, int] = OrderedDict()  # hash -> admissions naming it (bounded)
        self._seen_cap = 4 * (host_blocks + disk_blocks) + 1024

    # --- frequency --------------------------------------------------------------------------
    def seen(self, hashes: Sequence[int]) -> None:
        """A sequence was admitted with these blocks in its prompt (the disk gate counts them)."""
        s = self._seen
        for h in hashes:
            n = s.pop(h, 0)
            s[h] = n + 1
        while len(s) > self._seen_cap:
            s.popitem(last=False)

    # --- G1 eviction ------------------------------------------------------------------------
    def on_evict(self, block_id: int, info: Any) -> None:
        """G1 is about to reuse a cached block: keep it in the host tier (disk-only: on disk)."""
        h = info.seq_hash
        if not self.host.capacity:
            if self.disk_enabled:
                self._to_disk(h, info, ("offload_disk", block_id))
            return
        if h in self.host:
            self.host.touch(h)
            return
        slot, evicted = self.host.put(h, info)
        if slot is None:
            return  # every host entry is being read: this block is lost, as without tiers
        for eh, e in evicted:  # spills read their host slots before the offload overwrites one
            self._emit(BlockRemoved([eh], medium=self.host.medium))
            if self.disk_enabled and self._seen.get(eh, 0) >= self.disk_min_seen:
                self._to_disk(eh, e.info, ("spill", e.slot))
        self._copies.append(TierCopy("offload", block_id, slot, h))
        self.stats.offloaded += 1
        self._emit(BlockStored([h], info.parent_hash, info.token_ids.tolist(), self.block_size,
                                        medium=self.host.medium))

    def _to_disk(self, h: int, info: Any, src: tuple[str, int]) -> None:
        if h in self.disk:
            self.disk.touch(h)
            return
        slot, evicted = self.disk.put(h, info)
        if slot is None:
            return
        for eh, _ in evicted:
            self._emit(BlockRemoved([eh], medium=self.disk.medium))
        self.disk.busy.add(slot)
        self._copies.append(TierCopy(src[0], src[1], slot, h))
        self.stats.spilled += 1
        self._emit(BlockStored([h], info.parent_hash, info.token_ids.tolist(), self.block_size,
                                        medium=self.disk.medium))

    def take_copies(self) -> list[TierCopy]:
        copies, self._copies = self._copies, []
        return copies

    def written(self, disk_slot: int, h: int, ok: bool) -> None:
        """A spill finished (or failed: the entry is forgotten, and failures stop the disk tier)."""
        e = self.disk.entries.get(h)
        if e is None or e.slot != disk_slot:
            return
        if ok:
            self.disk.busy.discard(disk_slot)
        else:
            self.stats.spill_failures += 1
            self._forget(DISK, h)

    def disable_disk(self) -> None:
        """The disk is full or unwritable: stop spilling (what is on disk stays readable)."""
        self.disk_enabled = False

    # --- admission: onboarding ----------------------------------------------------------------
    def match(self, hashes: Sequence[int], start: int, limit: int) -> list[tuple[str, int]]:
        """Blocks ``start..`` (below ``limit``) found consecutively in the host or disk tier."""
        out: list[tuple[str, int]] = []
        host, disk = self.host, self.disk
        for i in range(start, min(limit, len(hashes))):
            h = hashes[i]
            if host.readable(h):
                out.append((HOST, h))
            elif disk.readable(h):
                out.append((DISK, h))
            else:
                break
        return out

    def pin(self, found: list[tuple[str, int]]) -> TierSource:
        return TierSource(tuple((tier, self.pools[tier].pin(h), h) for tier, h in found))

    def admitted(self, source: TierSource) -> None:
        for tier, _, _ in source.entries:
            self.stats.hits[tier] += 1

    def unpin(self, source: TierSource, ok: bool) -> None:
        for tier, _, h in source.entries:
            self.pools[tier].unpin(h)
            if ok:
                self.stats.onboarded[tier] += 1

    def drop(self, tier: str, h: int) -> None:
        """A corrupt or unreadable entry: forget it (after its readers unpinned it)."""
        self.stats.dropped += 1
        self._forget(tier, h)

    def _forget(self, tier: str, h: int) -> None:
        pool = self.pools[tier]
        if pool.drop(h) is not None:
            self._emit(BlockRemoved([h], medium=pool.medium))

    # --- views ---------------------------------------------------------------------------------
    def snapshot(self) -> list[BlockStored]:
        """BlockStored events (medium set) rebuilding both tiers for a router's resync."""
        out = []
        for pool in (self.host, self.disk):
            for h, e in sorted(pool.entries.items(), key=lambda kv: kv[1].info.position):
                if e.slot in pool.busy:
                    continue
                out.append(BlockStored([h], e.info.parent_hash, e.info.token_ids.tolist(), self.block_size,
                                       medium=pool.medium))
        return out

    def loads(self, block_bytes: int) -> tuple[Any, ...]:
        """What the worker publishes about each configured tier (protocols.load.TierLoad)."""
        from turbine.protocols.load import TierLoad

        st = self.stats
        out = []
        for name, pool, down in ((HOST, self.host, st.offloaded), (DISK, self.disk, st.spilled)):
            if pool.capacity:
                out.append(TierLoad(tier=name, blocks=len(pool), capacity_blocks=pool.capacity,
                                    hit_blocks=st.hits[name], onboarded_bytes=st.onboarded[name] * block_bytes,
                                    offloaded_bytes=down * block_bytes, onboard_seconds=st.onboard_seconds[name]))
        return tuple(out)

    def onboard_took(self, source: TierSource, seconds: float) -> None:
        """Charge an onboarding's time to its tiers, in proportion to their blocks."""
        n = len(source.entries) or 1
        for tier, _, _ in source.entries:
            self.stats.onboard_seconds[tier] += seconds / n

    def check_integrity(self) -> None:
        self.host.check_integrity()
        self.disk.check_integrity()
