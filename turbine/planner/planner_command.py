"""`turbine planner` (a planner beside a running frontend) and `turbine serve --planner`.

    turbine planner --frontend-url http://127.0.0.1:8000 --connector local --discovery-dir /tmp/fleet \\
        --profile bench/profiles/h200_llama3-8b_bf16.json --speedup-ratio 10 \\
        --sla-ttft-ms 500 --sla-itl-ms 10 --worker-args "--engine mock --model /tmp/m --speedup-ratio 10 ..."
    turbine planner ... --connector kubernetes --namespace prod --deployment agg=llama-workers
    turbine serve --engine mock --profile P --planner --sla-ttft-ms 500 --sla-itl-ms 10
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shlex
import sys
from typing import Any

from turbine.planner.perf_model import Parallel, PerfModel
from turbine.planner.predictors import PREDICTORS
from turbine.planner.sla_planner import PlannerConfig, SlaPlanner
from turbine.planner.steady_state import Sla

log = logging.getLogger("turbine.planner")


def add_policy_args(p: argparse.ArgumentParser) -> None:
    """What the planner aims for and how it may move (shared by `planner` and `serve --planner`)."""
    g = p.add_argument_group("SLA planner")
    g.add_argument("--sla-ttft-ms", type=float, default=None, help="time-to-first-token target (mean over an interval)")
    g.add_argument("--sla-itl-ms", type=float, default=None, help="inter-token latency target (mean over an interval)")
    g.add_argument("--planner-interval", type=float, default=60.0, help="seconds between decisions")
    g.add_argument("--planner-predictor", default="holt-winters", choices=PREDICTORS,
                   help="next-interval load: constant (last value), moving-average, holt-winters (level, trend, season)")
    g.add_argument("--planner-window", type=int, default=5, help="moving-average: intervals averaged")
    g.add_argument("--planner-season", type=int, default=0, help="holt-winters: intervals per load cycle (0: none)")
    g.add_argument("--planner-min-workers", type=int, default=1, help="per pool")
    g.add_argument("--planner-max-workers", type=int, default=16, help="per pool")
    g.add_argument("--planner-gpus", type=int, default=None, help="GPU budget (default: max workers of every pool)")
    g.add_argument("--planner-scale-up-cooldown", type=float, default=0.0, help="seconds between scale-ups of a pool")
    g.add_argument("--planner-scale-down-cooldown", type=float, default=180.0,
                   help="seconds after any change of a pool before it may shrink")
    g.add_argument("--planner-scale-down-window", type=float, default=180.0,
                   help="a pool shrinks only to the largest size wanted within this many seconds")
    g.add_argument("--planner-max-utilization", type=float, default=0.8,
                   help="fraction of a worker's modelled capacity the planner plans to use (headroom for queueing)")
    g.add_argument("--planner-startup", type=float, default=0.0,
                   help="seconds a new worker takes to serve: scale-ups aim at the load predicted for then")
    g.add_argument("--planner-layout", default="tp1", help="aggregated workers' parallel layout (tp1, tp2, tp2pp2, ...)")
    g.add_argument("--planner-prefill-layout", default="tp1", help="prefill workers' layout")
    g.add_argument("--planner-decode-layout", default="tp1", help="decode workers' layout")
    g.add_argument("--planner-no-correction", action="store_true",
                   help="size pools by the performance model alone (no observed/expected latency correction)")


def add_planner_args(p: argparse.ArgumentParser) -> None:
    from turbine.planner.plan_command import add_model_args

    g = p.add_argument_group("performance model")
    add_model_args(g)
    g.add_argument("--speedup-ratio", type=float, default=1.0,
                   help="the workers run this much faster than the modelled GPU (mock workers at a speed-up)")
    g.add_argument("--max-num-batched-tokens", type=int, default=8192, help="the workers' token budget per step")
    g.add_argument("--max-num-seqs", type=int, default=256, help="the workers' largest batch")
    g = p.add_argument_group("fleet")
    g.add_argument("--frontend-url", default="http://127.0.0.1:8000", help="the frontend whose /metrics it reads")
    g.add_argument("--frontend-model", default=None, help="plan for this served model only (default: all)")
    g.add_argument("--api-key", default=None, help="the frontend's API key, if it requires one")
    g.add_argument("--mode", default="agg", choices=["agg", "disagg"], help="pools: agg, or prefill + decode")
    g.add_argument("--connector", default="local", choices=["local", "kubernetes", "ray"],
                   help="local: start and drain `turbine worker` processes here; kubernetes: scale Deployments; "
                   "ray: start and drain worker actors on a Ray cluster")
    g.add_argument("--discovery-dir", default=None, help="local, ray: the fleet's discovery directory")
    g.add_argument("--discovery", dest="discovery_dir", default=None, metavar="URL",
                   help="local: the fleet's discovery as a URL (etcd://HOST:2379, file:///DIR), for its workers")
    g.add_argument("--worker-args", default="",
                   help="local, ray: options of each `turbine worker` (engine, model, ...), as one quoted string")
    g.add_argument("--drain-timeout", type=float, default=30.0, help="local: seconds a drained worker may take")
    g.add_argument("--namespace", default="default", help="kubernetes: the Deployments' namespace")
    g.add_argument("--deployment", action="append", default=[], metavar="POOL=NAME",
                   help="kubernetes: the Deployment of a pool (agg=..., prefill=..., decode=...)")
    g.add_argument("--fleet", default=None, metavar="NAME",
                   help="kubernetes: the fleet `turbine deploy k8s --name NAME` rendered: scale its pools' "
                   "Deployments (NAME-agg, NAME-prefill, NAME-decode) without naming them")
    g.add_argument("--kubeconfig", default=None, help="kubernetes: kubeconfig file (default: in-cluster, then ~/.kube/config)")
    g.add_argument("--metrics-port", type=int, default=None, help="serve the planner's own /metrics on 127.0.0.1:PORT")
    g.add_argument("--ray-address", default=None, help="ray: the cluster (default: $RAY_ADDRESS or this machine's)")
    from turbine.deploy.ray_command import add_ray_placement_args

    add_ray_placement_args(g)
    add_policy_args(p)


def planner_config(a: argparse.Namespace, mode: str) -> PlannerConfig:
    if a.sla_ttft_ms is None or a.sla_itl_ms is None:
        raise ValueError("the planner needs --sla-ttft-ms and --sla-itl-ms")
    layouts = {k: Parallel.parse(getattr(a, f)) for k, f in (("agg", "planner_layout"),
                                                             ("prefill", "planner_prefill_layout"),
                                                             ("decode", "planner_decode_layout"))}
    pools = ("agg",) if mode == "agg" else ("prefill", "decode")
    budget = a.planner_gpus if a.planner_gpus is not None else sum(a.planner_max_workers * layouts[p].gpus for p in pools)
    return PlannerConfig(
        sla=Sla(a.sla_ttft_ms, a.sla_itl_ms), mode=mode, interval_s=a.planner_interval, predictor=a.planner_predictor,
        predictor_window=a.planner_window, season=a.planner_season, agg_layout=layouts["agg"],
        prefill_layout=layouts["prefill"], decode_layout=layouts["decode"], min_workers=a.planner_min_workers,
        max_workers=a.planner_max_workers, gpu_budget=budget, scale_up_cooldown_s=a.planner_scale_up_cooldown,
        scale_down_cooldown_s=a.planner_scale_down_cooldown, max_utilization=a.planner_max_utilization,
        startup_s=a.planner_startup, scale_down_window_s=a.planner_scale_down_window,
        token_budget=a.max_num_batched_tokens, max_batch=a.max_num_seqs, speedup_ratio=a.speedup_ratio,
        correct=not a.planner_no_correction)


def _connector(a: argparse.Namespace, cfg: PlannerConfig) -> Any:
    if a.connector in ("local", "ray"):
        from turbine.planner.connectors.local import LocalProcessConnector, worker_command

        if not a.discovery_dir:
            raise ValueError(f"the {a.connector} connector needs --discovery-dir (the fleet's)")
        args = shlex.split(a.worker_args)
        if any(x in ("--role", "--discovery-dir") for x in args):
            raise ValueError("--worker-args must not set --role or --discovery-dir: the planner does")
        if a.connector == "ray":
            from turbine.deploy.ray_command import planner_fleet

            return planner_fleet(a, cfg.pools, args)
        return LocalProcessConnector({pool: worker_command(pool, args, discovery_dir=a.discovery_dir)
                                      for pool in cfg.pools}, drain_timeout_s=a.drain_timeout)
    from turbine.planner.connectors.kubernetes import KubernetesConnector

    names = {}
    if getattr(a, "fleet", None):
        from turbine.deploy.k8s import worker_deployment

        names = {pool: worker_deployment(a.fleet, pool) for pool in cfg.pools}
    for item in a.deployment:
        pool, _, name = item.partition("=")
        if pool not in cfg.pools or not name:
            raise ValueError(f"--deployment {item!r}: expected POOL=NAME with POOL one of {', '.join(cfg.pools)}")
        names[pool] = name
    missing = [p for p in cfg.pools if p not in names]
    if missing:
        raise ValueError(f"--deployment missing for pool(s) {', '.join(missing)}")
    return KubernetesConnector(names, namespace=a.namespace, kubeconfig=a.kubeconfig)


async def _run_standalone(a: argparse.Namespace, model: PerfModel, cfg: PlannerConfig) -> None:
    from turbine.planner.observe import FrontendScraper
    from turbine.planner.runner import PlannerRunner

    connector = _connector(a, cfg)
    scraper = FrontendScraper(a.frontend_url, model=a.frontend_model, api_key=a.api_key)
    runner = PlannerRunner(SlaPlanner(model, cfg), scraper, connector)
    if a.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(a.metrics_port, addr="127.0.0.1", registry=runner.registry)
    from turbine.launch import wait_for_signal

    stop = asyncio.Event()
    task = runner.start(stop)
    print(f"Turbine planner: {cfg.mode} pools {', '.join(cfg.pools)}, every {cfg.interval_s:g} s "
          f"(Ctrl-C to stop; workers it started are drained)", flush=True)
    try:
        waiter = asyncio.ensure_future(wait_for_signal())
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await task
        await scraper.close()
        await connector.close()


def main_from_args(a: argparse.Namespace) -> int:
    from turbine.planner.plan_command import model_from_args

    try:
        model = model_from_args(a)
        cfg = planner_config(a, a.mode)
    except ValueError as e:
        print(f"turbine planner: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_run_standalone(a, model, cfg))
    except ValueError as e:
        print(f"turbine planner: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def start_planner(runner: Any, connector: Any) -> Any:
    """Start ``runner``'s loop; returns the coroutine function that stops it and closes both."""
    import asyncio
    import contextlib

    stop = asyncio.Event()
    task = runner.start(stop)

    async def close() -> None:
        stop.set()
        with contextlib.suppress(Exception):
            await task
        await runner.source.close()
        await connector.close()

    return close


