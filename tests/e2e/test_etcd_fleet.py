"""Processes of one machine on etcd discovery (a real etcd, started by the fixture): a SIGKILLed
worker leaves when its lease expires, a new one is used as soon as it registers, and `serve`
joins its in-process workers to the same fleet."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import openai
import pytest

from testkit import free_port, health, spawn, wait_workers

pytest.importorskip("aetcd")

TTL = 2


def test_sigkilled_worker_leaves_when_its_lease_expires(etcd, model_dir: Path, procs, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TURBINE_CLUSTER_TOKEN", "e2e-etcd-token")  # both planes require it
    disc = f"{etcd.url}/e2e-{os.getpid()}-kill"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    worker = ["worker", "--engine", "mock", "--model", str(model_dir), "--model-name", "tiny", "--discovery", disc,
              "--discovery-ttl", str(TTL), "--speedup-ratio", "20"]
    spawn(procs, "frontend", "--discovery", disc, "--port", str(port))
    victim, _ = spawn(procs, *worker), spawn(procs, *worker)
    wait_workers(url, 2, timeout=60)
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=10)
    r = client.completions.create(model="tiny", prompt="hi", max_tokens=3)
    assert r.usage.completion_tokens == 3

    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    t0 = time.monotonic()
    while len(health(url).get("models", {}).get("tiny", [])) != 1:
        assert time.monotonic() - t0 < TTL + 2.5, "the killed worker must leave discovery when its lease expires"
        r = client.completions.create(model="tiny", prompt="meanwhile", max_tokens=2)  # the survivor serves
        assert r.usage.completion_tokens == 2
        time.sleep(0.1)
    assert time.monotonic() - t0 > 0.5  # it was the lease, not a polite goodbye

    spawn(procs, *worker)
    wait_workers(url, 2, timeout=60)


def test_serve_registers_its_workers_in_etcd_and_sees_other_processes(etcd, model_dir: Path, procs) -> None:  # type: ignore[no-untyped-def]
    disc = f"{etcd.url}/e2e-{os.getpid()}-serve"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spawn(procs, "serve", "--engine", "mock", "--model", str(model_dir), "--model-name", "tiny", "--workers", "1",
          "--discovery", disc, "--port", str(port), "--speedup-ratio", "20")
    wait_workers(url, 1, timeout=60)
    spawn(procs, "worker", "--engine", "mock", "--model", str(model_dir), "--model-name", "tiny", "--discovery", disc,
          "--speedup-ratio", "20")
    wait_workers(url, 2, timeout=60)
    addresses = sorted(v["address"] for v in health(url)["workers"].values())
    assert all(a.startswith("tcp://127.0.0.1:") for a in addresses)  # serve's own worker on TCP too
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=10)
    for _ in range(4):
        assert client.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2
