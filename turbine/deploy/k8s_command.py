"""`turbine deploy k8s`: a fleet's Kubernetes manifests, as YAML on stdout or files in a directory.

    turbine deploy k8s --image registry/turbine:0.1 --model /models/llama --model-pvc llama-weights \\
        --engine vllm --prefill-workers 2 --decode-workers 1 --decode-args "-- --tensor-parallel-size 4" \\
        | kubectl apply -f -

Every passed-through argument list is parsed with the `turbine` command's own parser before anything
is written, so a typo fails here, not in a crash-looping pod.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import secrets
import shlex
import sys
from pathlib import Path

from turbine.deploy.k8s import POOLS, FleetSpec, frontend_args, planner_args, render, worker_args


def add_deploy_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="target", required=True)
    k = sub.add_parser("k8s", allow_abbrev=False, help="Kubernetes manifests: frontend Deployment and Service, a "
                       "Deployment per worker pool, etcd, the cluster token Secret, optionally the planner")
    g = k.add_argument_group("fleet")
    g.add_argument("--name", default="turbine", help="prefix of every object's name (<name>-frontend, <name>-agg, ...)")
    g.add_argument("--namespace", default="default")
    g.add_argument("--image", required=True, help="container image with Turbine installed (`turbine` on its PATH)")
    g.add_argument("--image-pull-policy", default=None, choices=["Always", "IfNotPresent", "Never"])
    g.add_argument("--frontends", type=int, default=1, help="frontend replicas (behind one Service)")
    g.add_argument("--workers", type=int, default=None,
                   help="aggregated workers (default 1, or none with --prefill-workers/--decode-workers)")
    g.add_argument("--prefill-workers", type=int, default=0)
    g.add_argument("--decode-workers", type=int, default=0)
    g.add_argument("--service-type", default="ClusterIP", choices=["ClusterIP", "NodePort", "LoadBalancer"])
    g = k.add_argument_group("model and engine")
    g.add_argument("--engine", default="mock", choices=["mock", "builtin", "vllm"])
    g.add_argument("--model", required=True, help="the model directory's path inside the containers")
    g.add_argument("--model-pvc", default=None, help="mount this PersistentVolumeClaim read-only at --model-mount")
    g.add_argument("--model-host-path", default=None, help="or mount this directory of the node")
    g.add_argument("--model-mount", default="/models", help="where the model volume is mounted")
    g.add_argument("--gpus", type=int, default=None,
                   help="GPUs per worker (nvidia.com/gpu); default from the engine: mock 0, builtin 1, vllm its "
                   "--tensor-parallel-size x --pipeline-parallel-size")
    g.add_argument("--prefill-gpus", type=int, default=None, help="GPUs per prefill worker (default: as --gpus)")
    g.add_argument("--decode-gpus", type=int, default=None, help="GPUs per decode worker (default: as --gpus)")
    g.add_argument("--worker-cpu", default=None, help="CPU request per worker (e.g. 8)")
    g.add_argument("--worker-memory", default=None, help="memory request per worker (e.g. 64Gi)")
    g = k.add_argument_group("arguments passed through (one quoted string each, as on a command line)")
    g.add_argument("--worker-args", default="", help="options of every `turbine worker` (engine flags, ...)")
    g.add_argument("--agg-args", default="", help="options of aggregated workers only")
    g.add_argument("--prefill-args", default="", help="options of prefill workers only")
    g.add_argument("--decode-args", default="", help="options of decode workers only")
    g.add_argument("--frontend-args", default="", help="options of `turbine frontend` (router, limits, ...)")
    g = k.add_argument_group("discovery, security, draining")
    g.add_argument("--etcd", default=None, metavar="URL",
                   help="an external etcd (etcd://host:2379[,host:2379]); default: one is deployed with the fleet")
    g.add_argument("--etcd-image", default="quay.io/coreos/etcd:v3.5.17")
    g.add_argument("--cluster-token", default=None,
                   help="the request plane's shared token, written into a Secret (default: a random one)")
    g.add_argument("--cluster-token-secret", default=None, metavar="NAME",
                   help="use this existing Secret (key 'token') instead: re-rendering then keeps the token")
    g.add_argument("--api-key-secret", default=None, metavar="NAME",
                   help="a Secret (key 'api-key') whose value clients must present as 'Authorization: Bearer'")
    g.add_argument("--request-timeout", type=float, default=600.0, help="the frontend's --request-timeout")
    g.add_argument("--drain-timeout", type=float, default=None,
                   help="seconds a SIGTERMed frontend or worker lets running requests finish (default: the request "
                   "timeout, so that none is cut off); terminationGracePeriodSeconds is set above it")
    g.add_argument("--prestop-sleep", type=int, default=5,
                   help="a frontend's preStop pause, for the Service to stop sending it connections")
    g.add_argument("--startup-timeout", type=float, default=900.0,
                   help="seconds a worker may take to load its model and register before it is restarted")
    g = k.add_argument_group("planner (scales the worker Deployments)")
    g.add_argument("--planner", action="store_true",
                   help="deploy `turbine planner --connector kubernetes` with a Role to scale the worker Deployments")
    g.add_argument("--planner-args", default="",
                   help="its options: --profile (a path in the container), --sla-ttft-ms, --sla-itl-ms, ...")
    g = k.add_argument_group("output")
    g.add_argument("--out", type=Path, default=None, help="write one YAML file per object into this directory "
                   "(default: one stream on stdout)")
    g.add_argument("--pod-log-level", default="INFO", help="the processes' --log-level")


def _split(flag: str, value: str) -> tuple[str, ...]:
    try:
        return tuple(shlex.split(value))
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None


def spec_from_args(a: argparse.Namespace) -> FleetSpec:
    disagg = a.prefill_workers or a.decode_workers
    agg = a.workers if a.workers is not None else (0 if disagg else 1)
    if min(agg, a.prefill_workers, a.decode_workers, a.frontends) < 0:
        raise ValueError("worker and frontend counts must be >= 0")
    if agg and disagg:
        raise ValueError("--workers cannot be combined with --prefill-workers/--decode-workers")
    workers = {"prefill": a.prefill_workers, "decode": a.decode_workers} if disagg else {"agg": agg}
    gpus = {}
    for pool, n in (("agg", a.gpus), ("prefill", a.prefill_gpus if a.prefill_gpus is not None else a.gpus),
                    ("decode", a.decode_gpus if a.decode_gpus is not None else a.gpus)):
        if n is not None:
            if n < 0:
                raise ValueError("GPU counts must be >= 0")
            gpus[pool] = n
    resources = {k: v for k, v in (("cpu", a.worker_cpu), ("memory", a.worker_memory)) if v}
    return FleetSpec(
        image=a.image, model=a.model, name=a.name, namespace=a.namespace, engine=a.engine, workers=workers, gpus=gpus,
        frontends=a.frontends, model_pvc=a.model_pvc, model_host_path=a.model_host_path, model_mount=a.model_mount,
        etcd_url=a.etcd, etcd_image=a.etcd_image, request_timeout_s=a.request_timeout,
        drain_timeout_s=a.drain_timeout, prestop_s=a.prestop_sleep, startup_timeout_s=a.startup_timeout,
        service_type=a.service_type, image_pull_policy=a.image_pull_policy, token_secret=a.cluster_token_secret,
        cluster_token="" if a.cluster_token_secret else (a.cluster_token or secrets.token_urlsafe(32)),
        api_key_secret=a.api_key_secret, frontend_args=_split("--frontend-args", a.frontend_args),
        worker_args=_split("--worker-args", a.worker_args),
        pool_args={p: _split(f"--{p}-args", getattr(a, f"{p}_args")) for p in POOLS},
        worker_resources=resources, planner=a.planner, planner_args=_split("--planner-args", a.planner_args),
        log_level=a.pod_log_level)


def check_commands(spec: FleetSpec) -> None:
    """Parse each container's `turbine` arguments with the real parser (what the pod will run),
    with the values Kubernetes substitutes at run time ($(POD_IP)) filled in."""
    from turbine.cli import _parse

    commands = [("frontend", frontend_args(spec))] + [(f"{p} worker", worker_args(spec, p)) for p in spec.pools]
    if spec.planner:
        commands.append(("planner", planner_args(spec)))
    for what, args in commands:
        argv = [a.replace("$(POD_IP)", "10.0.0.1").replace("$(TURBINE_API_KEY)", "key") for a in args]
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                _parse(argv)
        except SystemExit:
            msg = err.getvalue().strip().splitlines()
            raise ValueError(f"the {what}'s arguments do not parse: {msg[-1] if msg else argv}") from None


def main_from_args(a: argparse.Namespace) -> int:
    from turbine.deploy.manifest_yaml import dump, dump_all

    try:
        spec = spec_from_args(a)
        check_commands(spec)
        objects = render(spec)
    except ValueError as e:
        print(f"turbine deploy k8s: {e}", file=sys.stderr)
        return 2
    if a.out is None:
        sys.stdout.write(dump_all(objects))
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    for i, obj in enumerate(objects):
        path = a.out / f"{i:02d}-{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"
        path.write_text(dump(obj))
    print(f"wrote {len(objects)} objects to {a.out} (kubectl apply -f {a.out})", file=sys.stderr)
    return 0


__all__ = ["add_deploy_args", "check_commands", "main_from_args", "spec_from_args"]
