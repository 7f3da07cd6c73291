"""`turbine serve --ray` and the planner's Ray connector on a two-node Ray cluster (two `ray start`
nodes on this machine, in a private network namespace: tests/deploy/raykit.py).

- serving through `serve --ray`: worker actors spread over both nodes with their GPU requests;
- a worker actor's process SIGKILLed under load: Ray restarts the actor, the replacement worker
  registers, and no request fails (streams on the dead worker migrate);
- disaggregated on etcd discovery: prefill and decode worker actors, prompts prefilled remotely, a
  planner deciding over the Ray connector (`serve --ray --planner`);
- the planner's Ray connector (built as `turbine planner --connector ray` builds it) adds a worker
  and drains one away under load: nothing fails, nothing migrates.

Marked ``ray``: excluded from the default run (Ray takes ~20 s to start); CI runs `pytest -m ray`.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from raykit import RayCluster, netns_missing, private_netns
from testkit import Load, assert_clean, free_port, health, metric_values, wait_workers

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]
pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'turbine[ray]')")
if netns_missing():
    pytest.skip(f"Ray tests run in a private network namespace: {netns_missing()}", allow_module_level=True)

PROFILE = Path(__file__).resolve().parents[2] / "bench" / "profiles" / "h200_llama3-8b_bf16.json"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    tmp = tmp_path_factory.mktemp("ray")
    with private_netns():
        c = RayCluster(tmp).start()
        print(f"ray cluster up: {c.timings}", file=sys.stderr)
        yield c


def _serve(cluster: RayCluster, model_dir: Path, log: Path, *args: str, speedup: float = 20) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log, "wb") as out:
        p = subprocess.Popen([sys.executable, "-m", "turbine", "serve", "--ray", cluster.address, "--model",
                              str(model_dir), "--model-name", "tiny", "--port", str(port), "--speedup-ratio",
                              str(speedup), *args], stdout=out, stderr=subprocess.STDOUT, env=cluster.env)
    return p, f"http://127.0.0.1:{port}"


def _wait(p: subprocess.Popen, log: Path, pattern: str, timeout: float = 120) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, log.read_text(errors="replace"))
        if m:
            return m
        assert p.poll() is None, f"serve --ray exited ({p.returncode}):\n{log.read_text()[-5000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} within {timeout:.0f} s:\n{log.read_text()[-5000:]}")


def _stop(p: subprocess.Popen, log: Path) -> None:
    p.send_signal(signal.SIGINT)
    try:
        assert p.wait(60) == 0, log.read_text()[-5000:]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _workers(url: str) -> dict[str, dict]:
    return health(url).get("workers", {})


def _chat(url: str, text: str = "Hello!", max_tokens: int = 8) -> dict:
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _chat_when_ready(url: str, timeout: float = 15) -> dict:
    """The first answer once the frontend has the model's tokenizer (503 "still loading" before)."""
    import urllib.error

    deadline = time.monotonic() + timeout
    while True:
        try:
            return _chat(url)
        except urllib.error.HTTPError as e:
            if e.code != 503 or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _metrics(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        return r.read().decode()


def _running(metrics: str) -> dict[str, float]:
    """Streams running on each worker, from the frontend's gauges of the workers' load reports."""
    out = {}
    for line in metrics.splitlines():
        m = re.match(r'turbine_worker_requests_running\{.*worker="([^"]+)".*\} (\S+)', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_serve_on_ray_and_a_killed_worker_actor_is_replaced(cluster: RayCluster, model_dir: Path,
                                                           tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    t0 = time.monotonic()
    # real-time steps (speed-up 2: a stream lasts ~0.5 s) and round-robin routing, so that streams
    # are mid-way on the killed worker (a prefix-aware router may well put them all on the other)
    p, url = _serve(cluster, model_dir, log, "--workers", "2", "--ray-num-gpus", "1", "--router", "round-robin",
                    speedup=2)
    try:
        m = _wait(p, log, r"on Ray \((\d+) worker actors on (\d+) node\(s\), (\S+) GPU each\)")
        started = time.monotonic() - t0
        assert m.groups() == ("2", "2", "1")  # spread: one per node, each with its GPU
        assert _chat(url)["usage"]["completion_tokens"] == 8
        before = _workers(url)
        assert len(before) == 2

        with Load(url, concurrency=6) as load:
            load.wait_ok(12)
            # the worker with streams on it (the load's repeated prompt may all go to its prefix's holder)
            busy: dict[str, float] = {}
            deadline = time.monotonic() + 30
            while not any(busy.values()) and time.monotonic() < deadline:
                busy = _running(_metrics(url))
                time.sleep(0.05)
            victim_id = max(before, key=lambda w: busy.get(w, 0.0))
            assert busy.get(victim_id), f"no worker reports running streams under load: {busy}"
            victim = before[victim_id]
            pid = int(victim["pid"])
            os.kill(pid, signal.SIGKILL)  # the worker actor's whole process
            t_kill = time.monotonic()
            left = replaced = None
            while time.monotonic() - t_kill < 60:
                now = _workers(url)
                if left is None and victim_id not in now:
                    left = time.monotonic() - t_kill
                if len(now) == 2 and victim_id not in now:
                    replaced = time.monotonic() - t_kill
                    break
                time.sleep(0.05)
            assert replaced is not None, f"no replacement worker within 60 s: {_workers(url)}\n{log.read_text()[-4000:]}"
            new_id = next(w for w in now if w not in before)
            assert int(now[new_id]["pid"]) != pid and not _alive(pid)
            load.wait_ok(12)  # serving continues on both
        assert_clean(load.stats, at_least=24)  # zero failed or truncated streams
        migrated = metric_values(_metrics(url), "turbine_frontend_migrations_total")
        print(f"serve --ray ready in {started:.1f} s; killed worker left discovery in {left:.2f} s, replacement "
              f"registered {replaced:.2f} s after the kill; {load.stats.ok} streams ok, "
              f"{migrated} migrated", file=sys.stderr)
        assert migrated and migrated[0] >= 1  # streams that were on the killed worker continued elsewhere
    finally:
        _stop(p, log)
    assert health(url) == {}  # the frontend actor is gone
    deadline = time.monotonic() + 20  # the driver ended its actors: their worker processes exit
    while any(_alive(int(w["pid"])) for w in now.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(int(w["pid"])) for w in now.values())


def test_serve_on_ray_disaggregated_with_a_planner(cluster: RayCluster, model_dir: Path, tmp_path: Path) -> None:
    """On etcd discovery (what actors on several machines use), started inside the namespace."""
    from etcdkit import EtcdServer, etcd_binary

    etcd_path, why = etcd_binary()
    if etcd_path is None:
        pytest.skip(why)
    etcd = EtcdServer(etcd_path, tmp_path / "etcd-data").start()
    log = tmp_path / "serve.log"
    p, url = _serve(cluster, model_dir, log, "--prefill-workers", "1", "--decode-workers", "1",
                    "--discovery", etcd.url, "--disagg-min-prefill-tokens", "1", "--planner", "--profile",
                    str(PROFILE), "--sla-ttft-ms", "5000", "--sla-itl-ms", "1000", "--planner-interval", "1",
                    "--planner-max-workers", "1")
    try:
        m = _wait(p, log, r"on Ray \((\d+) worker actors on (\d+) node\(s\), (\S+) GPU each\)")
        assert m[1] == "2" and m[3] == "0"  # the mocker asks for no GPU
        for i in range(4):
            assert _chat(url, f"request {i}: " + "a long prompt " * 40)["usage"]["completion_tokens"] == 8
        metrics = _metrics(url)
        remote = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("turbine_disagg_decisions_total{") and "remote" in line]
        assert remote and remote[0] >= 1, [x for x in metrics.splitlines() if "disagg" in x]
        assert metric_values(metrics, "turbine_disagg_pulled_blocks_total")[0] > 0
        # the planner reads the frontend actor's /metrics and decides over the Ray connector's pools
        decision = json.loads(_wait(p, log, r"planner decision (\{.*\})", timeout=60)[1])
        assert {"prefill", "decode"} <= set(json.dumps(decision).replace('"', " ").split()), decision
    finally:
        _stop(p, log)
        etcd.kill()


class Driver:
    """ray_connector_child.py: a Ray driver holding the planner's Ray connector, one command a line."""

    def __init__(self, cluster: RayCluster, planner_args: list[str]) -> None:
        child = Path(__file__).with_name("ray_connector_child.py")
        self.p = subprocess.Popen([sys.executable, str(child), "--", *planner_args], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=cluster.env)
        assert "RayConnector" in self._line(120)["ready"]

    def _line(self, timeout: float) -> dict:
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.p.stdout, selectors.EVENT_READ)
        assert sel.select(timeout), f"the driver did not answer within {timeout:.0f} s"
        line = self.p.stdout.readline()
        assert line, f"the driver exited ({self.p.wait()})"
        return json.loads(line)

    def __call__(self, command: str, timeout: float = 120) -> dict:
        self.p.stdin.write(command + "\n")
        self.p.stdin.flush()
        return self._line(timeout)

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


def test_planner_ray_connector_adds_and_drains_a_worker(cluster: RayCluster, model_dir: Path, tmp_path: Path,
                                                        procs) -> None:  # type: ignore[no-untyped-def]
    from testkit import spawn

    disc = tmp_path / "discovery"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spawn(procs, "frontend", "--discovery-dir", str(disc), "--port", str(port))
    driver = Driver(cluster, ["planner", "--connector", "ray", "--ray-address", cluster.address,
                              "--discovery-dir", str(disc), "--worker-args",
                              f"--model {model_dir} --model-name tiny --speedup-ratio 20",
                              "--profile", str(PROFILE), "--sla-ttft-ms", "500", "--sla-itl-ms", "20"])
    try:
        assert driver("current")["current"] == {"agg": 0}
        first = driver("scale agg 1")
        assert first["current"] == {"agg": 1}
        wait_workers(url, 1, timeout=10)
        assert _chat_when_ready(url)["usage"]["completion_tokens"] == 8  # the frontend found it (file discovery, the token)

        with Load(url, concurrency=4) as load:
            load.wait_ok(4)
            added = driver("scale agg 2")  # returns once the new actor serves
            assert added["current"] == {"agg": 2}
            wait_workers(url, 2, timeout=10)
            load.wait_ok(6)
            assert driver("scale agg 1")["current"] == {"agg": 1}  # the newest drains in the background
            driver("wait_drained")
            wait_workers(url, 1, timeout=5)  # the frontend's next look at discovery
            load.wait_ok(4)
        assert_clean(load.stats, at_least=14)
        assert metric_values(_metrics(url), "turbine_frontend_migrations_total") == [0.0]  # drained, not cut
        print(f"ray connector: first worker actor in {first['seconds']:.1f} s, the second in "
              f"{added['seconds']:.1f} s", file=sys.stderr)
        assert driver("close")["current"] == {"agg": 0}  # it owns its actors: the last one drains
        deadline = time.monotonic() + 10
        while _workers(url) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _workers(url) == {}
    finally:
        driver.close()
