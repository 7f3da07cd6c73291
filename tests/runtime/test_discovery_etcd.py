"""etcd discovery against a real etcd (Debian's etcd-server, started by the fixtures): leases,
keep-alive, watches, re-registration after a lost lease or a lost etcd, watch resume."""
from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

pytest.importorskip("aetcd")

from turbine.protocols.model_card import ModelCard  # noqa: E402
from turbine.runtime.config import DiscoveryUrl  # noqa: E402
from turbine.runtime.discovery import DiscoveryEvent, DiscoveryUnavailable, Instance  # noqa: E402
from turbine.runtime.discovery_etcd import EtcdDiscovery  # noqa: E402

CHILD = Path(__file__).with_name("runtime_child.py")
CARD = ModelCard(model_name="m", tokenizer_source="/tmp/tok", block_size=16, total_kv_blocks=100,
                 max_num_seqs=8, context_length=2048)
_names = itertools.count()


def inst(iid: str, **kw: object) -> Instance:
    return Instance(instance_id=iid, component="worker", endpoint="generate", address="tcp://127.0.0.1:1",
                    **kw)  # type: ignore[arg-type]


def fleet_url(etcd, name: str | None = None) -> str:  # type: ignore[no-untyped-def]
    """A prefix of this test's own on a shared etcd."""
    return f"{etcd.url}/t{os.getpid()}-{next(_names)}-{name or 'x'}"


def client(url: str, ttl: float = 2.0, **kw: object) -> EtcdDiscovery:
    u = DiscoveryUrl.parse(url)
    return EtcdDiscovery(u.endpoints, prefix=u.prefix, ttl_s=ttl, **kw)  # type: ignore[arg-type]


async def until(watch: AsyncIterator[DiscoveryEvent], kind: str, iid: str, timeout: float) -> float:
    """Seconds until ``watch`` yields (kind, iid); other events are skipped."""
    t0 = time.monotonic()
    async with asyncio.timeout(timeout):
        async for ev in watch:
            if (ev.kind, ev.instance.instance_id) == (kind, iid):
                return time.monotonic() - t0
    raise AssertionError("the watch ended")


async def test_register_watch_unregister_with_model_card(etcd) -> None:  # type: ignore[no-untyped-def]
    url = fleet_url(etcd)
    a, b = client(url), client(url)
    try:
        await b.start()
        watch = b.watch()
        await a.register(inst("w1", model_card=CARD, event_address="tcp://127.0.0.1:5"))
        ev = await asyncio.wait_for(anext(watch), 3)
        assert ev.kind == "added" and ev.instance.model_card == CARD and ev.instance.event_address
        assert [i.instance_id for i in b.instances("worker")] == ["w1"]
        assert [i.instance_id for i in a.instances()] == ["w1"]  # own records at once
        # a late watcher starts from a snapshot
        c = client(url)
        await c.start()
        assert [i.instance_id for i in c.instances()] == ["w1"]
        await c.close()
        await a.unregister("w1")
        ev = await asyncio.wait_for(anext(watch), 3)
        assert ev.kind == "removed" and ev.instance.model_card == CARD
        assert a.leases_granted == 1
    finally:
        await a.close()
        await b.close()


async def test_close_revokes_the_lease_and_watchers_see_it_at_once(etcd) -> None:  # type: ignore[no-untyped-def]
    url = fleet_url(etcd)
    a, b = client(url, ttl=30), client(url)
    try:
        await b.start()
        watch = b.watch()
        await a.register(inst("w1"))
        await a.register(inst("w2"))
        await until(watch, "added", "w2", 3)
        await a.close()
        assert await until(watch, "removed", "w1", 3) < 1.0  # not after the 30 s TTL
    finally:
        await a.close()
        await b.close()


