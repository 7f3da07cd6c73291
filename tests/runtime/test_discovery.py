"""Discovery: memory (one process) and file (processes of one machine) watch semantics and liveness."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from turbine.protocols.model_card import ModelCard
from turbine.runtime.discovery import (
    DiscoveryEvent,
    Instance,
    MemoryDiscovery,
    MemoryStore,
    make_discovery,
)
from turbine.runtime.discovery_file import FileDiscovery

CHILD = Path(__file__).with_name("runtime_child.py")
REPO = Path(__file__).resolve().parents[2]
CARD = ModelCard(model_name="m", tokenizer_source="/tmp/tok", block_size=16, total_kv_blocks=100,
                 max_num_seqs=8, context_length=2048)


def inst(iid: str, component: str = "worker", **kw: object) -> Instance:
    return Instance(instance_id=iid, component=component, endpoint="generate",
                    address=f"tcp://127.0.0.1:{1000 + len(iid)}", **kw)  # type: ignore[arg-type]


async def next_event(watch: AsyncIterator[DiscoveryEvent], timeout: float = 2.0) -> tuple[str, str]:
    ev = await asyncio.wait_for(anext(watch), timeout)
    return ev.kind, ev.instance.instance_id


# --- memory --------------------------------------------------------------------------------------
async def test_memory_watch_starts_with_current_then_follows_changes() -> None:
    store = MemoryStore()
    a, b = MemoryDiscovery(store), MemoryDiscovery(store)
    await a.register(inst("w1", model_card=CARD, event_address="tcp://127.0.0.1:5"))
    watch = b.watch()
    assert await next_event(watch) == ("added", "w1")
    await a.register(inst("w2"))
    assert await next_event(watch) == ("added", "w2")
    await a.unregister("w1")
    ev = await asyncio.wait_for(anext(watch), 1)
    assert ev.kind == "removed" and ev.instance.model_card == CARD  # the last record seen
    assert [i.instance_id for i in b.instances()] == ["w2"]
    await a.close()  # unregisters w2
    assert await next_event(watch) == ("removed", "w2")
    await b.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(watch), 1)


async def test_memory_update_is_an_added_event_and_component_filter() -> None:
    d = MemoryDiscovery()
    await d.register(inst("w1"))
    await d.register(inst("f1", component="frontend"))
    watch = d.watch()
    assert {await next_event(watch), await next_event(watch)} == {("added", "w1"), ("added", "f1")}
    await d.register(inst("w1", metadata={"zone": "a"}))
    ev = await asyncio.wait_for(anext(watch), 1)
    assert ev.kind == "added" and ev.instance.metadata == {"zone": "a"}
    await d.register(inst("w1", metadata={"zone": "a"}))  # unchanged: no event
    assert [i.instance_id for i in d.instances("worker")] == ["w1"]
    assert [i.instance_id for i in d.instances()] == ["f1", "w1"]
    await d.close()
    assert d.instances() == []
    assert [e async for e in watch] == [DiscoveryEvent("removed", inst("w1", metadata={"zone": "a"})),
                                        DiscoveryEvent("removed", inst("f1", component="frontend"))]


async def test_instance_ids_are_validated() -> None:
    d = MemoryDiscovery()
    for bad in ("", "../etc", "a/b", ".hidden", "x" * 300):
        with pytest.raises(ValueError):
            await d.register(inst(bad))


# --- file ----------------------------------------------------------------------------------------
FAST = {"ttl_s": 1.0, "heartbeat_s": 0.1, "poll_s": 0.05}


async def test_file_discovery_between_clients(tmp_path: Path) -> None:
    a = FileDiscovery(tmp_path, **FAST)
    b = FileDiscovery(tmp_path, **FAST)
    try:
        watch = b.watch()
        t0 = time.monotonic()
        await a.register(inst("w1", model_card=CARD))
        assert await next_event(watch) == ("added", "w1")
        assert time.monotonic() - t0 < 0.5
        assert b.instances()[0].model_card == CARD
        assert sorted(os.listdir(tmp_path)) == ["w1.json"]  # no temp files left behind
        await asyncio.sleep(1.5 * FAST["ttl_s"])  # heartbeats keep it alive past the TTL
        assert [i.instance_id for i in b.instances()] == ["w1"]
        await a.unregister("w1")
        assert not (tmp_path / "w1.json").exists()
        assert await next_event(watch) == ("removed", "w1")
    finally:
        await a.close()
        await b.close()


async def test_file_close_deletes_own_records(tmp_path: Path) -> None:
    a = FileDiscovery(tmp_path, **FAST)
    await a.register(inst("w1"))
    await a.register(inst("w2"))
    assert [i.instance_id for i in a.instances()] == ["w1", "w2"]
    await a.close()
    assert os.listdir(tmp_path) == []


async def test_stale_and_unreadable_records(tmp_path: Path) -> None:
    (tmp_path / "junk.json").write_bytes(b"{not json")
    d = FileDiscovery(tmp_path, **FAST)
    other = FileDiscovery(tmp_path, **FAST)
    try:
        await other.register(inst("old"))
        assert [i.instance_id for i in d.instances()] == ["old"]  # junk is ignored
        # A record whose heartbeat stopped is dead for readers, and gets deleted.
        other._heartbeat_task.cancel()  # type: ignore[union-attr]
        watch = d.watch()
        assert await next_event(watch) == ("added", "old")
        assert await next_event(watch, timeout=3) == ("removed", "old")
        assert not (tmp_path / "old.json").exists()
    finally:
        await d.close()
        await other.close()


async def test_owner_rewrites_a_record_deleted_under_it(tmp_path: Path) -> None:
    a = FileDiscovery(tmp_path, **FAST)
    try:
        await a.register(inst("w1"))
        (tmp_path / "w1.json").unlink()
        for _ in range(40):
            await asyncio.sleep(0.05)
            if (tmp_path / "w1.json").exists():
                break
        assert (tmp_path / "w1.json").exists()
    finally:
        await a.close()


async def test_sigkilled_process_disappears_and_new_one_appears(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    watcher = FileDiscovery(tmp_path)  # default ttl 3 s, poll 0.2 s
    procs = []
    try:
        watch = watcher.watch()

        async def spawn(iid: str) -> subprocess.Popen[bytes]:
            p = subprocess.Popen([sys.executable, str(CHILD), "file-register", str(tmp_path), iid],
                                 stdout=subprocess.PIPE, env=env)
            procs.append(p)
            assert p.stdout is not None
            assert await asyncio.wait_for(asyncio.to_thread(p.stdout.readline), 20) == b"ready\n"
            return p

        p1 = await spawn("victim")
        assert await next_event(watch, timeout=1) == ("added", "victim")
        p1.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        assert await next_event(watch, timeout=5) == ("removed", "victim")
        assert time.monotonic() - t0 < 5.0
        t1 = time.monotonic()
        await spawn("fresh")
        assert await next_event(watch, timeout=1) == ("added", "fresh")
        assert time.monotonic() - t1 < 1.5  # includes the child's interpreter start
    finally:
        for p in procs:
            p.kill()
            p.wait()
        await watcher.close()


async def test_file_options_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        FileDiscovery(tmp_path, ttl_s=1.0, heartbeat_s=1.0)
    with pytest.raises(ValueError):
        FileDiscovery(tmp_path, poll_s=0)


async def test_make_discovery(tmp_path: Path) -> None:
    assert isinstance(make_discovery("memory"), MemoryDiscovery)
    store = MemoryStore()
    assert make_discovery("memory", store=store).store is store  # type: ignore[attr-defined]
    d = make_discovery("file", tmp_path, poll_s=0.1)
    assert isinstance(d, FileDiscovery) and d.directory == str(tmp_path) and d.poll_s == 0.1
    with pytest.raises(ValueError):
        make_discovery("zookeeper")  # type: ignore[arg-type]
