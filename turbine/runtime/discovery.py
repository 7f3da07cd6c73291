"""Discovery: which component instances exist and where they listen.

A watcher sees the current instances as ``added`` events first, then changes as they happen.
``added`` means added *or updated* (re-registering an id replaces its record); ``removed``
carries the last record seen. ``memory`` serves one process; ``file`` (discovery_file.py) serves
several processes on one machine; ``etcd`` (discovery_etcd.py) serves machines.
"""
from __future__ import annotations

import asyncio
import os
import re
import tempfile
import weakref
from collections.abc import AsyncIterator, Iterable
from typing import Any, Literal, NamedTuple, Protocol

import msgspec

from turbine.protocols.model_card import ModelCard

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class Instance(msgspec.Struct, frozen=True, kw_only=True):
    instance_id: str
    component: str  # e.g. "worker"
    endpoint: str  # e.g. "generate"
    address: str  # request-plane address
    event_address: str | None = None  # event-plane PUB address
    model_card: ModelCard | None = None
    metadata: dict[str, str] = {}


class DiscoveryUnavailable(ConnectionError):
    """The discovery service could not be reached in time (a registration, a first listing)."""


class DiscoveryEvent(NamedTuple):
    kind: Literal["added", "removed"]
    instance: Instance


class Discovery(Protocol):
    async def register(self, instance: Instance) -> None: ...

    async def unregister(self, instance_id: str) -> None: ...

    def instances(self, component: str | None = None) -> list[Instance]: ...

    def watch(self) -> AsyncIterator[DiscoveryEvent]: ...

    async def close(self) -> None: ...


def check_instance(instance: Instance) -> None:
    if not isinstance(instance, Instance):
        raise TypeError(f"expected an Instance, got {type(instance).__name__}")
    if not _ID_RE.fullmatch(instance.instance_id):
        raise ValueError(f"instance_id {instance.instance_id!r} must be 1-200 characters of "
                         "[A-Za-z0-9._-] starting with a letter or digit")


def select(view: dict[str, Instance], component: str | None) -> list[Instance]:
    return sorted((i for i in view.values() if component is None or i.component == component),
                  key=lambda i: i.instance_id)


class Watchers:
    """The watch queues of one view (None in a queue ends that watch). Unbounded: discovery
    changes are rare and small."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[DiscoveryEvent | None]] = set()

    def open(self, snapshot: Iterable[Instance]) -> asyncio.Queue[DiscoveryEvent | None]:
        # Snapshot and subscription happen together (no await between), so no change is missed.
        q: asyncio.Queue[DiscoveryEvent | None] = asyncio.Queue()
        for inst in snapshot:
            q.put_nowait(DiscoveryEvent("added", inst))
        self._queues.add(q)
        return q

    async def iterate(self, q: asyncio.Queue[DiscoveryEvent | None]) -> AsyncIterator[DiscoveryEvent]:
        try:
            while (ev := await q.get()) is not None:
                yield ev
        finally:
            self._queues.discard(q)

    def watch(self, snapshot: Iterable[Instance]) -> AsyncIterator[DiscoveryEvent]:
        return self.iterate(self.open(snapshot))

    def emit(self, kind: Literal["added", "removed"], instance: Instance) -> None:
        ev = DiscoveryEvent(kind, instance)
        for q in self._queues:
            q.put_nowait(ev)

    def end(self, q: asyncio.Queue[DiscoveryEvent | None]) -> None:
        """End one watch: it yields what was queued before this, then stops."""
        if q in self._queues:
            self._queues.discard(q)
            q.put_nowait(None)

    def close(self) -> None:
        for q in list(self._queues):
            self.end(q)


def apply_view(view: dict[str, Instance], new: dict[str, Instance], watchers: Watchers) -> None:
    """Replace ``view`` by ``new`` in place, emitting the differences."""
    for iid in [i for i in view if i not in new]:
        watchers.emit("removed", view.pop(iid))
    for iid, inst in new.items():
        if view.get(iid) != inst:
            view[iid] = inst
            watchers.emit("added", inst)


class MemoryStore:
    """The instances of one process; every MemoryDiscovery built on it shares them."""

    def __init__(self) -> None:
        self.view: dict[str, Instance] = {}
        self.watchers = Watchers()

    def put(self, instance: Instance) -> None:
        if self.view.get(instance.instance_id) != instance:
            self.view[instance.instance_id] = instance
            self.watchers.emit("added", instance)

    def remove(self, instance_id: str) -> None:
        inst = self.view.pop(instance_id, None)
        if inst is not None:
            self.watchers.emit("removed", inst)


class MemoryDiscovery:
    """A client of a MemoryStore; ``close()`` unregisters what it registered and ends its watches."""

    def __init__(self, store: MemoryStore | None = None) -> None:
        self.store = store if store is not None else MemoryStore()
        self._own: dict[str, None] = {}  # ordered: close() unregisters in registration order
        self._queues: weakref.WeakSet[asyncio.Queue[DiscoveryEvent | None]] = weakref.WeakSet()
        self._closed = False

    async def register(self, instance: Instance) -> None:
        check_instance(instance)
        if self._closed:
            raise RuntimeError("discovery client is closed")
        self._own[instance.instance_id] = None
        self.store.put(instance)

    async def unregister(self, instance_id: str) -> None:
        self._own.pop(instance_id, None)
        self.store.remove(instance_id)

    def instances(self, component: str | None = None) -> list[Instance]:
        return select(self.store.view, component)

    def watch(self) -> AsyncIterator[DiscoveryEvent]:
        if self._closed:
            raise RuntimeError("discovery client is closed")
        q = self.store.watchers.open(select(self.store.view, None))
        self._queues.add(q)
        return self.store.watchers.iterate(q)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for iid in list(self._own):
            await self.unregister(iid)
        for q in list(self._queues):
            self.store.watchers.end(q)


def default_directory() -> str:
    """Where ``file`` discovery lives when no directory is given (same for every local process)."""
    return os.environ.get("TURBINE_DISCOVERY_DIR") or os.path.join(
        tempfile.gettempdir(), f"turbine-discovery-{os.getuid() if hasattr(os, 'getuid') else 'user'}")


def make_discovery(kind: Literal["memory", "file", "etcd"], directory: str | os.PathLike[str] | None = None,
                   **options: Any) -> Discovery:
    """``memory``: ``options`` may hold ``store`` (a MemoryStore to share; new one otherwise).
    ``file``: ``directory`` defaults to $TURBINE_DISCOVERY_DIR or a per-user temp folder;
    ``options`` are FileDiscovery's (ttl_s, heartbeat_s, poll_s). ``etcd``: ``options`` are
    EtcdDiscovery's (endpoints, prefix, ttl_s, timeout_s). Deployments build theirs from a
    RuntimeConfig (config.py) instead."""
    if kind == "memory":
        return MemoryDiscovery(options.pop("store", None), **options)
    if kind == "file":
        from turbine.runtime.discovery_file import FileDiscovery
        return FileDiscovery(directory if directory is not None else default_directory(), **options)
    if kind == "etcd":
        from turbine.runtime.discovery_etcd import EtcdDiscovery
        return EtcdDiscovery(**options)
    raise ValueError(f"unknown discovery kind {kind!r} (want 'memory', 'file' or 'etcd')")
