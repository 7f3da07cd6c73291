"""One lower KV tier (host memory, disk): a fixed number of slots holding blocks by sequence hash.

    hash -> slot        every entry; a hash lives in at most one slot of a tier
    LRU                 entries nobody reads now, oldest first (what ``put`` evicts)
    pins                entries an onboarding is reading: never evicted, never overwritten
    busy                slots still being written (an offload in flight): not readable yet

Bookkeeping only, shared by the mocker and the built-in engine (which moves the bytes); no
torch. ``check_integrity`` is what the property tests call after every operation.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, NamedTuple


class Entry(NamedTuple):
    slot: int
    info: Any  # the block manager's _Cached: parent hash, tokens, position (for events and resyncs)


class TierPool:
    def __init__(self, name: str, medium: str, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"tier {name}: capacity must be >= 0, got {capacity}")
        self.name = name
        self.medium = medium  # the KV events' "medium" of this tier ("CPU", "DISK")
        self.capacity = capacity
        self.entries: dict[int, Entry] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # unpinned entries, oldest first
        self._pins: dict[int, int] = {}
        self.busy: set[int] = set()  # slots being written
        self._free = list(range(capacity - 1, -1, -1))

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, h: int) -> bool:
        return h in self.entries

    def readable(self, h: int) -> bool:
        e = self.entries.get(h)
        return e is not None and e.slot not in self.busy

    def touch(self, h: int) -> None:
        if h in self._lru:
            self._lru.move_to_end(h)

    def pin(self, h: int) -> int:
        """Keep ``h`` while it is read; returns its slot."""
        e = self.entries[h]
        n = self._pins.get(h, 0)
        if not n:
            del self._lru[h]
        self._pins[h] = n + 1
        return e.slot

    def unpin(self, h: int) -> None:
        n = self._pins.get(h, 0)
        if n <= 0:
            return
        if n == 1:
            del self._pins[h]
            if h in self.entries:
                self._lru[h] = None  # most recently used
        else:
            self._pins[h] = n - 1

    def put(self, h: int, info: Any) -> tuple[int | None, list[tuple[int, Entry]]]:
        """Give ``h`` a slot, evicting least recently used entries if full. Returns (slot or None
        when every entry is pinned, the evicted (hash, entry) pairs: their slots are reused now)."""
        if h in self.entries:
            self.touch(h)
            return None, []
        evicted: list[tuple[int, Entry]] = []
        if not self._free:
            if not self._lru:
                return None, []
            old, _ = self._lru.popitem(last=False)
            e = self.entries.pop(old)
            evicted.append((old, e))
            self._free.append(e.slot)
        slot = self._free.pop()
        self.entries[h] = Entry(slot, info)
        self._lru[h] = None
        return slot, evicted

    def drop(self, h: int) -> Entry | None:
        """Forget ``h`` (a corrupt or unwritable block); a pinned one stays until unpinned."""
        if self._pins.get(h):
            return None
        e = self.entries.pop(h, None)
        if e is not None:
            self._lru.pop(h, None)
            self.busy.discard(e.slot)
            self._free.append(e.slot)
        return e

    def check_integrity(self) -> None:
        slots = [e.slot for e in self.entries.values()]
        if len(set(slots)) != len(slots):
            raise AssertionError(f"tier {self.name}: a slot holds two hashes")
        if set(slots) & set(self._free) or len(slots) + len(self._free) != self.capacity:
            raise AssertionError(f"tier {self.name}: slots are lost or double counted")
        for h in self.entries:
            if (h in self._lru) == bool(self._pins.get(h)):
                raise AssertionError(f"tier {self.name}: {h:#x} is both pinned and evictable, or neither")
        if set(self._lru) - set(self.entries) or set(self._pins) - set(self.entries):
            raise AssertionError(f"tier {self.name}: LRU or pins name absent hashes")
        if not self.busy <= set(slots):
            raise AssertionError(f"tier {self.name}: a free slot is marked busy")
