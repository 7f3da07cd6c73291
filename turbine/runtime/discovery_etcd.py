"""etcd discovery: machines of a fleet find each other through an etcd cluster.

::

    <prefix>/instances/<instance_id>  ->  Instance as JSON (its model card inside), under the lease

One key per instance, its model card in the value, so a watcher never sees an instance without
its card (one put is one revision, one event). Each client holds at most one lease (TTL
``ttl_s``) for all the instances it registers and keeps it alive every ttl/3; a process that dies
stops refreshing and etcd deletes its keys when the lease expires.

Two tasks, each the only user of its own etcd connection:

- the keeper is the only writer: it grants the lease, puts and deletes this client's keys so
  they match ``_own``, and refreshes the lease. When etcd cannot be reached it retries with
  backoff (0.1 s doubling to 1 s) and never gives up; when etcd answers that the lease is gone
  (TTL 0: it expired while this client was cut off, or etcd lost its data), it grants a new one
  and puts every key again. A worker that loses etcd re-registers when it comes back, without
  restarting.
- the follower keeps the view: it lists the prefix, then watches from the listing's revision + 1.
  When the watch fails (etcd restarted, a connection dropped, a revision compacted) it lists and
  watches again, and the difference from the last view goes to watchers as removals and
  additions.

After a failure either task drops its client and makes a new one (a new gRPC channel; aetcd's
watcher is never reused after its stream broke); closing clients and stopping the tasks is
bounded even where aetcd drops a cancellation (etcd_client.py). While etcd is unreachable the view keeps its last state: workers still serve, and
  the request plane notices the dead ones.

``register`` waits (bounded by ``timeout_s``) until its key is in etcd, else raises
``DiscoveryUnavailable``; ``unregister`` waits the same but never raises (the key leaves with the
lease, or is deleted when etcd comes back). ``close`` revokes the lease: every key of this client
leaves at once. Several endpoints (``etcd://h1,h2,h3``) are tried in turn. gRPC keepalive pings
every 10 s notice a connection to etcd that died without a FIN within ~15 s.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aetcd
import msgspec

from turbine.runtime.discovery import (
    DiscoveryEvent,
    DiscoveryUnavailable,
    Instance,
    Watchers,
    apply_view,
    check_instance,
    select,
)
from turbine.runtime.etcd_client import ERRORS, Connection, lease_not_found, text
from turbine.runtime.tasks import cancel_and_wait

log = logging.getLogger("turbine.runtime")

BACKOFF_MIN_S, BACKOFF_MAX_S = 0.1, 1.0

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Instance)


class EtcdDiscovery:
    def __init__(self, endpoints: Sequence[tuple[str, int]], *, prefix: str = "/turbine", ttl_s: float = 5.0,
                 timeout_s: float = 10.0, op_timeout_s: float | None = None) -> None:
        if not endpoints:
            raise ValueError("etcd discovery needs at least one endpoint")
        if not 1 <= ttl_s <= 3600:
            raise ValueError(f"ttl_s must be in [1, 3600], got {ttl_s}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.endpoints = tuple(endpoints)
        self.prefix = prefix.rstrip("/")
        self.ttl = max(1, math.ceil(ttl_s))  # etcd leases are whole seconds
        self.keepalive_s = self.ttl / 3
        self.timeout_s = timeout_s  # a registration, a first listing
        # one RPC; shorter than the TTL so a refresh that hangs leaves time for another
        self.op_timeout_s = op_timeout_s if op_timeout_s is not None else min(2.0, self.ttl / 3)
        self._key_prefix = f"{self.prefix}/instances/".encode()
        self._own: dict[str, Instance] = {}
        self._mine: set[str] = set()  # ids this client ever registered: its own records are authoritative
        self._remote: dict[str, Instance] = {}  # etcd's state, as of the follower's last event
        self._view: dict[str, Instance] = {}
        self._watchers = Watchers()
        self._listed = asyncio.Event()  # the first listing is applied
        self._writer = Connection(self.endpoints, self.op_timeout_s)
        self._reader = Connection(self.endpoints, self.op_timeout_s)
        self._keeper: asyncio.Task[None] | None = None
        self._follower: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._gen = 0  # bumped by each change of _own
        self._synced_gen = 0  # the last _gen whose state is in etcd
        self._synced = asyncio.Event()  # set (and replaced) when _synced_gen advances
        self._lease: int | None = None
        self._written: dict[str, Instance] = {}  # what etcd holds of ours under the lease
        self._next_refresh = 0.0
        self._closed = False
        self.leases_granted = 0  # 1 + re-registrations after a lost lease
        self.relists = 0  # listings after the first (watch resumed)
        self.rejected = 0  # malformed records seen
        self.last_error: str = ""
        self._down = {"keeper": False, "follower": False}

    # --- the Discovery interface ----------------------------------------------------------------
    async def start(self) -> None:
        """Start following the prefix; wait (bounded) for the first listing."""
        self._start_following()
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._listed.wait()
        except TimeoutError:
            raise DiscoveryUnavailable(f"cannot reach etcd at {self._where()} within {self.timeout_s:g} s"
                                       f"{self._why()}") from None

    async def register(self, instance: Instance) -> None:
        check_instance(instance)
        if self._closed:
            raise RuntimeError("discovery client is closed")
        iid = instance.instance_id
        self._own[iid] = instance
        self._mine.add(iid)
        self._apply()
        gen = self._changed()
        if not await self._wait_synced(gen):
            if self._own.get(iid) is instance:  # not in etcd in time: take it back (the keeper deletes it)
                del self._own[iid]
                self._apply()
                self._changed()
            raise DiscoveryUnavailable(f"cannot register {iid} in etcd at {self._where()} within "
                                       f"{self.timeout_s:g} s{self._why()}")

    async def unregister(self, instance_id: str) -> None:
        if self._own.pop(instance_id, None) is None:
            return
        self._apply()
        if not await self._wait_synced(self._changed()):
            log.warning("etcd discovery: could not delete %s in %g s%s; it leaves with its lease",
                        instance_id, self.timeout_s, self._why())

    def instances(self, component: str | None = None) -> list[Instance]:
        """The view as of the last etcd event (empty before the first listing)."""
        self._start_following()
        return select(self._view, component)

    def watch(self) -> AsyncIterator[DiscoveryEvent]:
        if self._closed:
            raise RuntimeError("discovery client is closed")
        self._start_following()
        if self._listed.is_set():  # the snapshot is taken now, as memory and file discovery do
            return self._watchers.watch(select(self._view, None))
        return self._watch()

    async def _watch(self) -> AsyncIterator[DiscoveryEvent]:
        """Before the first listing: wait for it (bounded), then the snapshot and the changes."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.timeout_s):
                await self._listed.wait()
        async for ev in self._watchers.watch(select(self._view, None)):
            yield ev

    async def close(self) -> None:
        """Revoke the lease (this client's keys leave at once), stop, end watches."""
        if self._closed:
            return
        self._closed = True
        await cancel_and_wait([t for t in (self._keeper, self._follower) if t is not None], self.timeout_s)
        lease, self._lease = self._lease, None
        if lease is not None:
            try:
                async with asyncio.timeout(self.op_timeout_s):
                    await self._writer.get().revoke_lease(lease)
            except ERRORS as e:
                log.warning("etcd discovery: could not revoke lease %x (%s); its keys expire in %d s",
                            lease, text(e), self.ttl)
        self._own.clear()
        self._apply()  # own watches see own instances leave
        self._watchers.close()
        await self._writer.close()
        await self._reader.close()

    @property
    def lease_id(self) -> int | None:
        return self._lease

    # --- keeper: the only writer ------------------------------------------------------------------
    def _changed(self) -> int:
        self._gen += 1
        self._wake.set()
        if self._keeper is None and not self._closed:
            self._keeper = asyncio.get_running_loop().create_task(self._keep())
        return self._gen

    async def _wait_synced(self, gen: int) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s):
                while self._synced_gen < gen:
                    await self._synced.wait()
            return True
        except TimeoutError:
            return False

    async def _keep(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            self._wake.clear()
            try:
                gen = self._gen
                await self._sync()
                self._mark_synced(gen)
                if self._lease is not None and loop.time() >= self._next_refresh:
                    await self._refresh()
                    if self._lease is None:
                        continue  # lost: grant a new one and put the keys again, now
                self._up("keeper")
                failures = 0
            except ERRORS as e:
                if lease_not_found(e):  # expired between a refresh and a put: start over
                    log.warning("etcd discovery: lease %x is gone; registering again", self._lease or 0)
                    self._lease, self._written = None, {}
                    continue
                failures += 1
                self._fail("keeper", e)
                await self._writer.failed()
                delay = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** (failures - 1))
                self._next_refresh = loop.time() + delay
                await asyncio.sleep(delay)
                continue
            if self._gen != self._synced_gen:
                continue
            wait = None if self._lease is None else max(0.0, self._next_refresh - loop.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _sync(self) -> None:
        """Make etcd hold exactly ``_own`` under the lease (granting one when needed)."""
        client = self._writer.get()
        if self._own and self._lease is None:
            async with asyncio.timeout(self.op_timeout_s):
                lease = await client.lease(self.ttl)
            self._lease, self._written = lease.id, {}
            self.leases_granted += 1
            self._next_refresh = asyncio.get_running_loop().time() + self.keepalive_s
            if self.leases_granted > 1:
                log.warning("etcd discovery: registering %d instance(s) again under a new lease %x",
                            len(self._own), lease.id)
        for iid, inst in list(self._own.items()):
            if self._written.get(iid) is not inst:
                async with asyncio.timeout(self.op_timeout_s):
                    await client.put(self._key(iid), _encoder.encode(inst), lease=self._lease)
                self._written[iid] = inst
        for iid in [i for i in self._written if i not in self._own]:
            async with asyncio.timeout(self.op_timeout_s):
                await client.delete(self._key(iid))
            del self._written[iid]

    async def _refresh(self) -> None:
        assert self._lease is not None
        async with asyncio.timeout(self.op_timeout_s):
            reply = await self._writer.get().refresh_lease(self._lease)
        self._next_refresh = asyncio.get_running_loop().time() + self.keepalive_s
        if reply is None or reply.TTL <= 0:
            log.warning("etcd discovery: lease %x is gone (expired while etcd was out of reach, or etcd "
                        "lost its data); registering again", self._lease)
            self._lease, self._written = None, {}

    def _mark_synced(self, gen: int) -> None:
        if gen > self._synced_gen:
            self._synced_gen = gen
            self._synced.set()
            self._synced = asyncio.Event()

    # --- follower: the view -----------------------------------------------------------------------
    def _start_following(self) -> None:
        if self._follower is None and not self._closed:
            self._follower = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        failures = 0
        while True:
            try:
                client = self._reader.get()
                async with asyncio.timeout(self.op_timeout_s):
                    listing = await client.get_prefix(self._key_prefix)
                remote: dict[str, Instance] = {}
                for kv in listing:
                    inst = self._decode(kv.key, kv.value)
                    if inst is not None:
                        remote[inst.instance_id] = inst
                if self._listed.is_set():
                    self.relists += 1
                self._remote = remote
                self._apply()
                self._listed.set()
                async with asyncio.timeout(self.op_timeout_s):
                    watch = await client.watch_prefix(self._key_prefix,
                                                      start_revision=listing.header.revision + 1)
                self._up("follower")
                failures = 0
                async for ev in watch:
                    self._on_event(ev)
                log.info("etcd discovery: the watch ended; listing again")
                await self._reader.failed()
                await asyncio.sleep(BACKOFF_MIN_S)
            except ERRORS as e:
                failures += 1
                self._fail("follower", e)
                await self._reader.failed()  # a new client: aetcd's watcher is not reused after a failure
                await asyncio.sleep(min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** (failures - 1)))

    def _on_event(self, ev: Any) -> None:
        key = bytes(ev.kv.key)
        iid = key[len(self._key_prefix):].decode("utf-8", "replace")
        if ev.kind == aetcd.EventKind.PUT:
            inst = self._decode(key, ev.kv.value)
            if inst is None:
                self._remote.pop(iid, None)
            else:
                self._remote[iid] = inst
        else:
            self._remote.pop(iid, None)
        self._apply()

    def _decode(self, key: bytes, value: bytes) -> Instance | None:
        iid = key[len(self._key_prefix):].decode("utf-8", "replace")
        try:
            inst = _decoder.decode(value)
            check_instance(inst)
            if inst.instance_id != iid:
                raise ValueError(f"the record names {inst.instance_id!r}")
        except (msgspec.DecodeError, ValueError) as e:
            self.rejected += 1
            log.warning("etcd discovery: ignoring malformed record %s: %s", key.decode("utf-8", "replace"), e)
            return None
        return inst

    def _apply(self) -> None:
        new = {iid: inst for iid, inst in self._remote.items() if iid not in self._mine}
        new.update(self._own)
        apply_view(self._view, new, self._watchers)

    # --- helpers ----------------------------------------------------------------------------------
    def _key(self, instance_id: str) -> bytes:
        return self._key_prefix + instance_id.encode()

    def _where(self) -> str:
        return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.endpoints)

    def _why(self) -> str:
        return f" ({self.last_error})" if self.last_error else ""

    def _fail(self, who: str, e: BaseException) -> None:
        self.last_error = text(e)
        if not self._down[who]:
            self._down[who] = True
            log.warning("etcd discovery: %s lost etcd at %s: %s; retrying", who,
                        (self._writer if who == "keeper" else self._reader).endpoint, self.last_error)

    def _up(self, who: str) -> None:
        if self._down[who]:
            self._down[who] = False
            log.warning("etcd discovery: %s reached etcd again", who)

