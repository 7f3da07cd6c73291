"""Worker actors on a Ray cluster: the planner adds and drains `WorkerActor`s of a `RayFleet`.

A scale-up starts actors (each with the fleet's GPU and CPU request) and returns once they serve;
a scale-down drains the newest workers of the pool in the background (each leaves discovery,
finishes its requests, then its actor ends without restart). Ray restarts a worker whose process
dies, so the pool keeps its size between decisions.

``owns``: the connector started the fleet (`turbine planner --connector ray`), so ``close()``
drains every worker; inside `turbine serve --ray --planner` the fleet is the server's and
``close()`` only waits for the drains it began. Needs the ``ray`` extra.
"""
from __future__ import annotations

import asyncio
import logging

from turbine.deploy.ray_fleet import POOL_ROLE, RayFleet

log = logging.getLogger("turbine.planner.ray")


class RayConnector:
    def __init__(self, fleet: RayFleet, *, pools: tuple[str, ...] = ("agg",), owns: bool = False) -> None:
        for pool in pools:
            if pool not in POOL_ROLE:
                raise ValueError(f"unknown pool {pool!r} (pools: {', '.join(POOL_ROLE)})")
        self.fleet = fleet
        self.pools = pools
        self.owns = owns
        self._draining: set[asyncio.Task[None]] = set()

    async def current(self) -> dict[str, int]:
        return {pool: len(self.fleet.live(pool)) for pool in self.pools}

    async def scale(self, pool: str, replicas: int) -> None:
        if pool not in self.pools:
            raise ValueError(f"no pool {pool!r} here (pools: {', '.join(self.pools)})")
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise ValueError(f"replicas must be an int >= 0, not {replicas!r}")
        live = self.fleet.live(pool)
        if replicas > len(live):
            new = await self.fleet.add_workers(pool, replicas - len(live))
            log.info("started %d %s worker actor(s): %s", len(new), pool,
                     ", ".join(",".join(w.info["worker_ids"]) for w in new))
        for w in reversed(live[replicas:]):
            log.info("draining %s worker actor %s", pool, ",".join(w.info["worker_ids"]))
            w.draining = True  # out of current() at once
            task = asyncio.ensure_future(self.fleet.remove_worker(w))
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)

    async def wait_drained(self) -> None:
        if self._draining:
            await asyncio.gather(*list(self._draining), return_exceptions=True)

    async def close(self) -> None:
        await self.wait_drained()
        if self.owns:
            await self.fleet.stop()


__all__ = ["RayConnector"]