def serve_planner(a: argparse.Namespace, dep: Any, mode: str, *, url: str | None = None,
                  connector: Any = None) -> tuple[Any, Any]:
    """`serve --planner`: a planner over the process's own workers, reading its own frontend
    (`serve --ray --planner`: ``url`` and ``connector`` instead of ``dep``'s).
    Returns (runner, connector); the caller starts the runner and closes the connector."""
    from turbine.planner.connectors.inproc import InProcConnector
    from turbine.planner.model_shape import get_shape
    from turbine.planner.observe import FrontendScraper
    from turbine.planner.plan_command import _read_json
    from turbine.planner.runner import PlannerRunner

    if not a.profile:
        raise ValueError("--planner needs --profile: the step-time profile it models the workers with")
    profile = _read_json(a.profile)
    meta = profile.get("meta") or {}
    if not meta.get("model") or not meta.get("device"):
        raise ValueError(f"{a.profile}: its meta must name the model and device for the planner")
    model = PerfModel(get_shape(str(meta["model"])), str(meta["device"]), profile=profile)
    cfg = planner_config(a, mode)
    keys = a.api_key or []
    scraper = FrontendScraper(url or dep.frontend.url, api_key=keys[0] if keys else None)
    connector = connector or InProcConnector(dep)
    registry = dep.frontend.metrics.registry if dep is not None else None
    runner = PlannerRunner(SlaPlanner(model, cfg), scraper, connector, registry=registry)
    return runner, connector


__all__ = ["add_planner_args", "add_policy_args", "main_from_args", "planner_config", "serve_planner"]
