"""The frontend's queue for requests no worker admits yet: order, bounds, deadlines, cancellation."""
from __future__ import annotations

import asyncio
import time

import pytest

from turbine.frontend.errors import ApiError
from turbine.frontend.route_queue import RouteQueue


class Slots:
    """A fleet with ``free`` admission slots; a kick after each release."""

    def __init__(self, queue: RouteQueue, free: int = 0) -> None:
        self.queue = queue
        self.free = free
        self.order: list[str] = []

    def attempt(self, name: str):  # noqa: ANN201
        def go() -> str | None:
            if self.free <= 0:
                return None
            self.free -= 1
            self.order.append(name)
            return name
        return go

    def release(self) -> None:
        self.free += 1
        self.queue.kick()


async def test_waiters_are_admitted_in_arrival_order() -> None:
    q = RouteQueue(16)
    fleet = Slots(q)
    tasks = [asyncio.create_task(q.admit(fleet.attempt(f"r{i}"), None)) for i in range(5)]
    await asyncio.sleep(0)
    assert len(q) == 5 and q.stats.queued == 5
    # a newcomer with a free slot in sight still queues behind them
    fleet.release()
    late = asyncio.create_task(q.admit(fleet.attempt("late"), None))
    for _ in range(5):
        fleet.release()
        await asyncio.sleep(0.01)
    assert [await t for t in tasks] == ["r0", "r1", "r2", "r3", "r4"]
    fleet.release()
    assert await late == "late"
    assert fleet.order == ["r0", "r1", "r2", "r3", "r4", "late"] and len(q) == 0


async def test_two_free_slots_admit_two_waiters_on_one_kick() -> None:
    q = RouteQueue(16)
    fleet = Slots(q)
    tasks = [asyncio.create_task(q.admit(fleet.attempt(f"r{i}"), None)) for i in range(3)]
    await asyncio.sleep(0)
    fleet.free = 2
    q.kick()  # the head admits and hands the turn on while capacity remains
    await asyncio.sleep(0.01)
    assert fleet.order == ["r0", "r1"] and not tasks[2].done()
    fleet.release()
    await asyncio.gather(*tasks)


async def test_a_full_queue_answers_503_and_a_deadline_504() -> None:
    q = RouteQueue(1)
    fleet = Slots(q)
    waiting = asyncio.create_task(q.admit(fleet.attempt("a"), time.monotonic() + 0.05))
    await asyncio.sleep(0)
    with pytest.raises(ApiError) as full:
        await q.admit(fleet.attempt("b"), None)
    assert full.value.status == 503 and ("retry-after", "1") in (full.value.headers or [])
    assert q.stats.queue_rejected == 1
    with pytest.raises(ApiError) as late:
        await waiting
    assert late.value.status == 504 and len(q) == 0


async def test_a_cancelled_head_hands_the_turn_to_the_next() -> None:
    q = RouteQueue(8)
    fleet = Slots(q)
    head = asyncio.create_task(q.admit(fleet.attempt("head"), None))
    nxt = asyncio.create_task(q.admit(fleet.attempt("next"), None))
    await asyncio.sleep(0)
    fleet.free = 1
    head.cancel()  # the client went away before the kick
    await asyncio.sleep(0.01)
    assert await nxt == "next" and head.cancelled() and len(q) == 0
