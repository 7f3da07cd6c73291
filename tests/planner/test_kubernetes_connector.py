"""The Kubernetes connector, through the real `kubernetes` client, against a fake API server.

No kube-apiserver can run here (no registry this project reaches ships one), so the test starts an
HTTP server on 127.0.0.1 that implements the two endpoints the connector uses, the Deployment's
Scale subresource, as the API server does (omitted zero replicas, strategic-merge and merge patches,
Status bodies for errors), and records every request. Bodies on both sides are checked against the
official client's models, field by field.
"""
from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple, Self

import pytest

k8s = pytest.importorskip("kubernetes.client")
kube_config = pytest.importorskip("kubernetes.config.kube_config")

from turbine.planner.connectors.kubernetes import KubernetesConnector

pytestmark = pytest.mark.timeout(60)

NS = "prod"
SCALE_PATH = re.compile(r"^/apis/apps/v1/namespaces/(?P<ns>[a-z0-9-]+)/deployments/(?P<name>[a-z0-9.-]+)/scale$")
MERGE_PATCHES = ("application/strategic-merge-patch+json", "application/merge-patch+json")


# -- the client's models as a schema --------------------------------------------------------------
def check_model(data: Any, model: str) -> None:
    """``data`` is the JSON of ``model`` (a `kubernetes.client` model): every key one of its fields,
    every value of the field's type. Stricter than the client's deserializer, which drops unknown
    keys. Handles both generators' type spellings (``dict(str, str)``, ``Dict[str, str]``)."""
    klass = getattr(k8s, model)
    assert isinstance(data, dict), f"{model}: {data!r} is not an object"
    fields = {json_key: attr for attr, json_key in klass.attribute_map.items()}
    for key, value in data.items():
        assert key in fields, f"{model} has no field {key!r}"
        _check_type(value, klass.openapi_types[fields[key]], f"{model}.{key}")


def _check_type(value: Any, t: str, where: str) -> None:
    if value is None:
        return
    if m := re.fullmatch(r"(?:list|List)\[(.+)\]", t):
        assert isinstance(value, list), where
        for v in value:
            _check_type(v, m[1], where)
    elif m := re.fullmatch(r"(?:dict\(str, |Dict\[str, )(.+)[\])]", t):
        assert isinstance(value, dict), where
        for v in value.values():
            _check_type(v, m[1], where)
    elif t == "int":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r} is not an int"
    elif t == "str":
        assert isinstance(value, str), f"{where}: {value!r} is not a string"
    elif t == "bool":
        assert isinstance(value, bool), where
    elif t == "datetime":
        assert isinstance(value, str) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", value), where
    elif t != "object":
        check_model(value, t)


def test_check_model_rejects_what_the_api_would_not_send() -> None:
    check_model({"kind": "Scale", "spec": {"replicas": 2}, "metadata": {"labels": {"a": "b"}}}, "V1Scale")
    for bad in ({"spec": {"replica": 2}}, {"spec": {"replicas": "2"}}, {"spec": {"replicas": True}},
                {"metadata": {"labels": {"a": 1}}}, {"specs": {}}):
        with pytest.raises(AssertionError):
            check_model(bad, "V1Scale")


# -- the fake API server --------------------------------------------------------------------------
class Request(NamedTuple):
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names
    body: Any  # parsed JSON, or None


