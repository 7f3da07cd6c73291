"""One Kubernetes Deployment per pool: the planner sets each Deployment's replica count.

The planner reads and writes only the Deployment's Scale subresource
(``/apis/apps/v1/namespaces/NS/deployments/NAME/scale``); the Deployment, its ReplicaSet and the
kubelet start and stop the pods. The connector owns no worker, so ``close()`` leaves them running.

How a scale-down drains
    The ReplicaSet controller picks the pod to remove, not the planner: pending or unscheduled pods
    first, then unready ones, then a lower ``controller.kubernetes.io/pod-deletion-cost``
    annotation, then pods on nodes that run more replicas, then the one ready for the shortest time
    or created last. The kubelet sends that pod's containers SIGTERM (so the container's command
    must exec ``turbine worker``, not a shell that swallows the signal); the Turbine worker leaves
    discovery (the router stops sending it requests, the frontend retries refused ones elsewhere),
    finishes what it runs within its ``--drain-timeout`` and exits. The kubelet sends SIGKILL
    ``terminationGracePeriodSeconds`` after SIGTERM, so the pod spec must set it above the worker's
    ``--drain-timeout`` (both default to 30 s: e.g. ``--drain-timeout 120`` with
    ``terminationGracePeriodSeconds: 150``), or a long generation is cut off. A preStop hook's
    time counts against the same grace period.

What the planner's ServiceAccount needs (a Role in the Deployments' namespace, bound to it)::

    rules:
    - apiGroups: ["apps"]
      resources: ["deployments/scale"]
      resourceNames: ["llama-prefill", "llama-decode"]   # optional: only these Deployments
      verbs: ["get", "patch"]

Do not also point a HorizontalPodAutoscaler at these Deployments: the two would fight over
``spec.replicas``. `turbine deploy k8s` renders Deployments that meet all of the above (exec
form, the grace period above the drain timeout, this Role, no ``replicas`` with ``--planner``);
``turbine planner --fleet NAME`` names its pools' Deployments.

Needs the ``kubernetes`` package (``pip install 'turbine[planner]'``). Its client is synchronous:
each call runs in a thread (``asyncio.to_thread``) with an HTTP timeout, so the event loop never
waits on the API server.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

try:
    import urllib3
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config
    from kubernetes.client.exceptions import ApiException
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the Kubernetes connector needs the `kubernetes` package: "
                      "pip install 'turbine[planner]' (or pip install kubernetes)") from e

log = logging.getLogger("turbine.planner.kubernetes")

POOLS = ("agg", "prefill", "decode")
T = TypeVar("T")


def load_api_client(kubeconfig: str | None = None) -> k8s.ApiClient:
    """An API client from ``kubeconfig`` if given, else the pod's ServiceAccount (in-cluster), else
    ``$KUBECONFIG`` or ``~/.kube/config``. Raises ValueError saying what was tried."""
    cfg = k8s.Configuration()
    if kubeconfig is not None:
        try:
            k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        except Exception as e:  # ConfigException, OSError, YAML errors: all mean "unusable file"
            raise ValueError(f"kubeconfig {kubeconfig!r} is not usable: {e}") from e
        return k8s.ApiClient(cfg)
    try:
        k8s_config.load_incluster_config(client_configuration=cfg)
        return k8s.ApiClient(cfg)
    except k8s_config.ConfigException as e:
        in_cluster = e
    try:
        k8s_config.load_kube_config(client_configuration=cfg)
    except Exception as e:  # as above
        raise ValueError(f"no Kubernetes configuration: not in a cluster ({in_cluster}), and the default "
                         f"kubeconfig ({k8s_config.KUBE_CONFIG_DEFAULT_LOCATION}) is not usable ({e}); "
                         "pass --kubeconfig") from e
    return k8s.ApiClient(cfg)


def _api_error(e: ApiException) -> str:
    """The API server's own message (its Status body), else the HTTP reason."""
    try:
        message = json.loads(e.body or "").get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message or e.reason or "no message")


