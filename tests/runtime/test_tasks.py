"""cancel_and_wait: owned tasks stop even when a library drops a cancellation, and a task that
will not stop does not hang its owner's shutdown."""
from __future__ import annotations

import asyncio
import time

from turbine.runtime.tasks import cancel_and_wait


async def test_a_task_that_dropped_its_cancellation_is_cancelled_again() -> None:
    async def dropper() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass  # dropped, as Python 3.11's wait_for does when its inner wait completes at that moment
        await asyncio.sleep(3600)

    task = asyncio.create_task(dropper())
    await asyncio.sleep(0)
    t0 = time.monotonic()
    assert await cancel_and_wait([task], 5.0)
    assert task.cancelled() and time.monotonic() - t0 < 1.0


async def test_a_task_that_never_stops_is_reported_not_waited_for_forever(caplog) -> None:  # type: ignore[no-untyped-def]
    released = False

    async def stubborn() -> None:
        while not released:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass

    ok = asyncio.create_task(asyncio.sleep(3600))
    bad = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    t0 = time.monotonic()
    assert not await cancel_and_wait([ok, bad], 0.3)
    assert 0.25 < time.monotonic() - t0 < 2.0
    assert ok.cancelled() and not bad.done()
    assert "stubborn" in caplog.text and "did not stop" in caplog.text
    released = True
    bad.cancel()
    await asyncio.wait({bad}, timeout=1.0)
    assert bad.done()


async def test_a_failed_task_is_logged_not_raised(caplog) -> None:  # type: ignore[no-untyped-def]
    async def boom() -> None:
        raise RuntimeError("lost connection")

    task = asyncio.create_task(boom())
    await asyncio.sleep(0)
    assert await cancel_and_wait([task], 1.0)
    assert "lost connection" in caplog.text