class FakeKubeApi:
    """The Scale subresource of Deployments, as served by kube-apiserver (apps/v1)."""

    def __init__(self, deployments: dict[str, int], *, namespace: str = NS, token: str | None = None) -> None:
        self.replicas = {(namespace, name): n for name, n in deployments.items()}  # spec.replicas
        self.observed = dict(self.replicas)  # status.replicas: the controller never catches up here
        self.token = token
        self.forbidden: set[tuple[str, str]] = set()  # (verb "get" | "patch", deployment name)
        self.patch_delay_s = 0.0
        self.requests: list[Request] = []
        self._version = 1000
        self._release = threading.Event()  # ends a delayed reply early at teardown
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def api_client(self) -> Any:
        return k8s.ApiClient(k8s.Configuration(host=self.url))

    def scale_object(self, ns: str, name: str) -> dict[str, Any]:
        n, seen = self.replicas[(ns, name)], self.observed[(ns, name)]
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}",
                             "resourceVersion": str(self._version), "creationTimestamp": "2026-11-30T10:00:00Z"},
                "spec": {"replicas": n} if n else {},  # Go's omitempty: zero replicas are left out
                "status": {"replicas": seen, "selector": f"app={name}"}}

    @staticmethod
    def status(code: int, reason: str, message: str, name: str | None = None) -> dict[str, Any]:
        out = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
               "reason": reason, "code": code}
        if name is not None:
            out["details"] = {"name": name, "group": "apps", "kind": "deployments"}
        return out

    def handle(self, req: Request) -> tuple[int, dict[str, Any]]:
        self.requests.append(req)
        if self.token is not None and req.headers.get("authorization") != f"Bearer {self.token}":
            return 401, self.status(401, "Unauthorized", "Unauthorized")
        m = SCALE_PATH.match(req.path)
        if m is None:
            return 404, self.status(404, "NotFound", "the server could not find the requested resource")
        ns, name = m["ns"], m["name"]
        verb = {"GET": "get", "PATCH": "patch"}.get(req.method)
        if verb is None:
            return 405, self.status(405, "MethodNotAllowed", f"the server does not allow this method on {req.path}")
        if (verb, name) in self.forbidden:
            return 403, self.status(403, "Forbidden", f'deployments.apps "{name}" is forbidden: User '
                                    f'"system:serviceaccount:{ns}:turbine-planner" cannot {verb} resource '
                                    f'"deployments/scale" in API group "apps" in the namespace "{ns}"', name)
        if (ns, name) not in self.replicas:
            return 404, self.status(404, "NotFound", f'deployments.apps "{name}" not found', name)
        if verb == "patch":
            ctype = req.headers.get("content-type", "")
            if ctype not in (*MERGE_PATCHES, "application/json-patch+json"):
                return 415, self.status(415, "UnsupportedMediaType", f"the body of the request was in an unknown "
                                        f"format - accepted media types include: {', '.join(MERGE_PATCHES)}")
            if ctype == "application/json-patch+json" or not isinstance(req.body, dict):
                return 400, self.status(400, "BadRequest", "this fake applies object patches only")
            replicas = (req.body.get("spec") or {}).get("replicas", self.replicas[(ns, name)])
            if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
                return 422, self.status(422, "Invalid", f'Scale.autoscaling "{name}" is invalid: spec.replicas: '
                                        "Invalid value: must be greater than or equal to 0", name)
            if self.patch_delay_s:
                self._release.wait(self.patch_delay_s)
            self.replicas[(ns, name)] = replicas
            self._version += 1
        return 200, self.scale_object(ns, name)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

            def _serve(self) -> None:
                path, _, query = self.path.partition("?")
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                req = Request(self.command, path, query, {k.lower(): v for k, v in self.headers.items()},
                              json.loads(raw) if raw else None)
                code, body = fake.handle(req)
                check_model(body, "V1Scale" if code == 200 else "V1Status")  # the fake answers as the API does
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PATCH = do_PUT = do_POST = do_DELETE = _serve

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


NAMES = {"prefill": "llama-prefill", "decode": "llama-decode"}


@pytest.fixture
def fake() -> Iterator[FakeKubeApi]:
    with FakeKubeApi({"llama-prefill": 2, "llama-decode": 0, "llama-agg": 1}) as f:
        yield f


@pytest.fixture
async def conn(fake: FakeKubeApi) -> AsyncIterator[KubernetesConnector]:
    c = KubernetesConnector(NAMES, namespace=NS, api=fake.api_client(), request_timeout_s=5.0)
    yield c
    await c.close()


def _scale_path(name: str, ns: str = NS) -> str:
    return f"/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale"


# -- reading and scaling --------------------------------------------------------------------------
async def test_current_reads_each_pools_scale(fake: FakeKubeApi, conn: KubernetesConnector) -> None:
    assert await conn.current() == {"prefill": 2, "decode": 0}  # decode's Scale omits its zero replicas
    assert sorted((r.method, r.path, r.query, r.body) for r in fake.requests) == [
        ("GET", _scale_path("llama-decode"), "", None), ("GET", _scale_path("llama-prefill"), "", None)]
    assert all(r.headers["accept"] == "application/json" for r in fake.requests)


async def test_scale_patches_the_pools_deployment(fake: FakeKubeApi, conn: KubernetesConnector) -> None:
    await conn.scale("decode", 3)
    (req,) = fake.requests
    assert (req.method, req.path, req.query) == ("PATCH", _scale_path("llama-decode"), "")
    # The client sends a dict body as a strategic merge patch (JSON Patch would need a list).
    assert req.headers["content-type"] == "application/strategic-merge-patch+json"
    assert req.body == {"spec": {"replicas": 3}}
    check_model(req.body, "V1Scale")  # a patch of a Scale is a partial Scale
    assert fake.replicas == {(NS, "llama-prefill"): 2, (NS, "llama-decode"): 3, (NS, "llama-agg"): 1}
    assert await conn.current() == {"prefill": 2, "decode": 3}  # desired, though no pod has started yet

    await conn.scale("prefill", 0)  # to zero: the patch says 0, the next read omits it
    assert fake.requests[-1].body == {"spec": {"replicas": 0}}
    assert await conn.current() == {"prefill": 0, "decode": 3}


async def test_unknown_pool_and_bad_replicas_are_refused_before_any_request(
        fake: FakeKubeApi, conn: KubernetesConnector) -> None:
    for pool, n in (("agg", 1), ("nope", 1), ("decode", -1)):
        with pytest.raises(ValueError):
            await conn.scale(pool, n)
    for n in (1.5, True):
        with pytest.raises(TypeError):
            await conn.scale("decode", n)  # type: ignore[arg-type]
    assert fake.requests == []