class KubernetesConnector:
    def __init__(self, names: dict[str, str], *, namespace: str = "default", kubeconfig: str | None = None,
                 api: Any = None, request_timeout_s: float = 10.0) -> None:
        """``names[pool]``: the Deployment of that pool, in ``namespace``. ``api``: a configured
        ``kubernetes.client.ApiClient`` to use instead of loading a configuration (the connector
        closes it)."""
        if not names:
            raise ValueError("the Kubernetes connector needs a Deployment for at least one pool")
        for pool, name in names.items():
            if pool not in POOLS:
                raise ValueError(f"unknown pool {pool!r} (pools: {', '.join(POOLS)})")
            if not name:
                raise ValueError(f"pool {pool!r}: empty Deployment name")
        if not namespace:
            raise ValueError("empty namespace")
        if request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be > 0")
        if api is not None and kubeconfig is not None:
            raise ValueError("pass api or kubeconfig, not both")
        self.names = dict(names)
        self.namespace = namespace
        self.request_timeout_s = request_timeout_s
        self._api: Any = api if api is not None else load_api_client(kubeconfig)
        self._apps = k8s.AppsV1Api(self._api)

    async def current(self) -> dict[str, int]:
        """Each pool's Deployment ``spec.replicas``: the pods wanted, serving or starting.

        Pods that a scale-down is terminating are draining: the Deployment no longer counts them
        in ``spec.replicas``, and neither does the planner, as with the other connectors. (The
        Scale's ``status.replicas`` would count pods still starting or not yet replaced, and
        lag every decision by the controller's reaction time.)"""
        pools = list(self.names)
        replicas = await asyncio.gather(*(self._read(pool) for pool in pools))
        return dict(zip(pools, replicas, strict=True))

    async def _read(self, pool: str) -> int:
        scale = await self._call(pool, "read", self._apps.read_namespaced_deployment_scale)
        spec = scale.spec
        return int(spec.replicas or 0) if spec is not None else 0  # replicas 0 is omitted from the JSON

    async def scale(self, pool: str, replicas: int) -> None:
        """Patch the Deployment's ``spec.replicas``; returns once the API server has stored it (the
        pods start or drain after)."""
        if pool not in self.names:
            raise ValueError(f"no Deployment for pool {pool!r} (pools: {', '.join(self.names)})")
        if isinstance(replicas, bool) or not isinstance(replicas, int):
            raise TypeError(f"replicas must be an int, not {replicas!r}")
        if replicas < 0:
            raise ValueError("replicas must be >= 0")
        await self._call(pool, "scale", self._apps.patch_namespaced_deployment_scale,
                         body={"spec": {"replicas": replicas}})
        log.info("scaled Deployment %s/%s (%s) to %d replicas", self.namespace, self.names[pool], pool, replicas)

    async def _call(self, pool: str, verb: str, fn: Callable[..., T], **kwargs: Any) -> T:
        name = self.names[pool]
        # (connect, read): older clients (31.0 among them) silently ignore a lone float timeout.
        timeout = (self.request_timeout_s, self.request_timeout_s)
        try:
            return await asyncio.to_thread(fn, name, self.namespace, _request_timeout=timeout, **kwargs)
        except ApiException as e:
            raise RuntimeError(f"cannot {verb} Deployment {name!r} in namespace {self.namespace!r} ({pool} pool): "
                               f"HTTP {e.status}: {_api_error(e)}") from e
        except urllib3.exceptions.HTTPError as e:  # refused, reset, timed out
            raise RuntimeError(f"cannot {verb} Deployment {name!r} in namespace {self.namespace!r} ({pool} pool): "
                               f"Kubernetes API at {self._api.configuration.host} unreachable: {e}") from e

    async def close(self) -> None:
        """Nothing to stop: the Deployments own their pods, which keep running. Closes the client."""
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        self._api.close()
        pool_manager = getattr(getattr(self._api, "rest_client", None), "pool_manager", None)
        if pool_manager is not None:  # older clients' close() leaves the keep-alive sockets open
            pool_manager.clear()


__all__ = ["KubernetesConnector", "load_api_client"]
