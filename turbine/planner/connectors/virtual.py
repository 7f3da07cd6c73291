"""Workers inside the fleet simulator: the planner's decisions on a virtual clock.

A started worker costs GPUs from the moment it is asked for and becomes routable ``startup_s``
later (the model loading). A removed worker is drained the way the local connector drains a
process: it leaves routing at once, finishes what it holds (running requests, KV held for a
transfer, a pull in progress), then leaves the fleet; its GPUs are counted until then. Starting
workers are cancelled first, then the least loaded serving ones.
"""
from __future__ import annotations

from turbine.sim.simulator import Simulator

_PREFIX = {"agg": "worker-", "prefill": "prefill-", "decode": "decode-"}


class VirtualConnector:
    def __init__(self, sim: Simulator, *, gpus_per_worker: dict[str, int] | None = None,
                 startup_s: float = 30.0) -> None:
        if startup_s < 0:
            raise ValueError(f"startup_s must be >= 0, got {startup_s}")
        self.sim = sim
        self.gpus = {"agg": 1, "prefill": 1, "decode": 1, **(gpus_per_worker or {})}
        self.startup_s = startup_s
        self.started: dict[str, float] = dict.fromkeys(sim.worker_ids, 0.0)  # worker -> when it was asked for
        self.ready_at: dict[str, float] = dict.fromkeys(sim.worker_ids, 0.0)
        self._removed: set[str] = set()

    @staticmethod
    def pool_of(worker_id: str) -> str:
        return next(p for p, prefix in _PREFIX.items() if worker_id.startswith(prefix))

    def members(self, pool: str) -> list[str]:
        """Workers of ``pool`` that serve or are starting (draining and gone ones excluded)."""
        return [w for w in self.started if w not in self._removed and self.pool_of(w) == pool]

    def current_now(self) -> dict[str, int]:
        pools = ("prefill", "decode") if self.sim.cfg.disaggregated else ("agg",)
        return {p: len(self.members(p)) for p in pools}

    def scale_now(self, pool: str, replicas: int) -> None:
        if pool not in self.current_now() or replicas < 0:
            raise ValueError(f"cannot scale pool {pool!r} to {replicas}")
        live = self.members(pool)
        now = self.sim.now
        for _ in range(replicas - len(live)):
            wid = self.sim.add_worker(pool, self.startup_s)
            self.started[wid] = now
            self.ready_at[wid] = now + self.startup_s
        if replicas < len(live):
            cores, index = self.sim.cores, self.sim._index

            def order(w: str) -> tuple[bool, int]:  # starting ones first, then the least loaded
                s = cores[index[w]].scheduler
                return self.sim.routable(w), s.num_running + s.num_waiting
            for w in sorted(live, key=order)[: len(live) - replicas]:
                self._removed.add(w)
                self.sim.drain_worker(w)

    def gpu_seconds(self, until: float | None = None) -> float:
        """GPU-seconds held so far: each worker from its request to its exit (or ``until``)."""
        end = self.sim.now if until is None else until
        retired = self.sim.retired
        return sum((min(end, retired.get(w, end)) - t0) * self.gpus[self.pool_of(w)]
                   for w, t0 in self.started.items() if t0 < end)

    # -- the Connector protocol (the async runner drives the same fleet) -------------------------
    async def current(self) -> dict[str, int]:
        return self.current_now()

    async def scale(self, pool: str, replicas: int) -> None:
        self.scale_now(pool, replicas)

    async def close(self) -> None:
        """Nothing to stop: the simulation ends with its requests."""


__all__ = ["VirtualConnector"]
