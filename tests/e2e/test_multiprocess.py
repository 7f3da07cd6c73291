"""`turbine frontend` + two `turbine worker` processes on file discovery; one is SIGKILLed."""
from __future__ import annotations

import os
import signal
import time
import urllib.request
from pathlib import Path

import openai

from testkit import free_port, health, spawn, wait_workers


def test_sigkilled_worker_leaves_and_survivor_serves(tmp_path: Path, model_dir: Path, procs) -> None:  # type: ignore[no-untyped-def]
    disc = tmp_path / "discovery"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spawn(procs, "frontend", "--discovery-dir", str(disc), "--port", str(port))
    workers = [spawn(procs, "worker", "--engine", "mock", "--model", str(model_dir), "--model-name", "tiny",
                     "--discovery-dir", str(disc), "--speedup-ratio", "20") for _ in range(2)]
    wait_workers(url, 2, timeout=60)
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=10)
    for _ in range(4):  # round-robin: both workers serve
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert r.usage.completion_tokens == 4

    os.kill(workers[0].pid, signal.SIGKILL)
    workers[0].wait()
    t_kill = time.monotonic()
    ok = 0
    while time.monotonic() - t_kill < 5.0:
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "again"}], max_tokens=3)
        assert r.usage.completion_tokens == 3
        ok += 1
        if len(health(url).get("models", {}).get("tiny", [])) == 1:
            break
    assert ok >= 1
    assert len(health(url)["models"]["tiny"]) == 1, "the killed worker must leave discovery within 5 s"

    # A new worker is used as soon as it registers.
    spawn(procs, "worker", "--engine", "mock", "--model", str(model_dir), "--model-name", "tiny",
          "--discovery-dir", str(disc), "--speedup-ratio", "20")
    wait_workers(url, 2, timeout=60)


def test_one_mocker_process_simulates_many_workers(tmp_path: Path, model_dir: Path, procs) -> None:  # type: ignore[no-untyped-def]
    disc = tmp_path / "discovery"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spawn(procs, "frontend", "--discovery-dir", str(disc), "--port", str(port))
    spawn(procs, "worker", "--engine", "mock", "--model", str(model_dir), "--model-name", "tiny",
          "--discovery-dir", str(disc), "--num-workers", "16", "--speedup-ratio", "50")
    wait_workers(url, 16, timeout=60)
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=10)
    for _ in range(20):
        r = client.completions.create(model="tiny", prompt="x = 1", max_tokens=2)
        assert r.usage.completion_tokens == 2
    deadline = time.monotonic() + 3  # every worker's load arrives within its 1 s heartbeat
    while True:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        if metrics.count("turbine_worker_kv_capacity_blocks{") == 16 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert metrics.count("turbine_worker_kv_capacity_blocks{") == 16


def test_worker_killed_mid_stream_request_migrates(tmp_path: Path, model_dir: Path, procs) -> None:  # type: ignore[no-untyped-def]
    """The client sees one complete stream: the frontend continues the request on the survivor."""
    import re
    import threading

    disc = tmp_path / "discovery"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spawn(procs, "frontend", "--discovery-dir", str(disc), "--port", str(port))
    workers = {}
    for _ in range(2):
        p = spawn(procs, "worker", "--engine", "mock", "--model", str(model_dir), "--model-name", "tiny",
                  "--discovery-dir", str(disc), "--speedup-ratio", "1")
        workers[p.pid] = p
    wait_workers(url, 2, timeout=60)
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
    pieces: list[str] = []
    finish: list[str | None] = []
    usage: list = []
    started = threading.Event()

    def consume() -> None:
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "go"}],
                                                max_tokens=150, stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                if chunk.choices[0].finish_reason:
                    finish.append(chunk.choices[0].finish_reason)
            if chunk.usage:
                usage.append(chunk.usage)
            if len(pieces) > 10:
                started.set()

    t = threading.Thread(target=consume)
    t.start()
    assert started.wait(20)
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    busy = [w for w, n in re.findall(r'turbine_worker_requests_running\{model="tiny",worker="([^"]+)"\} (\S+)', metrics)
            if float(n) > 0]
    assert len(busy) == 1
    victim = int(health(url)["workers"][busy[0]]["pid"])
    assert victim in workers
    os.kill(victim, signal.SIGKILL)
    t.join(timeout=60)
    assert finish == ["length"]
    assert usage and usage[0].completion_tokens == 150