async def test_api_errors_name_the_deployment_namespace_and_status(fake: FakeKubeApi) -> None:
    conn = KubernetesConnector({"agg": "llama-gone"}, namespace=NS, api=fake.api_client())
    try:
        with pytest.raises(RuntimeError, match=r"'llama-gone' in namespace 'prod' \(agg pool\): HTTP 404: "
                                               r'deployments.apps "llama-gone" not found'):
            await conn.current()
        with pytest.raises(RuntimeError, match=r"cannot scale Deployment 'llama-gone'.*HTTP 404"):
            await conn.scale("agg", 2)
    finally:
        await conn.close()

    fake.forbidden.add(("patch", "llama-decode"))
    conn = KubernetesConnector(NAMES, namespace=NS, api=fake.api_client())
    try:
        assert await conn.current() == {"prefill": 2, "decode": 0}  # get is allowed
        with pytest.raises(RuntimeError, match=r"cannot scale Deployment 'llama-decode' in namespace 'prod' "
                                               r"\(decode pool\): HTTP 403: .*cannot patch resource "
                                               r'"deployments/scale"'):
            await conn.scale("decode", 2)
    finally:
        await conn.close()
    assert fake.replicas[(NS, "llama-decode")] == 0


async def test_a_slow_api_neither_blocks_the_loop_nor_hangs(fake: FakeKubeApi) -> None:
    fake.patch_delay_s = 5.0
    conn = KubernetesConnector(NAMES, namespace=NS, api=fake.api_client(), request_timeout_s=0.5)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    t0 = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"cannot scale Deployment 'llama-decode'.*unreachable.*timed out"):
            await conn.scale("decode", 4)
    finally:
        ticker.cancel()
        await conn.close()
    assert time.monotonic() - t0 < 3.0  # the request timeout, not the server's 5 s
    assert ticks >= 10  # the loop kept running while the client waited


async def test_an_unreachable_api_is_a_runtime_error() -> None:
    with FakeKubeApi({}) as gone:
        url = gone.url
    conn = KubernetesConnector(NAMES, namespace=NS, api=k8s.ApiClient(k8s.Configuration(host=url)),
                               request_timeout_s=1.0)
    try:
        with pytest.raises(RuntimeError, match=rf"Kubernetes API at {url} unreachable"):
            await conn.current()
    finally:
        await conn.close()


async def test_close_leaves_the_deployments_running(fake: FakeKubeApi) -> None:
    conn = KubernetesConnector(NAMES, namespace=NS, api=fake.api_client())
    await conn.scale("decode", 2)
    await conn.close()
    assert [r.method for r in fake.requests] == ["PATCH"]
    assert fake.replicas[(NS, "llama-decode")] == 2


# -- configuration --------------------------------------------------------------------------------
def _kubeconfig(path: Any, server: str, token: str) -> str:
    path.write_text(json.dumps({  # JSON is YAML
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "planner", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "c", "user": "planner", "namespace": NS}}]}))
    return str(path)


@pytest.fixture
def no_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Any:
    """Not in a pod, and no default kubeconfig."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "absent"))
    return monkeypatch


async def test_a_kubeconfig_file_reaches_its_server_with_its_token(tmp_path: Any, no_cluster: Any) -> None:
    with FakeKubeApi({"llama-agg": 3}, token="s3cret") as api:
        path = _kubeconfig(tmp_path / "kubeconfig", api.url, "s3cret")
        conn = KubernetesConnector({"agg": "llama-agg"}, namespace=NS, kubeconfig=path)  # as the CLI builds it
        try:
            assert await conn.current() == {"agg": 3}
            await conn.scale("agg", 1)
        finally:
            await conn.close()
        assert [(r.method, r.headers["authorization"]) for r in api.requests] == [
            ("GET", "Bearer s3cret"), ("PATCH", "Bearer s3cret")]

        # No --kubeconfig and no cluster: the default kubeconfig.
        no_cluster.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", path)
        conn = KubernetesConnector({"agg": "llama-agg"}, namespace=NS)
        try:
            assert await conn.current() == {"agg": 1}
        finally:
            await conn.close()


def test_a_bad_kubeconfig_is_a_clear_value_error(tmp_path: Any, no_cluster: Any) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ValueError, match=rf"kubeconfig '{missing}' is not usable"):
        KubernetesConnector(NAMES, kubeconfig=str(missing))
    garbage = tmp_path / "garbage.yaml"
    garbage.write_text("clusters: [unclosed\n")
    with pytest.raises(ValueError, match=rf"kubeconfig '{garbage}' is not usable"):
        KubernetesConnector(NAMES, kubeconfig=str(garbage))
    with pytest.raises(ValueError, match=r"no Kubernetes configuration: not in a cluster .*pass --kubeconfig"):
        KubernetesConnector(NAMES)


def test_constructor_checks_its_arguments(fake: FakeKubeApi, tmp_path: Any) -> None:
    for names in ({}, {"gpu": "x"}, {"agg": ""}):
        with pytest.raises(ValueError):
            KubernetesConnector(names, api=fake.api_client())
    with pytest.raises(ValueError, match="not both"):
        KubernetesConnector(NAMES, api=fake.api_client(), kubeconfig=str(tmp_path / "k"))
