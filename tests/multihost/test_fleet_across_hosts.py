"""A fleet across hosts: network namespaces joined by a bridge, each one a machine with its own
address (hosts.py). etcd on h0, a frontend on h1, workers on h2 and h3, a second frontend on h4,
every process started as `ip netns exec hN python -m turbine ...` with etcd discovery and the
fleet's token. Checks serving, KV-aware routing from events that cross hosts, a second frontend,
and a host whose link goes down: its requests migrate (none fails), its workers leave discovery
when their lease expires, and come back by themselves when the link does.
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hosts import Hosts, unavailable

pytestmark = pytest.mark.timeout(240)

TOKEN = "multihost-fleet-token"
TTL = 2  # --discovery-ttl: a cut host's workers leave within ~TTL
STALL = 2.0  # frontends' --stall-timeout: streams of a silent worker move after this
ETCD, FRONTEND, WORKER_A, WORKER_B, FRONTEND_2 = range(5)
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Fleet:
    hosts: Hosts
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def url(self, host: int) -> str:
        return f"http://{self.hosts.addr(host)}:8000"

    def spawn(self, host: int, name: str, *args: str) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "wb") as log:
            p = subprocess.Popen([*self.hosts.cmd(host), sys.executable, "-m", "turbine", *args],
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = p
        return p

    def log_tails(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.logs.glob("*.log")))


def get(url: str, timeout: float = 3.0) -> bytes:
    with _direct.open(url, timeout=timeout) as r:
        return r.read()


def health(url: str) -> dict:
    try:
        return json.loads(get(url + "/health"))
    except OSError:
        return {}


def workers_of(url: str) -> dict[str, str]:
    """worker id -> its request-plane address, as this frontend sees discovery."""
    return {w: v["address"] for w, v in health(url).get("workers", {}).items()}


def wait_for(cond, timeout: float, what: str, fleet: Fleet) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout:g} s\n{fleet.log_tails()}")


def post(url: str, body: dict, timeout: float = 60.0) -> dict:
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with _direct.open(req, timeout=timeout) as r:
        return json.loads(r.read())


def metric(url: str, name: str) -> list[tuple[str, float]]:
    text = get(url + "/metrics").decode()
    return [(m.group(1) or "", float(m.group(2)))
            for m in re.finditer(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$", text, re.M)]


@pytest.fixture(scope="module")
def fleet(etcd_bin: str, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    why = unavailable()
    if why:
        pytest.skip(why)
    pytest.importorskip("aetcd")
    from etcdkit import EtcdServer

    logs = tmp_path_factory.mktemp("multihost")
    with Hosts(5) as hosts:
        f = Fleet(hosts, logs)
        etcd = EtcdServer(etcd_bin, logs / "etcd-data", host=hosts.addr(ETCD), client_port=2379, peer_port=2380,
                          prefix_cmd=hosts.cmd(ETCD))
        discovery = f"etcd://{hosts.addr(ETCD)}:2379"
        common = ["--discovery", discovery, "--discovery-ttl", str(TTL), "--cluster-token", TOKEN]
        try:
            etcd.start()
            for host, name in ((FRONTEND, "frontend"), (FRONTEND_2, "frontend2")):
                f.spawn(host, name, "frontend", *common, "--host", hosts.addr(host), "--port", "8000",
                        "--stall-timeout", str(STALL))
            for host, name in ((WORKER_A, "worker-a"), (WORKER_B, "worker-b")):
                f.spawn(host, name, "worker", *common, "--advertise-host", hosts.addr(host), "--engine", "mock",
                        "--model", str(model_dir), "--model-name", "tiny", "--speedup-ratio", "1",
                        "--block-size", "16")
            for url in (f.url(FRONTEND), f.url(FRONTEND_2)):
                wait_for(lambda u=url: len(workers_of(u)) == 2, 90, "both workers seen by " + url, f)
            yield f
        finally:
            for p in f.procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
            for p in f.procs.values():
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            etcd.kill()


def host_of(fleet: Fleet, address: str) -> int:
    return next(i for i in range(fleet.hosts.n) if f"//{fleet.hosts.addr(i)}:" in address)


def test_serving_across_hosts(fleet: Fleet) -> None:
    seen = workers_of(fleet.url(FRONTEND))
    assert sorted(host_of(fleet, a) for a in seen.values()) == [WORKER_A, WORKER_B]  # their own hosts' addresses
    for i in range(4):
        r = post(fleet.url(FRONTEND), {"model": "tiny", "prompt": f"hello {i}", "max_tokens": 5})
        assert r["usage"]["completion_tokens"] == 5


def test_kv_routing_from_events_that_cross_hosts(fleet: Fleet) -> None:
    url = fleet.url(FRONTEND)
    for i in range(3):
        prompt = f"document {i}: " + " ".join(f"w{i}x{j}" for j in range(300))
        first = post(url, {"model": "tiny", "prompt": prompt, "max_tokens": 2})
        again = post(url, {"model": "tiny", "prompt": prompt, "max_tokens": 2})
        cached = (again["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        assert cached >= 16 * ((first["usage"]["prompt_tokens"] - 16) // 16), (first["usage"], again["usage"])
    stored = sum(v for labels, v in metric(url, "turbine_router_kv_events_total") if 'type="BlockStored"' in labels)
    assert stored > 0, "KV events reached the router from the workers' hosts"
    both_reported(url, fleet)


def both_reported(url: str, fleet: Fleet) -> None:
    """Load reports from both workers' hosts reach the frontend at ``url``. Not at once: a report
    published before the frontend's subscription joined is not delivered (PUB/SUB), and an idle
    worker repeats its report once a second (the heartbeat), so allow a few of those."""
    wait_for(lambda: len(metric(url, "turbine_worker_kv_capacity_blocks")) == 2, 5,
             "load reports from both workers' hosts", fleet)


def test_a_second_frontend_on_another_host_serves_the_same_fleet(fleet: Fleet) -> None:
    url = fleet.url(FRONTEND_2)
    assert workers_of(url) == workers_of(fleet.url(FRONTEND))
    r = post(url, {"model": "tiny", "prompt": "from the second frontend", "max_tokens": 3})
    assert r["usage"]["completion_tokens"] == 3
    both_reported(url, fleet)


def test_a_peer_without_the_token_gets_nothing_from_a_worker(fleet: Fleet) -> None:
    """From the test's own host (the bridge), with another token: the worker's request plane
    closes the connection, its event plane refuses the subscription; with the fleet's token its
    events (load reports, every second) arrive."""
    import asyncio

    import aetcd
    import msgspec

    from turbine.runtime.discovery import Instance
    from turbine.runtime.events_zmq import ZmqEventSubscriber
    from turbine.runtime.request_plane import WorkerUnavailable
    from turbine.runtime.tcp import TcpClient

    async def probe() -> None:
        async with aetcd.Client(host=fleet.hosts.addr(ETCD), port=2379, timeout=5) as etcd:
            inst = msgspec.json.decode(next(iter(await etcd.get_prefix(b"/turbine/instances/"))).value,
                                       type=Instance)
        assert inst.event_address and host_of(fleet, inst.event_address) == host_of(fleet, inst.address)
        assert host_of(fleet, inst.address) in (WORKER_A, WORKER_B)  # both planes on the worker's own host
        client = TcpClient(token="not-the-fleet-token", connect_timeout=3)
        try:
            with pytest.raises(WorkerUnavailable):
                async for _ in client.stream(inst.address, "kv_state", b""):
                    pass
        finally:
            await client.close()
        stranger, member = ZmqEventSubscriber(token="not-the-fleet-token"), ZmqEventSubscriber(token=TOKEN)
        try:
            stranger.connect(inst.event_address)
            member.connect(inst.event_address)
            ev = await asyncio.wait_for(anext(member), 5)
            assert ev.topic in ("load", "kv")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(stranger), 2)
        finally:
            await stranger.close()
            await member.close()

    asyncio.run(probe())


def test_a_cut_host_migrates_its_requests_and_leaves_discovery(fleet: Fleet) -> None:
    url = fleet.url(FRONTEND)
    n, max_tokens = 6, 250
    results: list[dict | BaseException] = []
    started = threading.Semaphore(0)

    def stream(i: int) -> None:
        body = {"model": "tiny", "prompt": f"stream {i}", "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}}
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        chunks, usage, finish = 0, None, None
        try:
            with _direct.open(req, timeout=60) as r:
                for line in r:
                    if not line.startswith(b"data: {"):
                        continue
                    ev = json.loads(line[6:])
                    if ev.get("choices"):
                        chunks += 1
                        finish = ev["choices"][0].get("finish_reason") or finish
                        if chunks == 5:
                            started.release()
                    usage = ev.get("usage") or usage
            results.append({"finish": finish, "usage": usage})
        except BaseException as e:  # noqa: BLE001 - counted as a failed request
            results.append(e)
            started.release()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for _ in range(n):
        assert started.acquire(timeout=30)
    running = {labels: v for labels, v in metric(url, "turbine_worker_requests_running")}
    seen = workers_of(url)
    busy = {w: sum(v for labels, v in running.items() if f'worker="{w}"' in labels) for w in seen}
    victim = max(busy, key=busy.__getitem__)
    assert busy[victim] > 0, busy
    host = host_of(fleet, seen[victim])

    fleet.hosts.cut(host)
    t_cut = time.monotonic()
    try:
        gone = wait_for(lambda: victim not in workers_of(url), TTL + 6, "the cut host's worker leaves discovery", fleet)
        wait_for(lambda: victim not in workers_of(fleet.url(FRONTEND_2)), 3, "... on the second frontend too", fleet)
        for t in threads:
            t.join(timeout=60)
        failed = [r for r in results if not isinstance(r, dict) or r["finish"] != "length"
                  or r["usage"]["completion_tokens"] != max_tokens]
        assert not failed, failed
        assert len(results) == n
        migrations = sum(v for _, v in metric(url, "turbine_frontend_migrations_total"))
        assert migrations >= busy[victim], (migrations, busy)
        print(f"\ncut host: its worker left discovery {gone:.2f} s after the cut (TTL {TTL} s); "
              f"{int(busy[victim])} streams migrated, 0 failed")
    finally:
        fleet.hosts.restore(host)
    # the worker process never restarted: it registers again (a new lease) when its link is back
    back = wait_for(lambda: victim in workers_of(url), 30, "the restored host's worker registers again", fleet)
    assert fleet.procs["worker-a" if host == WORKER_A else "worker-b"].poll() is None
    print(f"restored host: its worker was back in discovery {back:.2f} s after the link "
          f"({time.monotonic() - t_cut:.1f} s after the cut)")
    r = post(url, {"model": "tiny", "prompt": "after the storm", "max_tokens": 3})
    assert r["usage"]["completion_tokens"] == 3
