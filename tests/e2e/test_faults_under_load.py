"""Faults under load, multi-process: SIGKILL, SIGSTOP/SIGCONT and SIGTERM of workers, SIGTERM of the
frontend, and rolling restarts of every worker and of the frontend. Every stream must complete with
all its tokens: 0 failed, 0 truncated.

The load is closed-loop streaming chat over keep-alive connections. A request is retried only when
its connection was refused or reset before any response byte arrived (the request never reached a
server that accepted it: what any HTTP client does); such retries are counted and reported.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from testkit import Load, assert_clean, free_port, health, metric_values, spawn, wait_workers


def _worker(procs: list, disc: Path, model_dir: Path, *extra: str) -> subprocess.Popen:
    return spawn(procs, "worker", "--engine", "mock", "--model", str(model_dir), "--model-name", "tiny",
                 "--discovery-dir", str(disc), "--speedup-ratio", "4", *extra)


def _frontend(procs: list, disc: Path, port: int, *extra: str, stall: str = "2") -> subprocess.Popen:
    """``stall``: 2 s makes a frozen worker's streams move quickly; tests that must see no
    migration at all use the default, so a worker slowed by a busy CI machine is not taken for frozen."""
    return spawn(procs, "frontend", "--discovery-dir", str(disc), "--port", str(port), "--stall-timeout", stall,
                 *extra)


def _wait_listening(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not health(url):
        assert time.monotonic() < deadline, f"{url} did not come up"
        time.sleep(0.05)


def _exit(p: subprocess.Popen, sig: int, timeout: float = 30) -> float:
    t0 = time.monotonic()
    p.send_signal(sig)
    p.wait(timeout=timeout)
    return time.monotonic() - t0


@pytest.fixture
def fleet(tmp_path: Path, model_dir: Path, procs):  # type: ignore[no-untyped-def]
    disc = tmp_path / "disc"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    fe = _frontend(procs, disc, port)
    workers = [_worker(procs, disc, model_dir) for _ in range(2)]
    wait_workers(url, 2, timeout=60)
    return url, disc, fe, workers


def test_worker_sigkill_sigstop_and_sigterm_under_load(fleet, model_dir: Path, procs) -> None:  # type: ignore[no-untyped-def]
    url, disc, _fe, workers = fleet
    with Load(url) as load:
        load.wait_ok(10)
        # SIGKILL: streams migrate to the survivor; a replacement joins.
        os.kill(workers[0].pid, signal.SIGKILL)
        workers[0].wait()
        load.wait_ok(10)
        workers[0] = _worker(procs, disc, model_dir)
        wait_workers(url, 2, timeout=60)
        load.wait_ok(10)
        # SIGSTOP: its streams stall, move on after the 2 s stall timeout; SIGCONT brings it back.
        os.kill(workers[1].pid, signal.SIGSTOP)
        time.sleep(4)
        load.wait_ok(10)
        os.kill(workers[1].pid, signal.SIGCONT)
        wait_workers(url, 2, timeout=30)
        load.wait_ok(10)
        # SIGTERM: the worker leaves discovery, finishes its streams, exits.
        took = _exit(workers[0], signal.SIGTERM)
        assert workers[0].returncode == 0 and took < 20
        load.wait_ok(10)
        stats = load.stop()
    assert_clean(stats, 60)
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    assert metric_values(text, "turbine_frontend_migrations_total")[0] >= 1  # SIGKILL and SIGSTOP moved streams
    assert metric_values(text, "turbine_request_plane_stalls_total")[0] >= 1  # the frozen worker was noticed


def test_rolling_restart_of_every_worker_under_load(tmp_path: Path, model_dir: Path, procs) -> None:  # type: ignore[no-untyped-def]
    disc = tmp_path / "disc"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    _frontend(procs, disc, port, stall="10")
    workers = [_worker(procs, disc, model_dir) for _ in range(2)]
    wait_workers(url, 2, timeout=60)
    with Load(url) as load:
        load.wait_ok(10)
        for old in list(workers):
            new = _worker(procs, disc, model_dir)
            wait_workers(url, 3, timeout=60)
            took = _exit(old, signal.SIGTERM)
            assert old.returncode == 0 and took < 20
            wait_workers(url, 2, timeout=10)
            load.wait_ok(5)
            workers.append(new)
        stats = load.stop()
    assert_clean(stats, 25)
    assert stats.retried == 0
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    assert metric_values(text, "turbine_frontend_migrations_total") == [0.0]  # drained, not cut off and moved


def test_sigterm_of_the_only_worker_finishes_its_streams(tmp_path: Path, model_dir: Path, procs) -> None:  # type: ignore[no-untyped-def]
    disc = tmp_path / "disc"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    _frontend(procs, disc, port)
    worker = _worker(procs, disc, model_dir)
    wait_workers(url, 1, timeout=60)
    load = Load(url, concurrency=6).__enter__()
    load.wait_ok(6)
    ok_before = load.stats.ok
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=30)
    assert worker.returncode == 0
    stats = load.stop()  # later requests find no worker (503): count only what ran at the signal
    assert not stats.truncated, stats.truncated[:5]
    assert stats.ok >= ok_before + 1, stats  # the streams running at SIGTERM completed
    assert all("HTTP 503" in f for f in stats.failed), stats.failed[:5]


def test_frontend_sigterm_finishes_its_streams(fleet) -> None:  # type: ignore[no-untyped-def]
    url, _disc, fe, _workers = fleet
    load = Load(url, concurrency=8).__enter__()
    load.wait_ok(8)
    t0 = time.monotonic()
    fe.send_signal(signal.SIGTERM)
    fe.wait(timeout=30)
    assert fe.returncode == 0 and time.monotonic() - t0 < 10
    load._stop.set()
    time.sleep(0.5)
    stats = load.stats
    # Requests that started before the signal all completed; later ones found no server (retries).
    assert_clean(stats, 8)
    load._thread.join(timeout=30)


def test_rolling_restart_of_the_frontend_under_load(tmp_path: Path, model_dir: Path, procs) -> None:  # type: ignore[no-untyped-def]
    disc = tmp_path / "disc"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    frontends = [_frontend(procs, disc, port, "--reuse-port")]
    for _ in range(2):
        _worker(procs, disc, model_dir)
    wait_workers(url, 2, timeout=60)
    with Load(url) as load:
        load.wait_ok(10)
        for _ in range(2):
            frontends.append(_frontend(procs, disc, port, "--reuse-port"))
            time.sleep(1.0)  # the new one binds and finds the workers
            took = _exit(frontends.pop(0), signal.SIGTERM)
            assert took < 15
            load.wait_ok(10)
        stats = load.stop()
    assert_clean(stats, 30)
