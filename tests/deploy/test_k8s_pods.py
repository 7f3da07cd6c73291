"""The rendered manifests run: each container of `turbine deploy k8s`'s Deployments started as a
process with the command, arguments and environment its pod would get (the Secret's token,
$(POD_IP) = 127.0.0.1, ports moved off the fixed 8000/8081 so that tests never collide), against a
real etcd. The probes answer as the kubelet expects; a SIGTERMed worker pod fails readiness, stays
live, leaves discovery and exits within its grace period with no request failed or moved."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from testkit import Load, assert_clean, free_port, metric_values, wait_workers

from turbine.deploy.k8s import HEALTH_PORT, HTTP_PORT, FleetSpec, render

pytestmark = pytest.mark.timeout(120)


def _probe(port: int, probe: dict[str, Any]) -> tuple[int, dict]:
    url = f"http://127.0.0.1:{port}{probe['httpGet']['path']}"
    try:
        with urllib.request.urlopen(url, timeout=probe["timeoutSeconds"]) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except OSError:  # not listening (yet, or any more): the probe fails
        return 0, {}


def _start_pod(dep: dict[str, Any], secrets: dict[str, dict], port: int, log: Path) -> subprocess.Popen:
    """The Deployment's one container as a process: its command and args, $(VAR)s substituted from
    its env, the env from the Secrets (and the downward API's status.podIP)."""
    c = dep["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = {}
    for e in c.get("env", []):
        src = e.get("valueFrom", {})
        if "fieldRef" in src:
            assert src["fieldRef"]["fieldPath"] == "status.podIP"
            env[e["name"]] = "127.0.0.1"
        else:
            ref = src["secretKeyRef"]
            env[e["name"]] = secrets[ref["name"]]["stringData"][ref["key"]]
    fixed = {str(HTTP_PORT), str(HEALTH_PORT)}
    args = []
    for a in c["args"]:
        for name, value in env.items():
            a = a.replace(f"$({name})", value)
        args.append(str(port) if a in fixed else a)
    assert c["command"] == ["turbine"]
    import os

    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "turbine", *args], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **env}, start_new_session=True)


def _until(what: str, check, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f} s"
        time.sleep(0.1)


def test_the_rendered_pods_serve_probe_and_drain(etcd, model_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = FleetSpec(image="turbine:test", model=str(model_dir), name="podtest", workers={"agg": 2},
                     etcd_url=f"{etcd.url}/k8s-pods-{time.monotonic_ns()}", cluster_token="pod-token",
                     request_timeout_s=20, worker_args=("--model-name", "tiny", "--speedup-ratio", "5"))
    objs = render(spec)
    secrets = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Secret"}
    deps = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Deployment"}
    container = {name: d["spec"]["template"]["spec"]["containers"][0] for name, d in deps.items()}
    pods: list[subprocess.Popen] = []
    try:
        fe_port = free_port()
        pods.append(_start_pod(deps["podtest-frontend"], secrets, fe_port, tmp_path / "frontend.log"))
        workers = []
        for i in range(deps["podtest-agg"]["spec"]["replicas"]):
            port = free_port()
            workers.append((port, _start_pod(deps["podtest-agg"], secrets, port, tmp_path / f"worker{i}.log")))
            pods.append(workers[-1][1])
        wc, fc = container["podtest-agg"], container["podtest-frontend"]
        for port, _ in workers:  # the startup probe's condition, then readiness and liveness
            _until("a worker's startup probe passing", lambda port=port: _probe(port, wc["startupProbe"])[0] == 200)
            assert _probe(port, wc["readinessProbe"])[0] == 200
            assert _probe(port, wc["livenessProbe"])[0] == 200
        _until("the frontend's readiness", lambda: _probe(fe_port, fc["readinessProbe"])[0] == 200)
        url = f"http://127.0.0.1:{fe_port}"
        wait_workers(url, 2, timeout=30)  # both found through etcd

        port, victim = workers[0]
        grace = deps["podtest-agg"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        with Load(url, concurrency=4) as load:
            load.wait_ok(8)
            victim.send_signal(signal.SIGTERM)  # what the kubelet sends a pod being scaled down
            t0 = time.monotonic()
            _until("readiness failing", lambda: _probe(port, wc["readinessProbe"])[0] != 200, timeout=5)
            code, body = _probe(port, wc["readinessProbe"])
            if code:  # still draining (not yet exited): not ready, and still live
                assert (code, body["status"]) == (503, "draining"), body
                assert _probe(port, wc["livenessProbe"])[0] == 200
            assert victim.wait(grace) == 0
            drained = time.monotonic() - t0
            wait_workers(url, 1, timeout=10)
            load.wait_ok(8)
        assert_clean(load.stats, at_least=16)
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            assert metric_values(r.read().decode(), "turbine_frontend_migrations_total") == [0.0]
        print(f"worker pod drained and exited {drained:.2f} s after SIGTERM (grace {grace} s)", file=sys.stderr)

        frontend = pods[0]
        frontend.send_signal(signal.SIGTERM)
        assert frontend.wait(deps["podtest-frontend"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]) == 0
    finally:
        for p in pods:
            if p.poll() is None:
                p.kill()
            p.wait()
