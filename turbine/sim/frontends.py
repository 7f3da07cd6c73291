"""Several frontends in front of one simulated fleet (``SimConfig.frontends``).

Live, each frontend process has its own Router: it routes the requests its clients send, it
subscribes to every worker's KV events, and it learns of the other frontends' requests only
from the load every worker publishes (at most every 10 ms, ``worker.LOAD_MIN_INTERVAL_S``),
reconciled with its own bookkeeping (``Router.reported_load``). ``Frontends`` stands where the
simulator's one Router stood and does the same: requests alternate between the routers (a load
balancer in front), a request stays with the router that first saw it (its queue, its
``first_token``/``finished``), every KV event and fleet change reaches every router, and the
simulator hands it the workers' load reports on a timer.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from turbine.protocols.load import WorkerLoad
from turbine.router.router import Router

__all__ = ["Frontends"]


class Frontends:
    """N routers behind a round-robin balancer, with the subset of Router's interface the
    simulator calls (``route``, ``first_token``, ``finished``, ``apply_kv_events``,
    ``worker_added``/``worker_removed``, ``best_overlap``, ``reported_load``)."""

    def __init__(self, routers: Sequence[Router]) -> None:
        if len(routers) < 2:
            raise ValueError("Frontends needs two routers or more (one frontend is a plain Router)")
        self.routers = list(routers)
        self.block_size = self.routers[0].block_size
        self._owner: dict[str, Router] = {}  # request id -> the router that took it, until it finished
        self._next = 0

    @property
    def on_capacity(self) -> Callable[[], None] | None:
        return self.routers[0].on_capacity

    @on_capacity.setter
    def on_capacity(self, callback: Callable[[], None] | None) -> None:
        for r in self.routers:
            r.on_capacity = callback

    def route(self, request_id: str, candidates: Sequence[str], tokens: Any, **kw: Any) -> Any:
        """The request's frontend routes it: the next one in turn for a new request, the same one
        again for a request it declined (it waited in that frontend's queue)."""
        router = self._owner.get(request_id)
        if router is None:
            router = self._owner[request_id] = self.routers[self._next]
            self._next = (self._next + 1) % len(self.routers)
        return router.route(request_id, candidates, tokens, **kw)

    def first_token(self, request_id: str) -> None:
        self._owner[request_id].first_token(request_id)

    def finished(self, request_id: str) -> None:
        router = self._owner.pop(request_id, None)
        if router is not None:
            router.finished(request_id)

    def apply_kv_events(self, worker_id: str, events: Any, ts: float | None = None) -> bool:
        events = list(events)  # every router reads them all
        applied = [r.apply_kv_events(worker_id, events, ts) for r in self.routers]
        return all(applied)

    def worker_added(self, worker_id: str, *args: Any, **kw: Any) -> None:
        for r in self.routers:
            r.worker_added(worker_id, *args, **kw)

    def worker_removed(self, worker_id: str) -> None:
        for r in self.routers:
            r.worker_removed(worker_id)

    def best_overlap(self, candidates: Sequence[str], tokens: Any) -> int:
        return self.routers[0].best_overlap(candidates, tokens)  # every router holds the same index

    def reported_load(self, load: WorkerLoad) -> None:
        for r in self.routers:
            r.reported_load(load)