async def test_a_sigkilled_process_leaves_when_its_lease_expires(etcd) -> None:  # type: ignore[no-untyped-def]
    url = fleet_url(etcd)
    watcher = client(url)
    child = subprocess.Popen([sys.executable, str(CHILD), "etcd-register", url, "2", "doomed"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
        await watcher.start()
        assert [i.instance_id for i in watcher.instances()] == ["doomed"]
        watch = watcher.watch()
        await until(watch, "added", "doomed", 2)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        gone = await until(watch, "removed", "doomed", 8)
        assert 0.5 < gone < 4.0, gone  # TTL 2 s (+ etcd's 0.5 s expiry check)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        await watcher.close()


async def test_a_lost_lease_is_replaced_and_the_keys_put_again(etcd) -> None:  # type: ignore[no-untyped-def]
    """etcd forgets the lease (as when it expired while the worker was cut off): the worker
    registers again under a new lease at its next keep-alive, without restarting."""
    url = fleet_url(etcd)
    owner, watcher, admin = client(url), client(url), client(url)
    try:
        await owner.register(inst("w1", model_card=CARD))
        await watcher.start()
        watch = watcher.watch()
        await until(watch, "added", "w1", 2)
        old = owner.lease_id
        assert old is not None
        await admin._writer.get().revoke_lease(old)  # what expiry does
        await until(watch, "removed", "w1", 2)
        back = await until(watch, "added", "w1", 4)  # keep-alive every ttl/3
        assert back < 2.0
        assert owner.leases_granted == 2 and owner.lease_id != old
        assert [i.instance_id for i in watcher.instances()] == ["w1"]
    finally:
        for d in (owner, watcher, admin):
            await d.close()


async def test_etcd_restart_watch_resumes_and_keys_survive(etcd_private) -> None:  # type: ignore[no-untyped-def]
    """etcd restarts with its data: leases and keys survive, the watch resumes (re-list +
    re-watch) and sees what changes afterwards."""
    url = f"{etcd_private.url}/fleet"
    owner, watcher, other = client(url, ttl=5), client(url), client(url, ttl=5)
    try:
        await owner.register(inst("w1"))
        await watcher.start()
        watch = watcher.watch()
        await until(watch, "added", "w1", 2)
        etcd_private.kill()
        await asyncio.sleep(0.5)
        assert [i.instance_id for i in watcher.instances()] == ["w1"]  # the last view stays
        await asyncio.to_thread(etcd_private.restart)
        await other.register(inst("w2"))  # after the restart
        await until(watch, "added", "w2", 10)
        assert watcher.relists >= 1
        assert sorted(i.instance_id for i in watcher.instances()) == ["w1", "w2"]
        assert owner.leases_granted == 1  # its lease was restored with etcd's data
    finally:
        for d in (owner, watcher, other):
            await d.close()


async def test_etcd_that_lost_its_data_gets_everything_registered_again(etcd_private) -> None:  # type: ignore[no-untyped-def]
    """A fresh etcd on the same address (data lost): every live client puts its keys again under
    a new lease, the watcher re-lists and resumes, and what no one re-registers is removed."""
    url = f"{etcd_private.url}/fleet"
    owner, watcher = client(url), client(url)
    ghost = subprocess.Popen([sys.executable, str(CHILD), "etcd-register", url, "30", "ghost"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert ghost.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
        await owner.register(inst("w1", model_card=CARD))
        await watcher.start()
        watch = watcher.watch()
        await until(watch, "added", "w1", 2)  # the watch is open (its snapshot: ghost, w1)
        assert sorted(i.instance_id for i in watcher.instances()) == ["ghost", "w1"]
        ghost.kill()  # dies while etcd is down: nothing will put its key back
        ghost.wait()
        etcd_private.kill()
        await asyncio.to_thread(etcd_private.restart, wipe=True)
        await until(watch, "removed", "ghost", 10)
        async with asyncio.timeout(6):  # w1 was put back (its removal, if the re-list came first, and return)
            while [i.instance_id for i in watcher.instances()] != ["w1"]:
                await asyncio.sleep(0.05)
        assert owner.leases_granted == 2
        assert watcher.relists >= 1
    finally:
        if ghost.poll() is None:
            ghost.kill()
            ghost.wait()
        await owner.close()
        await watcher.close()


async def test_register_without_etcd_fails_in_bounded_time(tmp_path: Path) -> None:
    from etcdkit import free_ports

    port = free_ports(1)[0]  # nothing listens there
    d = client(f"etcd://127.0.0.1:{port}/x", timeout_s=1.5)
    try:
        t0 = time.monotonic()
        with pytest.raises(DiscoveryUnavailable, match="cannot reach etcd"):
            await d.start()
        with pytest.raises(DiscoveryUnavailable, match="cannot register w1"):
            await d.register(inst("w1"))
        assert time.monotonic() - t0 < 5
        assert d.instances() == []
    finally:
        t0 = time.monotonic()
        await d.close()
        assert time.monotonic() - t0 < 3


async def test_a_second_endpoint_is_used_when_the_first_is_down(etcd) -> None:  # type: ignore[no-untyped-def]
    from etcdkit import free_ports

    dead = free_ports(1)[0]
    url = f"etcd://127.0.0.1:{dead},{etcd.endpoint}/t{os.getpid()}-multi"
    a, b = client(url, timeout_s=8), client(url, timeout_s=8)
    try:
        await a.register(inst("w1"))
        await b.start()
        assert [i.instance_id for i in b.instances()] == ["w1"]
    finally:
        await a.close()
        await b.close()


async def test_malformed_records_are_skipped_and_counted(etcd) -> None:  # type: ignore[no-untyped-def]
    url = fleet_url(etcd)
    w, admin = client(url), client(url)
    try:
        prefix = DiscoveryUrl.parse(url).prefix
        raw = admin._writer.get()
        await raw.put(f"{prefix}/instances/bad".encode(), b"{not json")
        await raw.put(f"{prefix}/instances/liar".encode(), msgspec.json.encode(inst("someone-else")))
        await admin.register(inst("good"))
        await w.start()
        assert [i.instance_id for i in w.instances()] == ["good"]
        assert w.rejected == 2
        await raw.delete(f"{prefix}/instances/bad".encode())
        await raw.delete(f"{prefix}/instances/liar".encode())
    finally:
        await w.close()
        await admin.close()


async def test_closing_a_client_that_swallows_its_cancellation_is_still_bounded() -> None:
    """aetcd's watcher catches the CancelledError of a close it awaits (Watcher._terminate_stream);
    a timeout around that close would be swallowed and close() would wait on. Ours returns."""
    from turbine.runtime import etcd_client

    release = asyncio.Event()

    class Stubborn:
        async def close(self) -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass  # as aetcd does
            await release.wait()  # and then waits on, with no timer of its own

    t0 = time.monotonic()
    await etcd_client.close_bounded(Stubborn(), 0.3)  # type: ignore[arg-type]
    assert time.monotonic() - t0 < 1.0
    assert len(etcd_client.teardowns) == 1  # left to finish, still referenced
    release.set()
    await asyncio.wait(set(etcd_client.teardowns), timeout=2)
    assert not etcd_client.teardowns

