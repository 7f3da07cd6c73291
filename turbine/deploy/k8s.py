"""A Turbine fleet as Kubernetes objects: what `turbine deploy k8s` prints.

    Service <name>-frontend ──▶ Deployment <name>-frontend (turbine frontend, GET /health probes)
                                     │ discovery: etcd (StatefulSet <name>-etcd, or --etcd URL)
    Deployment <name>-agg | <name>-prefill + <name>-decode (turbine worker --health-port, GPUs)
    Secret <name>-cluster-token (the request plane's token, as $TURBINE_CLUSTER_TOKEN)
    optional: Deployment <name>-planner + ServiceAccount/Role/RoleBinding (deployments/scale)

Pure: a `FleetSpec` in, a list of plain dicts out (apps/v1, v1, networking.k8s.io/v1,
rbac.authorization.k8s.io/v1). Names come from `worker_deployment` and friends, which the planner's
Kubernetes connector uses too, so the planner scales exactly the Deployments rendered here.

Draining. The kubelet sends SIGTERM, waits ``terminationGracePeriodSeconds``, then SIGKILLs. A
Turbine process drains on SIGTERM: a worker leaves discovery at once (frontends stop routing to it),
refuses new requests (the frontend retries them elsewhere) and finishes its running ones; a
frontend closes its listener, finishes its streams, then exits. The grace period is therefore the
drain timeout plus a margin, and the drain timeout defaults to the request timeout: no request
can outlive it, so a scale-down, a rollout or a node drain cuts off nothing. A frontend's pod also
sleeps ``prestop_s`` in a preStop hook before the SIGTERM: the Service's endpoints (kube-proxy,
ingress controllers) drop the pod asynchronously, and connections still routed to it in that
window must find a listener. Workers take no Service traffic (frontends reach them through
discovery, which they leave at the first instant of SIGTERM), so their drain starts at once.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

POOLS = ("agg", "prefill", "decode")
ROLE_FLAG = {"agg": "agg", "prefill": "prefill", "decode": "decode"}
HTTP_PORT = 8000
HEALTH_PORT = 8081
ETCD_CLIENT_PORT = 2379
ETCD_METRICS_PORT = 2381
DRAIN_MARGIN_S = 10  # after the drain timeout: closing sockets, the engine, the process
GPU_RESOURCE = "nvidia.com/gpu"
_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
# Flags the manifests set themselves; passed-through arguments must not repeat them.
OWNED_FLAGS = {
    "frontend": ("--discovery", "--discovery-dir", "--host", "--port", "--drain-timeout", "--request-timeout",
                 "--cluster-token", "--api-key"),
    "worker": ("--discovery", "--discovery-dir", "--host", "--advertise-host", "--health-port", "--role",
               "--engine", "--model", "--drain-timeout", "--cluster-token"),
    "planner": ("--connector", "--namespace", "--deployment", "--frontend-url", "--mode", "--kubeconfig", "--api-key"),
}


# -- names: shared with the planner's Kubernetes connector ------------------------------------------
def frontend_name(fleet: str) -> str:
    return f"{fleet}-frontend"


def worker_deployment(fleet: str, pool: str) -> str:
    """The Deployment of a worker pool; `turbine planner --connector kubernetes --fleet NAME`
    scales these."""
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r} (pools: {', '.join(POOLS)})")
    return f"{fleet}-{pool}"


def etcd_name(fleet: str) -> str:
    return f"{fleet}-etcd"


def token_secret_name(fleet: str) -> str:
    return f"{fleet}-cluster-token"


def planner_name(fleet: str) -> str:
    return f"{fleet}-planner"


def labels(fleet: str, component: str, pool: str | None = None) -> dict[str, str]:
    out = {"app.kubernetes.io/name": "turbine", "app.kubernetes.io/instance": fleet,
           "app.kubernetes.io/component": component}
    if pool is not None:
        out["turbine.dev/pool"] = pool
    return out


@dataclass(frozen=True)
class FleetSpec:
    """One fleet's deployment. Worker counts per pool: ``agg``, or ``prefill`` and ``decode``."""

    image: str
    model: str  # the model directory's path inside the containers
    name: str = "turbine"
    namespace: str = "default"
    engine: str = "mock"
    workers: dict[str, int] = field(default_factory=lambda: {"agg": 1})
    gpus: dict[str, int] = field(default_factory=dict)  # per worker, per pool
    frontends: int = 1
    model_pvc: str | None = None  # mounted read-only at model_mount
    model_host_path: str | None = None
    model_mount: str = "/models"
    etcd_url: str | None = None  # None: an etcd StatefulSet is rendered
    etcd_image: str = "quay.io/coreos/etcd:v3.5.17"
    request_timeout_s: float = 600.0
    drain_timeout_s: float | None = None  # None: the request timeout
    prestop_s: int = 5
    startup_timeout_s: float = 900.0  # a worker's model load, before liveness applies
    service_type: str = "ClusterIP"
    image_pull_policy: str | None = None
    token_secret: str | None = None  # an existing Secret (key ``token``); None: one is rendered
    cluster_token: str = ""  # the rendered Secret's value
    api_key_secret: str | None = None  # a Secret (key ``api-key``) the frontend requires as bearer key
    frontend_args: tuple[str, ...] = ()
    worker_args: tuple[str, ...] = ()
    pool_args: dict[str, tuple[str, ...]] = field(default_factory=dict)
    worker_resources: dict[str, str] = field(default_factory=dict)  # e.g. {"cpu": "4", "memory": "32Gi"}
    planner: bool = False
    planner_args: tuple[str, ...] = ()
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        names = [frontend_name(self.name), etcd_name(self.name), token_secret_name(self.name),
                 planner_name(self.name), *(worker_deployment(self.name, p) for p in POOLS)]
        for n in [self.namespace, *names]:
            if len(n) > 63 or not _DNS_LABEL.fullmatch(n):
                raise ValueError(f"{n!r} is not a valid Kubernetes name (lower-case letters, digits and '-', "
                                 "starting with a letter, at most 63 characters): choose a shorter or simpler "
                                 "--name / --namespace")
        if not self.image:
            raise ValueError("an image is required")
        if not self.model.startswith("/"):
            raise ValueError(f"the model path must be absolute inside the container, not {self.model!r}")
        if self.model_pvc and self.model_host_path:
            raise ValueError("mount the model from a PVC or a host path, not both")
        if not self.workers or any(p not in POOLS or n < 0 for p, n in self.workers.items()):
            raise ValueError(f"worker pools must be among {POOLS} with counts >= 0, not {self.workers}")
        if "agg" in self.workers and ("prefill" in self.workers or "decode" in self.workers):
            raise ValueError("a fleet is aggregated (agg workers) or disaggregated (prefill + decode), not both")
        if set(self.workers) == {"prefill"}:
            raise ValueError("prefill workers need decode workers")
        if self.frontends < 1:
            raise ValueError("at least one frontend")
        if self.etcd_url is not None and not self.etcd_url.startswith("etcd://"):
            raise ValueError(f"the etcd URL must read etcd://host:port[,host:port...], not {self.etcd_url!r}")
        if self.request_timeout_s <= 0 or (self.drain_timeout_s is not None and self.drain_timeout_s < 0):
            raise ValueError("the request timeout must be > 0 and the drain timeout >= 0")
        if self.prestop_s < 0 or self.startup_timeout_s <= 0:
            raise ValueError("the preStop sleep must be >= 0 and the startup timeout > 0")
        if self.service_type not in ("ClusterIP", "NodePort", "LoadBalancer"):
            raise ValueError(f"service type {self.service_type!r}: ClusterIP, NodePort or LoadBalancer")
        if self.token_secret is None and not self.cluster_token:
            raise ValueError("a cluster token, or the name of an existing Secret holding one")
        for role, args in [("frontend", self.frontend_args), ("worker", self.worker_args),
                           *(("worker", a) for a in self.pool_args.values()), ("planner", self.planner_args)]:
            for tok in args:
                flag = tok.split("=", 1)[0]
                if flag in OWNED_FLAGS[role]:
                    raise ValueError(f"{flag} is set by the manifests for the {role}; leave it out of the "
                                     f"{role} arguments")

    @property
    def pools(self) -> tuple[str, ...]:
        return tuple(p for p in POOLS if p in self.workers)

    @property
    def disaggregated(self) -> bool:
        return "agg" not in self.workers

    @property
    def drain_s(self) -> float:
        return self.request_timeout_s if self.drain_timeout_s is None else self.drain_timeout_s

    @property
    def discovery_url(self) -> str:
        return self.etcd_url or f"etcd://{etcd_name(self.name)}:{ETCD_CLIENT_PORT}"

    @property
    def token_secret_ref(self) -> str:
        return self.token_secret or token_secret_name(self.name)


