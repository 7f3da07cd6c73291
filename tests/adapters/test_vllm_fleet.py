"""A Turbine fleet of two `turbine worker --engine vllm` processes behind `turbine frontend --router kv`,
next to vLLM's own OpenAI server on the same checkpoint (all processes started once per module).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm]')")

import openai  # noqa: E402

pytestmark = pytest.mark.timeout(300)  # the module's first test also starts vLLM

from testkit import free_port, metric_values  # noqa: E402

BS = 32
ENGINE_ARGS = ["--enforce-eager", "--max-num-seqs", "8", "--max-model-len", "1024", "--seed", "0",
               "--distributed-executor-backend", "uni", "--dtype", "float32"]
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_HOST_IP": "127.0.0.1",
       "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def prompt(i: int, n: int) -> list[int]:
    return [(41 * i + 13 * j) % 4000 + 20 for j in range(n)]


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read()


def ready(url: str) -> bool:
    try:
        get(url)
        return True
    except OSError:
        return False


@dataclass
class Deployment:
    tmp: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)  # worker name -> its vLLM metrics URL
    url: str = ""
    vllm_url: str = ""

    def spawn(self, name: str, *cmd: str) -> subprocess.Popen:
        with open(self.tmp / f"{name}.log", "wb") as log:
            p = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                 env={**os.environ, **ENV})
        self.procs[name] = p
        return p

    def worker_ids(self) -> list[str]:
        return [w["instance_id"] if isinstance(w, dict) else w
                for w in json.loads(get(self.url + "/health")).get("models", {}).get("tiny", [])]

    def wait(self, what: str, cond, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not cond():
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None and "killed" not in n}
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}\n" + (self.tmp / f"{n}.log").read_text()[-3000:] for n in self.procs)
                raise AssertionError(f"{what}: not ready in {timeout} s (exited: {dead})\n{logs}")
            time.sleep(0.2)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            try:  # the whole session: an engine core left behind too
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


@pytest.fixture(scope="module")
def dep(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = Deployment(tmp_path_factory.mktemp("vllm-fleet"))
    disc = d.tmp / "discovery"
    turbine = [sys.executable, "-m", "turbine", "--log-level", "WARNING"]
    try:
        vllm_port = free_port()
        d.vllm_url = f"http://127.0.0.1:{vllm_port}"
        d.spawn("vllm-server", sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(vllm_port),
                "--block-size", str(BS), *ENGINE_ARGS)
        for i in range(2):
            mport = free_port()
            d.metrics[f"w{i}"] = f"http://127.0.0.1:{mport}"
            d.spawn(f"w{i}", *turbine, "worker", "--engine", "vllm", "--model", str(model_dir), "--model-name", "tiny",
                    "--discovery-dir", str(disc), "--block-size", str(BS), "--vllm-metrics-port", str(mport),
                    *ENGINE_ARGS[:1], "--", *ENGINE_ARGS[1:])
        port = free_port()
        d.url = f"http://127.0.0.1:{port}"
        d.spawn("frontend", *turbine, "frontend", "--discovery-dir", str(disc), "--port", str(port), "--router", "kv")
        d.wait("two vLLM workers", lambda: ready(d.url + "/health") and len(d.worker_ids()) == 2)
        d.wait("vLLM's OpenAI server", lambda: ready(d.vllm_url + "/v1/models"))
        yield d
    finally:
        d.stop()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)


def running_in_vllm(dep: Deployment) -> float:
    return sum(sum(metric_values(get(u + "/metrics").decode(), "vllm:num_requests_running")) for u in dep.metrics.values())


def test_repeated_prompts_go_to_the_worker_holding_them(dep: Deployment) -> None:
    c = client(dep.url)
    prompts = [prompt(i, 200 + 9 * i) for i in range(8)]
    for p in prompts:
        r = c.completions.create(model="tiny", prompt=p, max_tokens=2, temperature=0)
        assert r.usage.prompt_tokens_details.cached_tokens == 0
    time.sleep(0.3)  # the last KV events reach the frontend
    for p in prompts:
        r = c.completions.create(model="tiny", prompt=p, max_tokens=2, temperature=0)
        assert r.usage.prompt_tokens_details.cached_tokens == (len(p) - 1) // BS * BS
    text = get(dep.url + "/metrics").decode()
    # the router's predicted overlap equals vLLM's num_cached_tokens, request by request
    assert metric_values(text, "turbine_router_overlap_observations_total") == [16]
    assert metric_values(text, "turbine_router_overlap_error_blocks_total") == [0]
    assert metric_values(text, "turbine_router_predicted_overlap_blocks_total")[0] == \
        sum((len(p) - 1) // BS for p in prompts)
    assert metric_values(text, "turbine_router_kv_events_rejected_total") == [0]
    hits = [sum(metric_values(get(u + "/metrics").decode(), "vllm:prefix_cache_hits_total")) for u in dep.metrics.values()]
    assert sum(hits) == sum((len(p) - 1) // BS * BS for p in prompts)


def test_greedy_output_equals_vllms_own_server(dep: Deployment) -> None:
    ours, theirs = client(dep.url), client(dep.vllm_url)
    for i, n in ((30, 12), (31, 100), (32, 333)):
        kw = dict(model="tiny", prompt=prompt(i, n), max_tokens=24, temperature=0)
        a, b = ours.completions.create(**kw), theirs.completions.create(**kw)  # type: ignore[call-overload]
        assert a.choices[0].text == b.choices[0].text, (i, n)
        assert a.usage.completion_tokens == b.usage.completion_tokens
    msgs = [{"role": "user", "content": "Explain the event loop and its tasks. " * 4}]
    a = ours.chat.completions.create(model="tiny", messages=msgs, max_tokens=24, temperature=0)  # type: ignore[arg-type]
    b = theirs.chat.completions.create(model="tiny", messages=msgs, max_tokens=24, temperature=0)  # type: ignore[arg-type]
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    assert a.choices[0].message.content == b.choices[0].message.content


def test_streaming_and_cancellation(dep: Deployment) -> None:
    c = client(dep.url)
    p = prompt(40, 150)
    whole = c.completions.create(model="tiny", prompt=p, max_tokens=20, temperature=0).choices[0].text
    chunks = list(c.completions.create(model="tiny", prompt=p, max_tokens=20, temperature=0, stream=True))
    assert len(chunks) > 3 and "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole

    stream = c.completions.create(model="tiny", prompt=prompt(41, 150), max_tokens=800, temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    assert running_in_vllm(dep) >= 1  # still generating in vLLM...
    stream.close()  # ...until the client leaves
    dep.wait("vLLM to abort the request", lambda: running_in_vllm(dep) == 0, timeout=10)


def children(pid: int) -> list[int]:
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


def test_a_killed_vllm_worker_leaves_the_fleet(dep: Deployment) -> None:
    victim = dep.procs["w0"]
    core = children(victim.pid)
    assert core, "the worker runs vLLM's engine core in a child process"
    victim.kill()
    dep.procs["killed"] = dep.procs.pop("w0")
    dep.wait("the fleet to drop the killed worker", lambda: len(dep.worker_ids()) == 1, timeout=20)
    c = client(dep.url)
    for i in range(3):
        assert c.completions.create(model="tiny", prompt=prompt(50 + i, 80), max_tokens=3).usage.completion_tokens == 3
    # its engine core does not linger (turbine.adapters.vllm_plugin, registered by installing turbine)
    from importlib.metadata import entry_points

    assert "turbine_worker_watch" in {e.name for e in entry_points(group="vllm.general_plugins")}, \
        "reinstall turbine (pip install -e '.[vllm]') to register its vLLM plugin"
    dep.wait("the orphaned engine core to exit", lambda: not any(Path(f"/proc/{pid}").exists() for pid in core),
             timeout=20)


def test_a_dead_engine_core_takes_its_worker_out_of_the_fleet(dep: Deployment) -> None:
    worker = dep.procs["w1"]
    core = [pid for pid in children(worker.pid) if "EngineCore" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert len(core) == 1
    os.kill(core[0], signal.SIGKILL)
    dep.procs["killed-core"] = dep.procs.pop("w1")
    dep.wait("the worker to stop by itself", lambda: worker.poll() is not None, timeout=20)
    assert worker.returncode == 0  # an orderly stop: it left discovery on the way out
    dep.wait("the fleet to drop it", lambda: not dep.worker_ids(), timeout=5)
