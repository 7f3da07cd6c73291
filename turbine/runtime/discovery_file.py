"""File discovery: several processes of one machine share a directory, one file per instance.

::

    <directory>/<instance_id>.json      {"instance": {...}, "pid": 1234, "host": "..."}
    <directory>/.<instance_id>.<rand>.tmp   (being written; renamed into place atomically)

Liveness is the file's mtime: the owner touches its files every ``heartbeat_s``; a reader treats
a file older than ``ttl_s`` as dead (its process was killed, or froze) and deletes it. An owner
whose file was deleted while it was alive rewrites it on its next heartbeat. Records are written
with tmp + rename, so a reader never sees half a file. All disk I/O runs in a worker thread.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator

import msgspec

from turbine.runtime.discovery import DiscoveryEvent, Instance, Watchers, apply_view, check_instance, select

log = logging.getLogger("turbine.runtime")


class _Record(msgspec.Struct, kw_only=True):
    instance: Instance
    pid: int = 0
    host: str = ""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_Record)


class FileDiscovery:
    def __init__(self, directory: str | os.PathLike[str], *, ttl_s: float = 3.0, heartbeat_s: float = 0.5,
                 poll_s: float = 0.2) -> None:
        if not (0 < heartbeat_s < ttl_s):
            raise ValueError(f"need 0 < heartbeat_s < ttl_s, got heartbeat_s={heartbeat_s} ttl_s={ttl_s}")
        if poll_s <= 0:
            raise ValueError(f"poll_s must be positive, got {poll_s}")
        self.directory = os.fspath(directory)
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s
        self.poll_s = poll_s
        self._own: dict[str, Instance] = {}
        self._mine: set[str] = set()  # ids this client ever registered: its own records are authoritative
        self._disk_lock = threading.Lock()  # orders writes/deletes/touches of own files
        self._view: dict[str, Instance] = {}
        self._scanned: dict[str, Instance] = {}  # the last scan's live instances
        self._cache: dict[str, tuple[bytes, Instance]] = {}  # file name -> (raw, decoded)
        self._bad: dict[str, bytes] = {}  # file name -> the unreadable content already reported
        self.rejected = 0  # distinct malformed records seen (each logged once)
        self._loaded = False
        self._watchers = Watchers()
        self._poll_task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._closed = False

    # --- the Discovery interface ----------------------------------------------------------------
    async def register(self, instance: Instance) -> None:
        check_instance(instance)
        if self._closed:
            raise RuntimeError("discovery client is closed")
        self._own[instance.instance_id] = instance
        self._mine.add(instance.instance_id)
        await asyncio.to_thread(self._write_own, instance.instance_id)
        self._apply(None)
        if self._heartbeat_task is None:
            self._heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeat_loop())

    async def unregister(self, instance_id: str) -> None:
        if self._own.pop(instance_id, None) is not None:
            await asyncio.to_thread(self._delete_own, instance_id)
            self._apply(None)

    def instances(self, component: str | None = None) -> list[Instance]:
        """The view as of the last poll (read synchronously the first time)."""
        if not self._loaded:
            self._apply(self._scan())
        self._start_polling()
        return select(self._view, component)

    def watch(self) -> AsyncIterator[DiscoveryEvent]:
        if self._closed:
            raise RuntimeError("discovery client is closed")
        if not self._loaded:
            self._apply(self._scan())
        self._start_polling()
        return self._watchers.watch(select(self._view, None))

    async def close(self) -> None:
        """Stop polling and heartbeats, delete own files, end watches."""
        if self._closed:
            return
        self._closed = True
        tasks = [t for t in (self._poll_task, self._heartbeat_task) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        own, self._own = list(self._own), {}
        for iid in own:
            await asyncio.to_thread(self._delete_own, iid)
        self._apply(None)  # own watches see own instances leave, as with MemoryDiscovery
        self._watchers.close()

    # --- loops ----------------------------------------------------------------------------------
    def _start_polling(self) -> None:
        if self._poll_task is None and not self._closed:
            with contextlib.suppress(RuntimeError):  # no running loop: a sync caller gets the snapshot only
                self._poll_task = asyncio.get_running_loop().create_task(self._poll_loop())

    async def _poll_loop(self) -> None:
        while True:
            try:
                self._apply(await asyncio.to_thread(self._scan))
            except Exception:  # noqa: BLE001 - a bad directory must not kill discovery
                log.exception("file discovery: scanning %s failed", self.directory)
            await asyncio.sleep(self.poll_s)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await asyncio.to_thread(self._touch_own, list(self._own))
            except Exception:  # noqa: BLE001
                log.exception("file discovery: heartbeat in %s failed", self.directory)

    def _apply(self, scanned: dict[str, Instance] | None) -> None:
        """Merge a scan (None = keep the last one) with own instances into the view."""
        if scanned is not None:
            self._loaded = True
            self._scanned = scanned
        new = {iid: inst for iid, inst in self._scanned.items() if iid not in self._mine}
        new.update(self._own)
        apply_view(self._view, new, self._watchers)

    # --- disk (worker thread) -------------------------------------------------------------------
    def _path(self, instance_id: str) -> str:
        return os.path.join(self.directory, instance_id + ".json")

    def _write_own(self, instance_id: str) -> None:
        with self._disk_lock:
            inst = self._own.get(instance_id)
            if inst is None:
                return  # unregistered meanwhile
            os.makedirs(self.directory, exist_ok=True)
            data = _encoder.encode(_Record(instance=inst, pid=os.getpid(), host=socket.gethostname()))
            tmp = os.path.join(self.directory, f".{instance_id}.{uuid.uuid4().hex[:8]}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self._path(instance_id))

    def _delete_own(self, instance_id: str) -> None:
        with self._disk_lock, contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(instance_id))

    def _touch_own(self, instance_ids: list[str]) -> None:
        for iid in instance_ids:
            with self._disk_lock:
                if iid not in self._own:
                    continue
                try:
                    os.utime(self._path(iid))
                    continue
                except FileNotFoundError:
                    log.warning("file discovery: record of %s vanished (thought dead?); rewriting", iid)
            self._write_own(iid)

    def _scan(self) -> dict[str, Instance]:
        """Live instances on disk; deletes records (and temp files) older than the TTL."""
        now = time.time()
        live: dict[str, Instance] = {}
        cache: dict[str, tuple[bytes, Instance]] = {}
        bad: dict[str, bytes] = {}
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return live
        for e in entries:
            name = e.name
            is_tmp = name.startswith(".") and name.endswith(".tmp")
            if not is_tmp and (name.startswith(".") or not name.endswith(".json")):
                continue
            try:
                mtime = e.stat().st_mtime
                if now - mtime > self.ttl_s:
                    if name[:-5] not in self._own:
                        self._remove_stale(e.path, now)
                    continue
                if is_tmp:
                    continue
                with open(e.path, "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                continue
            hit = self._cache.get(name)
            if hit is not None and hit[0] == raw:
                inst = hit[1]
            else:
                try:
                    inst = _decoder.decode(raw).instance
                except msgspec.DecodeError as exc:  # malformed, or a card that breaks its constraints
                    bad[name] = raw
                    if self._bad.get(name) != raw:
                        self.rejected += 1
                        log.warning("file discovery: ignoring malformed record %s: %s", e.path, exc)
                    continue
            cache[name] = (raw, inst)
            live[inst.instance_id] = inst
        self._cache = cache
        self._bad = bad
        return live

    def _remove_stale(self, path: str, now: float) -> None:
        # Re-check right before deleting: the owner may have just touched it.
        with contextlib.suppress(FileNotFoundError):
            if now - os.stat(path).st_mtime > self.ttl_s:
                os.unlink(path)
                log.info("file discovery: removed stale record %s", path)