# -- pieces ----------------------------------------------------------------------------------------
def _meta(spec: FleetSpec, name: str, component: str, pool: str | None = None) -> dict[str, Any]:
    return {"name": name, "namespace": spec.namespace,
            "labels": {**labels(spec.name, component, pool), "app.kubernetes.io/managed-by": "turbine"}}


def _num(x: float) -> str:
    return f"{x:g}"


def _grace(spec: FleetSpec, prestop_s: int) -> int:
    return prestop_s + math.ceil(spec.drain_s) + DRAIN_MARGIN_S


def _env(spec: FleetSpec, *, api_key: bool = False) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "TURBINE_CLUSTER_TOKEN",
         "valueFrom": {"secretKeyRef": {"name": spec.token_secret_ref, "key": "token"}}},
    ]
    if api_key and spec.api_key_secret:
        env.append({"name": "TURBINE_API_KEY",
                    "valueFrom": {"secretKeyRef": {"name": spec.api_key_secret, "key": "api-key"}}})
    return env


def _model_volume(spec: FleetSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, volumeMounts) for the model; none when it is in the image."""
    if spec.model_pvc:
        source: dict[str, Any] = {"persistentVolumeClaim": {"claimName": spec.model_pvc, "readOnly": True}}
    elif spec.model_host_path:
        source = {"hostPath": {"path": spec.model_host_path, "type": "Directory"}}
    else:
        return [], []
    return ([{"name": "model", **source}], [{"name": "model", "mountPath": spec.model_mount, "readOnly": True}])


def _container(spec: FleetSpec, name: str, args: list[str]) -> dict[str, Any]:
    c: dict[str, Any] = {"name": name, "image": spec.image,
                         # exec form: turbine is PID 1 and gets the kubelet's SIGTERM itself
                         "command": ["turbine"], "args": ["--log-level", spec.log_level, *args]}
    if spec.image_pull_policy:
        c["imagePullPolicy"] = spec.image_pull_policy
    return c


def _http_probe(path: str, port: str, *, period: int, failures: int, timeout: int = 3) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "timeoutSeconds": timeout,
            "failureThreshold": failures}


def _deployment(spec: FleetSpec, name: str, component: str, pool: str | None, replicas: int | None,
                pod: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "selector": {"matchLabels": labels(spec.name, component, pool)},
        # a new pod serves before an old one drains: no capacity is lost to a rollout
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "template": {"metadata": {"labels": labels(spec.name, component, pool)}, "spec": pod},
    }
    if replicas is not None:
        body = {"replicas": replicas, **body}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(spec, name, component, pool),
            "spec": body}


# -- objects ---------------------------------------------------------------------------------------
def token_secret(spec: FleetSpec) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": _meta(spec, token_secret_name(spec.name), "token"),
            "type": "Opaque", "stringData": {"token": spec.cluster_token}}


def frontend_args(spec: FleetSpec) -> list[str]:
    return ["frontend", "--discovery", spec.discovery_url, "--host", "0.0.0.0", "--port", str(HTTP_PORT),
            "--request-timeout", _num(spec.request_timeout_s), "--drain-timeout", _num(spec.drain_s),
            *spec.frontend_args]


def frontend_objects(spec: FleetSpec) -> list[dict[str, Any]]:
    volumes, mounts = _model_volume(spec)
    c = _container(spec, "frontend", frontend_args(spec))
    c["env"] = _env(spec, api_key=True)
    c["ports"] = [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}]
    # /health answers while the process serves HTTP; a draining frontend has closed its listener,
    # so readiness fails and the Service stops sending it connections
    c["readinessProbe"] = _http_probe("/health", "http", period=5, failures=2)
    c["livenessProbe"] = _http_probe("/health", "http", period=10, failures=3, timeout=5)
    c["lifecycle"] = {"preStop": {"sleep": {"seconds": spec.prestop_s}}}
    if mounts:
        c["volumeMounts"] = mounts
    pod: dict[str, Any] = {"terminationGracePeriodSeconds": _grace(spec, spec.prestop_s), "containers": [c]}
    if volumes:
        pod["volumes"] = volumes
    service = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(spec, frontend_name(spec.name), "frontend"),
               "spec": {"type": spec.service_type, "selector": labels(spec.name, "frontend"),
                        "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"}]}}
    return [_deployment(spec, frontend_name(spec.name), "frontend", None, spec.frontends, pod), service]


def worker_args(spec: FleetSpec, pool: str) -> list[str]:
    return ["worker", "--engine", spec.engine, "--model", spec.model, "--role", ROLE_FLAG[pool],
            "--discovery", spec.discovery_url,
            # bind the pod's own address: it is what the worker advertises in discovery
            "--host", "$(POD_IP)", "--health-port", str(HEALTH_PORT), "--drain-timeout", _num(spec.drain_s),
            *spec.worker_args, *spec.pool_args.get(pool, ())]


def worker_objects(spec: FleetSpec, pool: str) -> dict[str, Any]:
    from turbine.deploy.resources import worker_gpus

    args = worker_args(spec, pool)
    gpus = spec.gpus.get(pool)
    if gpus is None:
        gpus = worker_gpus(spec.engine, [*spec.worker_args, *spec.pool_args.get(pool, ())])
    volumes, mounts = _model_volume(spec)
    c = _container(spec, "worker", args)
    c["env"] = _env(spec)
    c["ports"] = [{"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"}]
    # startup: loading the model may take long; until /health says the workers registered, the
    # other probes wait. Readiness: registered and not draining. Liveness: the loop answers.
    c["startupProbe"] = _http_probe("/health", "health", period=5,
                                    failures=max(1, math.ceil(spec.startup_timeout_s / 5)))
    c["readinessProbe"] = _http_probe("/health", "health", period=5, failures=2)
    c["livenessProbe"] = _http_probe("/live", "health", period=10, failures=3, timeout=5)
    resources: dict[str, Any] = {}
    if spec.worker_resources:
        resources["requests"] = dict(spec.worker_resources)
    if gpus:
        resources["limits"] = {GPU_RESOURCE: str(gpus)}  # requests default to limits for extended resources
    if resources:
        c["resources"] = resources
    if mounts:
        c["volumeMounts"] = mounts
    pod: dict[str, Any] = {"terminationGracePeriodSeconds": _grace(spec, 0), "containers": [c]}
    if volumes:
        pod["volumes"] = volumes
    # With a planner, spec.replicas is the planner's: leave it out, so that re-applying these
    # manifests does not undo its scaling (the API server starts the Deployment at 1).
    replicas = None if spec.planner else spec.workers[pool]
    return _deployment(spec, worker_deployment(spec.name, pool), "worker", pool, replicas, pod)


def etcd_objects(spec: FleetSpec) -> list[dict[str, Any]]:
    """One etcd member in a StatefulSet, its data in an emptyDir: discovery holds only leases and
    registrations, which the fleet's processes write again when etcd comes back."""
    name = etcd_name(spec.name)
    c = _container(spec, "etcd", [])
    c.update(image=spec.etcd_image, command=["etcd"], args=etcd_args(spec))
    c["ports"] = [{"name": "client", "containerPort": ETCD_CLIENT_PORT, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": ETCD_METRICS_PORT, "protocol": "TCP"}]
    c["readinessProbe"] = _http_probe("/health", "metrics", period=5, failures=3)
    c["livenessProbe"] = _http_probe("/health?serializable=true", "metrics", period=10, failures=6, timeout=5)
    c["volumeMounts"] = [{"name": "data", "mountPath": "/var/run/etcd"}]
    pod = {"containers": [c], "volumes": [{"name": "data", "emptyDir": {}}]}
    sts = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _meta(spec, name, "etcd"),
           "spec": {"serviceName": name, "replicas": 1, "selector": {"matchLabels": labels(spec.name, "etcd")},
                    "template": {"metadata": {"labels": labels(spec.name, "etcd")}, "spec": pod}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(spec, name, "etcd"),
               "spec": {"clusterIP": "None", "selector": labels(spec.name, "etcd"),
                        "ports": [{"name": "client", "port": ETCD_CLIENT_PORT, "targetPort": "client",
                                   "protocol": "TCP"}]}}
    # Only the fleet's own pods may reach etcd (where the cluster's network plugin enforces policies).
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": _meta(spec, name, "etcd"),
              "spec": {"podSelector": {"matchLabels": labels(spec.name, "etcd")}, "policyTypes": ["Ingress"],
                       "ingress": [{"from": [{"podSelector": {"matchLabels": {
                           "app.kubernetes.io/name": "turbine", "app.kubernetes.io/instance": spec.name}}}],
                           "ports": [{"port": ETCD_CLIENT_PORT, "protocol": "TCP"}]}]}}
    return [sts, service, policy]


def etcd_args(spec: FleetSpec) -> list[str]:
    name = etcd_name(spec.name)
    return [f"--name={name}-0", "--data-dir=/var/run/etcd/data",
            f"--listen-client-urls=http://0.0.0.0:{ETCD_CLIENT_PORT}",
            f"--advertise-client-urls=http://{name}:{ETCD_CLIENT_PORT}",
            f"--listen-metrics-urls=http://0.0.0.0:{ETCD_METRICS_PORT}",
            "--auto-compaction-mode=periodic", "--auto-compaction-retention=1h"]


def planner_args(spec: FleetSpec) -> list[str]:
    args = ["planner", "--connector", "kubernetes", "--namespace", spec.namespace,
            "--mode", "disagg" if spec.disaggregated else "agg",
            "--frontend-url", f"http://{frontend_name(spec.name)}:{HTTP_PORT}"]
    for pool in spec.pools:
        args += ["--deployment", f"{pool}={worker_deployment(spec.name, pool)}"]
    if spec.api_key_secret:
        args += ["--api-key", "$(TURBINE_API_KEY)"]  # the frontend's /metrics requires it
    return [*args, *spec.planner_args]


def planner_objects(spec: FleetSpec) -> list[dict[str, Any]]:
    """The planner and exactly the rights it needs: get and patch the Scale of its pools' Deployments."""
    name = planner_name(spec.name)
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(spec, name, "planner")}
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(spec, name, "planner"),
            "rules": [{"apiGroups": ["apps"], "resources": ["deployments/scale"],
                       "resourceNames": [worker_deployment(spec.name, p) for p in spec.pools],
                       "verbs": ["get", "patch"]}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": _meta(spec, name, "planner"),
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
               "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": spec.namespace}]}
    volumes, mounts = _model_volume(spec)
    c = _container(spec, "planner", planner_args(spec))
    if spec.api_key_secret:
        c["env"] = [{"name": "TURBINE_API_KEY",
                     "valueFrom": {"secretKeyRef": {"name": spec.api_key_secret, "key": "api-key"}}}]
    if mounts:
        c["volumeMounts"] = mounts  # a --profile may live beside the model
    pod: dict[str, Any] = {"serviceAccountName": name, "containers": [c]}
    if volumes:
        pod["volumes"] = volumes
    dep = _deployment(spec, name, "planner", None, 1, pod)
    dep["spec"]["strategy"] = {"type": "Recreate"}  # never two planners deciding at once
    return [account, role, binding, dep]


def render(spec: FleetSpec) -> list[dict[str, Any]]:
    """Every object of the fleet, in an order ``kubectl apply`` can take top to bottom."""
    out: list[dict[str, Any]] = []
    if spec.token_secret is None:
        out.append(token_secret(spec))
    if spec.etcd_url is None:
        out += etcd_objects(spec)
    out += [worker_objects(spec, p) for p in spec.pools]
    out += frontend_objects(spec)
    if spec.planner:
        out += planner_objects(spec)
    return out


__all__ = [
    "FleetSpec", "POOLS", "etcd_args", "etcd_name", "frontend_args", "frontend_name", "labels", "planner_args",
    "planner_name", "render", "token_secret_name", "worker_args", "worker_deployment",
]
