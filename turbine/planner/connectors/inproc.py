"""Workers inside `turbine serve`: the planner grows and drains the process's own fleet."""
from __future__ import annotations

import asyncio
import logging

from turbine.launch import Deployment

log = logging.getLogger("turbine.planner.inproc")

_CARD_ROLE = {"agg": "aggregated", "prefill": "prefill", "decode": "decode"}


class InProcConnector:
    def __init__(self, deployment: Deployment) -> None:
        self.dep = deployment
        self._draining: set[asyncio.Task[None]] = set()

    def _pool(self, pool: str) -> list:
        role = _CARD_ROLE[pool]
        return [w for w in self.dep.workers if w.card.role == role]

    async def current(self) -> dict[str, int]:
        return {pool: len(self._pool(pool)) for pool in _CARD_ROLE}

    async def scale(self, pool: str, replicas: int) -> None:
        if pool not in _CARD_ROLE or replicas < 0:
            raise ValueError(f"cannot scale pool {pool!r} to {replicas}")
        live = self._pool(pool)
        if replicas > len(live):
            new = await self.dep.add_workers(_CARD_ROLE[pool], replicas - len(live))
            log.info("started %s worker(s) %s", pool, ", ".join(w.worker_id for w in new))
        for w in reversed(live[replicas:]):
            log.info("draining %s worker %s", pool, w.worker_id)
            task = asyncio.create_task(self.dep.remove_worker(w))  # leaves dep.workers at once
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)
        await asyncio.sleep(0)  # let each drain take the worker out of discovery before returning

    async def close(self) -> None:
        """Wait for workers still draining; the deployment stops the rest."""
        if self._draining:
            await asyncio.gather(*list(self._draining), return_exceptions=True)


__all__ = ["InProcConnector"]
