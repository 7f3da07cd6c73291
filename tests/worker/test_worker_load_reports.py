"""A worker publishes its load after a change, at most every ``load_interval_s``, and only when
it differs from what it last published; a heartbeat once a second regardless."""
from __future__ import annotations

import asyncio
import types

import msgspec
import pytest

from turbine.engine.base import EngineStats
from turbine.protocols.load import WorkerLoad
from turbine.worker import worker as worker_mod
from turbine.worker.worker import Worker


class _Publisher:
    def __init__(self) -> None:
        self.loads: list[WorkerLoad] = []

    def publish(self, topic: str, payload: bytes) -> int:
        assert topic == "load"
        self.loads.append(msgspec.msgpack.decode(payload, type=WorkerLoad))
        return len(self.loads)


async def _until(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.002)


async def test_unchanged_load_is_not_republished_but_a_heartbeat_is(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(worker_mod, "LOAD_HEARTBEAT_S", 1.0)
    stats = {"s": EngineStats(kv_active_blocks=4, kv_total_blocks=100, num_running=1, num_waiting=0)}
    engine = types.SimpleNamespace(stats=lambda: stats["s"])
    card = types.SimpleNamespace(model_name="tiny")
    pub = _Publisher()
    w = Worker(engine, card, discovery=None, server=None, publisher=pub, worker_id="w",  # type: ignore[arg-type]
               load_interval_s=0.005)
    task = asyncio.create_task(w._publish_load_loop())
    try:
        w._load_dirty.set()
        await _until(lambda: len(pub.loads) == 1)
        t0 = asyncio.get_running_loop().time()
        for _ in range(20):  # twenty steps' KV events, nothing a router reads changed
            w._load_dirty.set()
            await asyncio.sleep(0.006)
        if asyncio.get_running_loop().time() - t0 < 0.9:  # (a machine this slow would see the heartbeat)
            assert len(pub.loads) == 1 and pub.loads[0].num_running == 1
        stats["s"] = stats["s"]._replace(num_waiting=2)  # a request queued: published within the interval
        w._load_dirty.set()
        await _until(lambda: pub.loads[-1].num_waiting == 2)
        n = len(pub.loads)
        await _until(lambda: len(pub.loads) == n + 1)  # no change, no dirt: the heartbeat still comes
        assert pub.loads[-1].num_waiting == 2 and w.load_reports == len(pub.loads)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_busy_worker_reports_admissions_and_finishes_that_no_kv_event_marks(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A short prompt fills no block: its admission (waiting -> running) and its end come with no
    KV event, yet a router must see them within the interval, not at the next heartbeat."""
    monkeypatch.setattr(worker_mod, "LOAD_HEARTBEAT_S", 30.0)
    stats = {"s": EngineStats(kv_active_blocks=1, kv_total_blocks=100, num_running=0, num_waiting=1)}
    pub = _Publisher()
    w = Worker(types.SimpleNamespace(stats=lambda: stats["s"]), types.SimpleNamespace(model_name="tiny"),  # type: ignore[arg-type]
               discovery=None, server=None, publisher=pub, worker_id="w", load_interval_s=0.005)  # type: ignore[arg-type]
    task = asyncio.create_task(w._publish_load_loop())
    try:
        w._load_dirty.set()  # the request arrived
        await _until(lambda: len(pub.loads) == 1)
        stats["s"] = stats["s"]._replace(num_running=1, num_waiting=0)  # admitted: no event, no dirt
        await _until(lambda: pub.loads[-1].num_running == 1, timeout=2.0)
        stats["s"] = stats["s"]._replace(num_running=0, kv_active_blocks=0)  # finished
        await _until(lambda: pub.loads[-1].num_running == 0, timeout=2.0)
        n = len(pub.loads)
        await asyncio.sleep(0.05)  # idle again: it waits for dirt, publishing nothing new
        assert len(pub.loads) == n
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_cancel_that_lands_as_the_load_turns_dirty_stops_the_loop() -> None:
    """The shutdown hang CI met: with ``asyncio.wait_for`` around the dirty-event wait, Python
    3.11 dropped a cancellation arriving in the same loop turn as a KV event, and
    ``Worker.stop`` waited for the loop forever."""
    stats = EngineStats(kv_active_blocks=0, kv_total_blocks=100, num_running=0, num_waiting=0)
    w = Worker(types.SimpleNamespace(stats=lambda: stats), types.SimpleNamespace(model_name="tiny"),  # type: ignore[arg-type]
               discovery=None, server=None, publisher=_Publisher(), worker_id="w", load_interval_s=0.001)  # type: ignore[arg-type]
    for _ in range(20):
        task = asyncio.create_task(w._publish_load_loop())
        await asyncio.sleep(0.003)  # it published, slept its interval, and waits for dirt again
        w._load_dirty.set()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2.0)
        assert done and task.cancelled()


def test_the_interval_is_checked() -> None:
    with pytest.raises(ValueError, match="load_interval_s"):
        Worker(None, None, discovery=None, server=None, load_interval_s=0)  # type: ignore[arg-type]
