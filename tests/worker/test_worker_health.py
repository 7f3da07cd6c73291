"""The worker's health endpoint: ready once registered, 503 while draining, live throughout."""
from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from testkit import free_port, spawn

from turbine.launch import WorkerOptions, start_worker_process
from turbine.mocker.engine import MockerConfig
from turbine.worker.health import MAX_REQUEST_BYTES, HealthServer


async def _get(port: int, raw: bytes) -> tuple[int, dict]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), (json.loads(body) if body else {})


async def test_ready_when_registered_503_while_draining_live_throughout(tmp_path: Path, model_dir: Path) -> None:
    opts = WorkerOptions(model_dir=model_dir, model_name="tiny", mocker=MockerConfig(speedup_ratio=100))
    health = HealthServer(lambda: [], host="127.0.0.1")
    port = await health.start()
    try:
        code, body = await _get(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (code, body["status"]) == (503, "starting")  # no worker yet
        dep = await start_worker_process(opts, discovery_dir=tmp_path / "d", num_workers=2, cluster_token="t")
        health.workers = lambda: dep.workers
        code, body = await _get(port, b"GET /health HTTP/1.1\r\n\r\n")
        assert (code, body["status"]) == (200, "ok")
        assert sorted(body["workers"]) == sorted(w.worker_id for w in dep.workers)
        assert (await _get(port, b"HEAD /health HTTP/1.1\r\n\r\n")) == (200, {})
        assert (await _get(port, b"GET /live?x=1 HTTP/1.1\r\n\r\n"))[0] == 200
        assert (await _get(port, b"GET /nope HTTP/1.1\r\n\r\n"))[0] == 404
        assert (await _get(port, b"POST /health HTTP/1.1\r\n\r\n"))[0] == 405
        assert (await _get(port, b"garbage\r\n\r\n"))[0] == 400
        assert (await _get(port, b"GET /" + b"x" * MAX_REQUEST_BYTES + b" HTTP/1.1\r\n\r\n"))[0] == 400

        await dep.workers[0].drain(0)
        code, body = await _get(port, b"GET /health HTTP/1.1\r\n\r\n")
        assert (code, body["status"]) == (503, "draining")
        code, body = await _get(port, b"GET /live HTTP/1.1\r\n\r\n")
        assert (code, body["status"]) == (200, "draining")  # a drain never fails liveness
        await dep.stop(grace_s=0)
    finally:
        await health.close()


async def test_a_silent_client_is_dropped() -> None:
    import turbine.worker.health as h

    health = HealthServer(lambda: [])
    port = await health.start()
    old, h.READ_TIMEOUT_S = h.READ_TIMEOUT_S, 0.2
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\n")  # never finishes its headers
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        h.READ_TIMEOUT_S = old
        await health.close()


@pytest.mark.timeout(90)
def test_worker_command_serves_health_and_drains_on_sigterm(tmp_path: Path, model_dir: Path, procs) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    p = spawn(procs, "worker", "--engine", "mock", "--model", str(model_dir), "--discovery-dir", str(tmp_path / "d"),
              "--health-port", str(port))
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                assert json.loads(r.read())["status"] == "ok"
                break
        except (urllib.error.URLError, ConnectionError):
            assert p.poll() is None, p.stderr.read().decode()
            assert time.monotonic() < deadline, "the worker's /health never answered 200"
            time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 0
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
