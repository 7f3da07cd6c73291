"""The bytes of the host and disk KV tiers of a built-in engine (imports torch).

    host: a tensor [slots, layers, 2, block_size, kv_heads, head_dim] (pinned on CUDA): a slot is
          one contiguous block, the G1 block's 2 x layers segments side by side
    disk: one file per slot, <dir>/<slot>.kv = header (magic, hash, length, xxh3 checksum) + the
          block's bytes in the host slot's layout

Copies named by TieredCache run in order: ``run_copies`` under the core's lock before the step
that reuses the evicted blocks is launched (offloads are device-to-host copies queued on the
step's stream, so the step's writes come after them; spills snapshot the host slot and write it
on a background thread). ``onboard`` runs off the event loop and off the step thread: host slots
and verified disk blocks are copied into the new G1 blocks on a side stream that first waits for
what the step stream queued (an offload still reading one of those blocks). A disk block whose
hash or checksum does not match is never served: the onboarding fails (the sequence is
recomputed) and the entry is dropped. A disk that fails to write (full, unwritable) is logged
once and the disk tier stops taking blocks; serving goes on.
"""
from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import xxhash

from turbine.kvbm.tiered import DISK, HOST, TierCopy, TieredCache, TierSource
from turbine.protocols.kv_transfer import KvLayout

log = logging.getLogger("turbine.kvbm")

_HEADER = struct.Struct("<4sQQQ")  # magic, sequence hash, payload bytes, xxh3-64 of the payload
_MAGIC = b"TKV1"


class CorruptBlock(RuntimeError):
    def __init__(self, tier: str, h: int, why: str) -> None:
        super().__init__(f"{tier} block {h:#x}: {why}")
        self.tier = tier
        self.hash = h


class TierStore:
    def __init__(self, kv_data: torch.Tensor, layout: KvLayout, tiers: TieredCache, lock: threading.Lock,
                 disk_dir: str | os.PathLike[str] | None = None) -> None:
        self.g1 = kv_data
        self.layout = layout
        self.tiers = tiers
        self.lock = lock  # the core's: TieredCache is touched under it
        self.block_bytes = layout.block_bytes
        shape = (kv_data.shape[0], 2, *kv_data.shape[3:])
        cuda = kv_data.is_cuda
        self.host = torch.empty((tiers.host.capacity, *shape), dtype=kv_data.dtype, pin_memory=cuda)
        self.disk_dir = os.fspath(disk_dir) if disk_dir is not None else None
        if tiers.disk.capacity:
            if self.disk_dir is None:
                raise ValueError("a disk KV tier needs a directory (--disk-kv-dir)")
            os.makedirs(self.disk_dir, exist_ok=True)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="turbine-kv-disk") if tiers.disk.capacity else None
        self._stream = torch.cuda.Stream(device=kv_data.device) if cuda else None
        self._offload_event: torch.cuda.Event | None = None
        self._disk_failed = False
        self.bytes_offloaded = self.bytes_onboarded = 0
        self.onboard_seconds = 0.0

    # --- host <-> G1 ---------------------------------------------------------------------------
    def _g1_block(self, b: int) -> torch.Tensor:
        return self.g1[:, :, b]

    def run_copies(self, copies: Sequence[TierCopy]) -> None:
        """Offloads and spills of one step, in order (called under the core's lock)."""
        cuda = self.g1.is_cuda
        for c in copies:
            if c.kind == "offload":
                self.host[c.dst].copy_(self._g1_block(c.src), non_blocking=cuda)
                self.bytes_offloaded += self.block_bytes
                if cuda:
                    self._offload_event = torch.cuda.Event()
                    self._offload_event.record()
            elif c.kind == "spill":
                if cuda and self._offload_event is not None:
                    self._offload_event.synchronize()  # the slot's bytes have landed
                self._write_later(c.dst, c.hash, self._as_bytes(self.host[c.src]))
            elif c.kind == "offload_disk":  # no host tier: straight from G1
                self._write_later(c.dst, c.hash, self._as_bytes(self._g1_block(c.src).cpu()))

    @staticmethod
    def _as_bytes(t: torch.Tensor) -> bytes:
        return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()

    # --- disk --------------------------------------------------------------------------------
    def _path(self, slot: int) -> str:
        assert self.disk_dir is not None
        return os.path.join(self.disk_dir, f"{slot}.kv")

    def _write_later(self, slot: int, h: int, payload: bytes) -> None:
        assert self._writer is not None
        self._writer.submit(self._write, slot, h, payload)

    def _write(self, slot: int, h: int, payload: bytes) -> None:
        ok = True
        try:
            with open(self._path(slot), "wb") as f:
                f.write(_HEADER.pack(_MAGIC, h, len(payload), xxhash.xxh3_64_intdigest(payload)))
                f.write(payload)
        except OSError as e:
            ok = False
            if not self._disk_failed:
                self._disk_failed = True
                log.error("the disk KV tier cannot write to %s (%s): it stops taking blocks; serving goes on",
                          self.disk_dir, e)
        with self.lock:
            self.tiers.written(slot, h, ok)
            if not ok:
                self.tiers.disable_disk()

    def _read(self, slot: int, h: int) -> bytes:
        try:
            with open(self._path(slot), "rb") as f:
                head = f.read(_HEADER.size)
                payload = f.read(self.block_bytes + 1)
        except OSError as e:
            raise CorruptBlock(DISK, h, f"unreadable: {e}") from None
        if len(head) != _HEADER.size:
            raise CorruptBlock(DISK, h, "truncated header")
        magic, stored, n, digest = _HEADER.unpack(head)
        if magic != _MAGIC or stored != h:
            raise CorruptBlock(DISK, h, "not this block")
        if n != self.block_bytes or len(payload) != n:
            raise CorruptBlock(DISK, h, f"{len(payload)} bytes, want {self.block_bytes}")
        if xxhash.xxh3_64_intdigest(payload) != digest:
            raise CorruptBlock(DISK, h, "checksum mismatch")
        return payload

    # --- onboarding --------------------------------------------------------------------------
    def onboard(self, source: TierSource, local_blocks: Sequence[int]) -> None:
        """Copy the source's blocks into ``local_blocks`` (a worker thread); CorruptBlock if a disk
        block is not what it should be (nothing is served from it)."""
        shape = self.host.shape[1:]
        staged: list[tuple[int, torch.Tensor]] = []
        for (tier, slot, h), b in zip(source.entries, local_blocks, strict=True):
            if tier == HOST:
                staged.append((b, self.host[slot]))
            else:
                payload = self._read(slot, h)
                t = torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(self.g1.dtype).view(shape)
                staged.append((b, t.pin_memory() if self.g1.is_cuda else t))
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.g1.device))
            with torch.cuda.stream(self._stream):
                for b, t in staged:
                    self._g1_block(b).copy_(t, non_blocking=True)
            self._stream.synchronize()
        else:
            for b, t in staged:
                self._g1_block(b).copy_(t)
        self.bytes_onboarded += len(staged) * self.block_bytes

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)


OnboardDone = Callable[[str, bool], None]
