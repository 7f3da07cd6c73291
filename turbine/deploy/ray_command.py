"""`turbine serve --ray [ADDRESS]`: the same fleet as `turbine serve`, its frontend and each worker a
Ray actor; and the Ray options `turbine planner --connector ray` shares.

    ray start --head                                   # and `ray start --address HEAD:6379` elsewhere
    turbine serve --ray --engine builtin --model /shared/llama --workers 4         # 4 actors x 1 GPU
    turbine serve --ray HEAD:6379 --prefill-workers 2 --decode-workers 2 --discovery etcd://HEAD:2379

This module imports nothing from Ray until a command asks for it (Ray is the optional ``ray`` extra).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("turbine.ray")

READY_TIMEOUT_S = 120.0  # the frontend sees a usable worker


def add_ray_placement_args(g: Any) -> None:
    g.add_argument("--ray-num-gpus", type=float, default=None,
                   help="GPUs each worker actor requests (default from the engine: mock 0, builtin 1 (0 with --device "
                   "cpu), vllm its tensor x pipeline parallel size)")
    g.add_argument("--ray-num-cpus", type=float, default=1.0, help="CPUs each actor requests")
    g.add_argument("--ray-max-restarts", type=int, default=-1,
                   help="times Ray restarts a worker or frontend actor whose process died (-1: always)")


def add_serve_ray_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray (serve --ray: the frontend and each worker as Ray actors)")
    g.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="place the fleet on a Ray cluster: ADDRESS (HEAD:6379, ray://HEAD:10001), or without one "
                   "$RAY_ADDRESS, the cluster `ray start` began on this machine, else a new local one")
    add_ray_placement_args(g)


def placement(a: argparse.Namespace) -> Any:
    from turbine.deploy.resources import RayPlacement

    return RayPlacement(num_gpus=a.ray_num_gpus, num_cpus=a.ray_num_cpus, max_restarts=a.ray_max_restarts)


def connect(address: str | None, log_level: str = "INFO") -> None:
    try:
        import ray
    except ImportError as e:
        raise SystemExit(f"turbine: Ray placement needs the ray extra (pip install 'turbine[ray]'): {e}") from None
    if not ray.is_initialized():
        ray.init(address=address or None, logging_level=log_level.upper(), log_to_driver=True)


def fleet_discovery(a: argparse.Namespace) -> tuple[str, str]:
    """(discovery URL, cluster token) for actors: the command's ``--discovery`` when it names a
    shared one, else file discovery in a new directory (one machine); the token from
    ``--cluster-token``, ``$TURBINE_CLUSTER_TOKEN``, or a new random one."""
    url = getattr(a, "discovery", None)
    if url is None and getattr(a, "discovery_dir", None) is not None:
        url = f"file://{Path(a.discovery_dir).resolve()}"
    if not url or str(url).startswith("mem://"):
        url = f"file://{tempfile.mkdtemp(prefix='turbine-ray-')}"
    token = getattr(a, "cluster_token", None) or os.environ.get("TURBINE_CLUSTER_TOKEN") or secrets.token_urlsafe(32)
    return str(url), token


async def run_serve(a: argparse.Namespace, *, workers: int) -> None:
    """`turbine serve --ray`: start the actors, print the URL, serve until a signal, then drain."""
    from turbine.launch import wait_for_signal

    try:
        where = placement(a)
    except ValueError as e:
        raise SystemExit(f"turbine: {e}") from None
    connect(a.ray, a.log_level)
    from turbine.deploy.ray_fleet import RayFleet
    discovery, token = fleet_discovery(a)
    fleet = RayFleet(a, discovery=discovery, token=token, placement=where)
    planner = None
    try:
        fleet.check_cluster()
        await fleet.start_frontend()
        for role, n in (("aggregated", workers), ("prefill", a.prefill_workers), ("decode", a.decode_workers)):
            if n:
                await fleet.add_workers(role, n)
        names = await _wait_served(fleet)
        if a.planner:
            planner = await _start_planner(a, fleet)
    except (ValueError, RuntimeError) as e:
        await fleet.stop(grace_s=0)
        raise SystemExit(f"turbine: {e}") from None
    nodes = {w.info["node_id"] for w in fleet.workers}
    print(f"Turbine is serving {', '.join(names)} at {fleet.url}/v1 on Ray ({len(fleet.workers)} worker actors on "
          f"{len(nodes)} node(s), {fleet.gpus_per_worker:g} GPU each)  (Ctrl-C to stop)", flush=True)
    abort = None
    try:
        abort = await wait_for_signal()
    finally:
        if planner is not None:
            await planner()
        await fleet.stop(abort=abort)


async def _wait_served(fleet: Any) -> list[str]:
    """Until the frontend routes to every worker the fleet started; returns the served models."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT_S
    wanted = {wid for w in fleet.workers for wid in w.info["worker_ids"]}
    while True:
        served = await fleet.frontend.served.remote()
        if wanted <= {wid for ids in served.values() for wid in ids}:
            return sorted(served)
        if loop.time() > deadline:
            raise RuntimeError(f"the frontend did not see every worker within {READY_TIMEOUT_S:.0f} s "
                               "(the actors' logs say why)")
        await asyncio.sleep(0.1)


async def _start_planner(a: argparse.Namespace, fleet: Any) -> Any:
    from turbine.planner.connectors.ray import RayConnector
    from turbine.planner.planner_command import serve_planner, start_planner

    mode = "disagg" if (a.prefill_workers or a.decode_workers) else "agg"
    pools = ("prefill", "decode") if mode == "disagg" else ("agg",)
    runner, connector = serve_planner(a, None, mode, url=fleet.url, connector=RayConnector(fleet, pools=pools))
    return start_planner(runner, connector)


def planner_fleet(a: argparse.Namespace, pools: tuple[str, ...], worker_args: list[str]) -> Any:
    """`turbine planner --connector ray`: a connector owning worker actors built from
    ``worker_args`` (`turbine worker` options), on the fleet's discovery directory."""
    from turbine.cli import _parse
    from turbine.runtime.fleet_token import fleet_token

    if not a.discovery_dir:
        raise ValueError("the ray connector needs --discovery-dir (the fleet's)")
    ns = _parse(["--log-level", a.log_level, "worker", *worker_args, "--discovery-dir", a.discovery_dir])
    connect(a.ray_address, a.log_level)
    from turbine.deploy.ray_fleet import RayFleet
    from turbine.planner.connectors.ray import RayConnector
    token = fleet_token(a.discovery_dir, getattr(a, "cluster_token", None))
    fleet = RayFleet(ns, discovery=f"file://{Path(a.discovery_dir).resolve()}", token=token or "",
                     placement=placement(a))
    fleet.check_cluster()
    return RayConnector(fleet, pools=pools, owns=True)


__all__ = ["add_ray_placement_args", "add_serve_ray_args", "connect", "fleet_discovery", "planner_fleet",
           "run_serve"]
