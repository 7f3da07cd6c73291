"""Owned background tasks: cancel them and wait until each has finished (its cleanup ran),
within a bound.

Cancel *until done*: Python 3.11's ``asyncio.wait_for`` drops a cancellation that lands as its
inner wait completes (CPython gh-86296; aetcd's watch creation uses it), and a loop around it
then runs on with its task marked "cancelling" forever. Turbine's own code waits with
``async with asyncio.timeout(...)`` instead, which keeps a cancellation; this helper still
re-cancels, for libraries that do not.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

log = logging.getLogger("turbine.runtime")

RECANCEL_S = 0.1  # how long a cancelled task may run before it is cancelled again


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object]], timeout_s: float = 10.0) -> bool:
    """Cancel the tasks and wait for them, cancelling again each ``RECANCEL_S`` while they run;
    False (and a warning naming each) when some still run after ``timeout_s``. A task's own
    failure is logged, not raised: its owner is shutting it down."""
    tasks = list(tasks)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        left = deadline - loop.time()
        if left <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(RECANCEL_S, left))
    for t in pending:
        log.warning("%s did not stop within %g s of being cancelled", t.get_coro(), timeout_s)
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            log.warning("%s failed: %r", t.get_coro(), t.exception())
    return not pending
