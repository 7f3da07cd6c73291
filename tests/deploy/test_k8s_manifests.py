"""`turbine deploy k8s`: every rendered object valid against Kubernetes' own schemas (strict: an
unknown field is an error), consistent with itself (selectors, probe ports, Secrets, grace periods)
and with the planner's Kubernetes connector (it scales exactly the rendered Deployments)."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

kv = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")

from turbine.cli import _parse
from turbine.deploy.k8s import (DRAIN_MARGIN_S, FleetSpec, etcd_args, labels, render, worker_deployment)
from turbine.deploy.k8s_command import check_commands
from turbine.deploy.manifest_yaml import dump_all

# The oldest release the manifests target (a preStop `sleep` action needs 1.30+), and the newest
# kubernetes-validate knows.
K8S_VERSIONS = ("1.31", kv.latest_version())
TURBINE = [sys.executable, "-m", "turbine"]

FLEETS: dict[str, dict[str, Any]] = {
    "agg": dict(workers={"agg": 3}),
    "disagg": dict(workers={"prefill": 2, "decode": 1}, engine="vllm", pool_args={"decode": ("--", "-tp", "4")},
                   model_pvc="llama-weights"),
    "external-etcd": dict(workers={"agg": 2}, etcd_url="etcd://etcd-a.infra:2379,etcd-b.infra:2379/prod",
                          token_secret="fleet-token", model_host_path="/data/models", frontends=3,
                          service_type="LoadBalancer"),
    "planner": dict(workers={"prefill": 1, "decode": 1}, planner=True, api_key_secret="llama-api-key",
                    planner_args=("--profile", "/models/profile.json", "--sla-ttft-ms", "500", "--sla-itl-ms", "20"),
                    engine="builtin", worker_resources={"cpu": "8", "memory": "64Gi"}, request_timeout_s=120),
}


def _spec(kind: str) -> FleetSpec:
    return FleetSpec(image="registry.example/turbine:0.1", model="/models/llama", name="llama", namespace="serving",
                     cluster_token="t0k3n", **FLEETS[kind])


def _by(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return obj["spec"]["template"]["spec"]["containers"]


@pytest.mark.parametrize("fleet", sorted(FLEETS))
def test_every_object_is_valid_for_kubernetes(fleet: str) -> None:
    objs = render(_spec(fleet))
    for version in K8S_VERSIONS:
        for obj in objs:
            kv.validate(obj, version, strict=True)  # raises on any schema violation


def test_the_validation_rejects_broken_objects() -> None:
    """The check above has teeth: each of these breakages is refused."""
    dep = next(o for o in render(_spec("agg")) if o["kind"] == "Deployment")

    def broken(edit) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        obj = copy.deepcopy(dep)
        edit(obj)
        return obj

    breakages = [
        broken(lambda o: o["spec"].__setitem__("replicas", "three")),                     # wrong type
        broken(lambda o: o["spec"].pop("selector")),                                        # required field
        broken(lambda o: _containers(o)[0].__setitem__("readinessprobe", {})),              # unknown field (typo)
        broken(lambda o: _containers(o)[0]["livenessProbe"]["httpGet"].pop("port")),       # required in a probe
        broken(lambda o: o["spec"]["template"]["spec"].__setitem__("terminationGracePeriodSeconds", "30s")),
    ]
    for obj in breakages:
        with pytest.raises(kv.ValidationError):
            kv.validate(obj, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("fleet", sorted(FLEETS))
def test_objects_agree_with_each_other(fleet: str) -> None:
    spec = _spec(fleet)
    objs = render(spec)
    names = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names))
    assert all(o["metadata"]["namespace"] == "serving" for o in objs)
    secrets = _by(objs, "Secret")
    for obj in objs:
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod_labels = obj["spec"]["template"]["metadata"]["labels"]
        assert obj["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        for c in _containers(obj):
            ports = {p["name"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in c:
                    assert c[probe]["httpGet"]["port"] in ports, (obj["metadata"]["name"], probe)
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] == "llama-cluster-token":
                    assert ref["name"] in secrets and ref["key"] in secrets[ref["name"]]["stringData"]
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in obj["spec"]["template"]["spec"].get("volumes", [])}
    # the frontend Service reaches the frontend pods, on their named port
    svc = _by(objs, "Service")["llama-frontend"]
    fe = _by(objs, "Deployment")["llama-frontend"]
    assert svc["spec"]["selector"].items() <= fe["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] in {p["name"] for p in _containers(fe)[0]["ports"]}
    # every process finds the same discovery; etcd is rendered exactly when no URL is given
    discovery = {c["args"][c["args"].index("--discovery") + 1] for o in _by(objs, "Deployment").values()
                 for c in _containers(o) if "--discovery" in c["args"]}
    assert discovery == {spec.discovery_url}
    assert ("StatefulSet" in {o["kind"] for o in objs}) == (spec.etcd_url is None)
    if spec.etcd_url is None:
        assert spec.discovery_url == "etcd://llama-etcd:2379"
        policy = _by(objs, "NetworkPolicy")["llama-etcd"]
        allowed = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
        for o in _by(objs, "Deployment").values():  # every fleet pod may reach etcd
            assert allowed.items() <= o["spec"]["template"]["metadata"]["labels"].items()
    # the token comes from one Secret, rendered or named
    assert ("llama-cluster-token" in secrets) == (spec.token_secret is None)


@pytest.mark.parametrize("fleet", sorted(FLEETS))
def test_drain_fits_in_the_grace_period(fleet: str) -> None:
    spec = _spec(fleet)
    deps = _by(render(spec), "Deployment")
    for name, dep in deps.items():
        if name == "llama-planner":
            continue
        pod = dep["spec"]["template"]["spec"]
        args = _containers(dep)[0]["args"]
        drain = float(args[args.index("--drain-timeout") + 1])
        assert drain == spec.request_timeout_s  # by default no request can outlive the drain
        pre = _containers(dep)[0].get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert pod["terminationGracePeriodSeconds"] == pre + drain + DRAIN_MARGIN_S
        if name == "llama-frontend":
            assert pre == spec.prestop_s > 0
            assert args[args.index("--request-timeout") + 1] == f"{spec.request_timeout_s:g}"


def test_worker_deployments_per_pool_with_gpus_and_probes() -> None:
    objs = render(_spec("disagg"))
    deps = _by(objs, "Deployment")
    assert set(deps) == {"llama-frontend", "llama-prefill", "llama-decode"}
    for pool, replicas, gpus in (("prefill", 2, "1"), ("decode", 1, "4")):
        dep = deps[f"llama-{pool}"]
        assert dep["spec"]["replicas"] == replicas
        assert dep["metadata"]["labels"]["turbine.dev/pool"] == pool
        c = _containers(dep)[0]
        assert c["resources"]["limits"] == {"nvidia.com/gpu": gpus}
        assert c["args"][c["args"].index("--role") + 1] == pool
        assert c["readinessProbe"]["httpGet"]["path"] == "/health"
        assert c["livenessProbe"]["httpGet"]["path"] == "/live"
        assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 900
        assert c["command"] == ["turbine"]  # exec form: the kubelet's SIGTERM reaches turbine itself
    mock = _containers(_by(render(_spec("agg")), "Deployment")["llama-agg"])[0]
    assert "resources" not in mock  # the mocker needs no GPU


def test_planner_scales_exactly_the_rendered_deployments(monkeypatch: pytest.MonkeyPatch) -> None:
    k8s = pytest.importorskip("kubernetes.client")
    import turbine.planner.connectors.kubernetes as kconn
    from turbine.planner.planner_command import _connector, planner_config

    monkeypatch.setattr(kconn, "load_api_client", lambda kubeconfig=None: k8s.ApiClient(
        k8s.Configuration(host="http://127.0.0.1:9")))
    spec = _spec("planner")
    objs = render(spec)
    deps = _by(objs, "Deployment")
    workers = {o["metadata"]["labels"]["turbine.dev/pool"]: name for name, o in deps.items()
               if o["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"}
    assert workers == {"prefill": "llama-prefill", "decode": "llama-decode"}
    for name in workers.values():
        assert "replicas" not in deps[name]["spec"]  # the planner's: re-applying must not reset it
    # what the planner's pod runs, parsed and built as `turbine planner` builds it
    planner = _containers(deps["llama-planner"])[0]
    args = _parse([a.replace("$(TURBINE_API_KEY)", "k") for a in planner["args"][2:]])
    conn = _connector(args, planner_config(args, args.mode))
    assert conn.names == workers and conn.namespace == "serving"
    # its Role allows exactly those Deployments' Scale, and it runs under it
    role = _by(objs, "Role")["llama-planner"]
    assert role["rules"] == [{"apiGroups": ["apps"], "resources": ["deployments/scale"],
                              "resourceNames": sorted(workers.values(), reverse=True), "verbs": ["get", "patch"]}]
    assert deps["llama-planner"]["spec"]["template"]["spec"]["serviceAccountName"] == "llama-planner"
    binding = _by(objs, "RoleBinding")["llama-planner"]
    assert binding["roleRef"]["name"] == "llama-planner" and binding["subjects"][0]["name"] == "llama-planner"
    # and `turbine planner --fleet llama` names the same Deployments
    args = _parse(["planner", "--connector", "kubernetes", "--fleet", "llama", "--mode", "disagg", "--namespace",
                   "serving", "--profile", "x.json", "--sla-ttft-ms", "500", "--sla-itl-ms", "20"])
    assert _connector(args, planner_config(args, "disagg")).names == workers
    assert {p: worker_deployment("llama", p) for p in workers} == workers


@pytest.mark.parametrize("fleet", sorted(FLEETS))
def test_the_containers_run_what_the_cli_accepts(fleet: str) -> None:
    check_commands(_spec(fleet))  # raises ValueError naming the container whose arguments do not parse


def test_yaml_stream_reads_back_identically() -> None:
    for fleet in FLEETS:
        objs = render(_spec(fleet))
        assert list(yaml.safe_load_all(dump_all(objs))) == objs


def test_command_writes_yaml_and_refuses_mistakes(tmp_path: Path) -> None:
    base = [*TURBINE, "deploy", "k8s", "--image", "t:1", "--model", "/models/tiny", "--name", "demo"]
    out = subprocess.run([*base, "--prefill-workers", "2", "--decode-workers", "1", "--cluster-token", "abc"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    objs = list(yaml.safe_load_all(out.stdout))
    assert {(o["kind"], o["metadata"]["name"]) for o in objs} >= {
        ("Deployment", "demo-frontend"), ("Service", "demo-frontend"), ("Deployment", "demo-prefill"),
        ("Deployment", "demo-decode"), ("StatefulSet", "demo-etcd"), ("Secret", "demo-cluster-token")}
    assert _by(objs, "Secret")["demo-cluster-token"]["stringData"] == {"token": "abc"}

    out = subprocess.run([*base, "--out", str(tmp_path / "m")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    files = sorted((tmp_path / "m").iterdir())
    assert [f.name for f in files][:1] == ["00-secret-demo-cluster-token.yaml"]
    for f in files:
        kv.validate(yaml.safe_load(f.read_text()), K8S_VERSIONS[-1], strict=True)
    token = yaml.safe_load(files[0].read_text())["stringData"]["token"]
    assert len(token) >= 32  # a random one when none is given

    for extra, message in (
            (["--worker-args", "--max-num-seqs 8 --no-such-flag"], "worker's arguments do not parse"),
            (["--worker-args", "--role decode"], "--role is set by the manifests"),
            (["--frontend-args", "--port 9000"], "--port is set by the manifests"),
            (["--name", "Bad_Name"], "not a valid Kubernetes name"),
            (["--etcd", "http://etcd:2379"], "etcd://"),
            (["--workers", "2", "--decode-workers", "1"], "cannot be combined"),
            (["--worker-args", "'unclosed"], "--worker-args")):
        out = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and message in out.stderr, (extra, out.stderr)


@pytest.mark.skipif(shutil.which("etcd") is None, reason="no etcd binary")
def test_the_etcd_container_args_start_etcd(tmp_path: Path) -> None:
    """The StatefulSet's etcd arguments, as rendered, start a healthy etcd (the data directory
    moved to a temporary one; in a private network namespace when possible, since it listens on
    0.0.0.0:2379)."""
    args = [a if not a.startswith("--data-dir=") else f"--data-dir={tmp_path / 'etcd'}" for a in etcd_args(_spec("agg"))]
    probe = ("import time, urllib.request\n"
             "for _ in range(100):\n"
             "    try:\n"
             "        print(urllib.request.urlopen('http://127.0.0.1:2381/health', timeout=1).read().decode()); break\n"
             "    except OSError: time.sleep(0.1)\n")
    script = f"etcd {' '.join(args)} >{tmp_path / 'etcd.log'} 2>&1 & pid=$!; {sys.executable} -c \"{probe}\"; kill $pid; wait $pid"
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip"):
        cmd = ["unshare", "--net", "sh", "-c", "ip link set lo up && " + script]
    else:
        pytest.skip("etcd listens on 0.0.0.0:2379: only in a private network namespace (root)")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout.strip().splitlines()[0])["health"] == "true", \
        out.stdout + out.stderr + (tmp_path / "etcd.log").read_text()
