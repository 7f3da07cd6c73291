"""The Ray actors that host a Turbine fleet's processes: one frontend, one worker each.

An actor runs its Turbine part on an event loop of its own (a thread; uvloop when installed), the
same code `turbine frontend` / `turbine worker` run, built from the same parsed options. Ray's
method calls hand coroutines to that loop. The actor's ``__init__`` starts the part and returns
once it serves, so an actor is ready when its first method call returns; when Ray restarts a dead
actor (``max_restarts``) it runs ``__init__`` again and a new worker registers under a new id,
while frontends see the dead one leave discovery and move its streams to the others.

Imported only inside actors and by `turbine.deploy.ray_fleet` (never by Turbine's core).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import ray

T = TypeVar("T")
log = logging.getLogger("turbine.ray")

START_TIMEOUT_S = 600.0  # loading a model


class LoopThread:
    """An event loop on its own thread, for the Turbine parts of one actor."""

    def __init__(self) -> None:
        try:
            import uvloop

            self.loop = uvloop.new_event_loop()
        except ImportError:
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="turbine-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def _setup_logging(ns: argparse.Namespace) -> None:
    logging.basicConfig(level=str(getattr(ns, "log_level", "INFO")).upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _node() -> dict[str, Any]:
    ctx = ray.get_runtime_context()
    return {"pid": os.getpid(), "node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "gpu_ids": list(ctx.get_accelerator_ids().get("GPU", []))}


async def start_worker(opts: Any, ns: argparse.Namespace, *, discovery: str, token: str) -> Any:
    """What `turbine worker` starts: its planes on ``opts.host`` (this node's address), registered
    in ``discovery`` with the fleet's ``token``."""
    from turbine import launch
    from turbine.runtime.config import RuntimeConfig

    runtime = RuntimeConfig.build(discovery, host=opts.host, cluster_token=token,
                                  discovery_ttl_s=getattr(ns, "discovery_ttl", None))
    return await launch.start_worker_process(opts, runtime=runtime, num_workers=getattr(ns, "num_workers", 1),
                                             drain_timeout_s=ns.drain_timeout)


async def start_frontend(cfg: Any, ns: argparse.Namespace, *, discovery: str, token: str) -> Any:
    """What `turbine frontend` starts."""
    from turbine import launch
    from turbine.runtime.config import RuntimeConfig

    runtime = RuntimeConfig.build(discovery, cluster_token=token, discovery_ttl_s=getattr(ns, "discovery_ttl", None))
    return await launch.start_frontend(runtime=runtime, frontend=cfg)


class WorkerActor:
    """One `turbine worker` process of ``role``, its planes on this node's address."""

    def __init__(self, ns: argparse.Namespace, role: str, discovery: str, token: str) -> None:
        from turbine.cli import _worker_options

        _setup_logging(ns)
        ns = argparse.Namespace(**vars(ns))
        ns.role, ns.host = role, ray.util.get_node_ip_address()
        self.role = role
        self.loop = LoopThread()
        self.dep = self.loop.run(start_worker(_worker_options(ns), ns, discovery=discovery, token=token),
                                 START_TIMEOUT_S)

    def info(self) -> dict[str, Any]:
        return {**_node(), "role": self.role, "worker_ids": [w.worker_id for w in self.dep.workers],
                "addresses": [w.address for w in self.dep.workers]}

    def drain(self, grace_s: float | None = None) -> None:
        """Leave discovery, refuse new requests, finish the running ones (``grace_s``, default the
        worker's --drain-timeout), then stop. The actor is killed after."""
        self.loop.run(self.dep.stop(grace_s))


class FrontendActor:
    """`turbine frontend`: the HTTP API on this node at ``--host:--port``."""

    def __init__(self, ns: argparse.Namespace, discovery: str, token: str) -> None:
        from turbine.cli import _frontend_config

        _setup_logging(ns)
        self.loop = LoopThread()
        self.dep = self.loop.run(start_frontend(_frontend_config(ns), ns, discovery=discovery, token=token),
                                 START_TIMEOUT_S)

    def url(self) -> str:
        """Where clients reach it: a wildcard bind is reported as this node's address."""
        http = self.dep.frontend.http
        host = http.host if http.host not in ("0.0.0.0", "::", "") else ray.util.get_node_ip_address()
        return f"{http.scheme}://{f'[{host}]' if ':' in host else host}:{http.port}"

    def info(self) -> dict[str, Any]:
        return {**_node(), "url": self.url()}

    def served(self) -> dict[str, list[str]]:
        """Model name -> the worker ids this frontend routes it to."""
        return {m.name: sorted(m.workers) for m in self.dep.frontend.registry.served()}

    def drain(self, grace_s: float | None = None) -> None:
        self.loop.run(self.dep.stop(grace_s))


__all__ = ["FrontendActor", "LoopThread", "WorkerActor"]
