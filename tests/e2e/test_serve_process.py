"""`turbine serve` as a user runs it: a low file limit, and SIGTERM in the middle of streams."""
from __future__ import annotations

import http.client
import json
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from testkit import free_port, wait_workers


def _serve(model_dir: Path, port: int, nofile: int | None = None, speedup: float = 4.0) -> subprocess.Popen:
    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return subprocess.Popen([sys.executable, "-m", "turbine", "--log-level", "WARNING", "serve", "--model",
                             str(model_dir), "--model-name", "tiny", "--port", str(port), "--speedup-ratio",
                             str(speedup)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=limit)


def _chat(port: int, max_tokens: int = 4, stream: bool = False) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
                "ignore_eos": True, "stream": stream}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_idle_connections_cannot_lock_out_clients_under_a_low_file_limit(model_dir: Path) -> None:
    port = free_port()
    p = _serve(model_dir, port, nofile=128)
    idle: list[socket.socket] = []
    try:
        wait_workers(f"http://127.0.0.1:{port}", 1, timeout=60)
        for _ in range(300):  # far more than the 128 descriptors the process has
            try:
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                break
        time.sleep(0.5)
        for _ in range(5):
            status, body = _chat(port)
            assert status == 200, body[:200]
        assert p.poll() is None
    finally:
        for s in idle:
            s.close()
        p.send_signal(signal.SIGINT)
        p.wait(timeout=30)


def test_sigterm_drains_serve(model_dir: Path) -> None:
    port = free_port()
    p = _serve(model_dir, port, speedup=1.0)
    try:
        wait_workers(f"http://127.0.0.1:{port}", 1, timeout=60)
        results: list[tuple[int, bytes]] = []
        threads = [threading.Thread(target=lambda: results.append(_chat(port, max_tokens=150, stream=True)))
                   for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        assert not results  # the streams are running
        p.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        assert p.wait(timeout=30) == 0
        assert len(results) == 4
        for status, body in results:
            assert status == 200
            events = [json.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: {")]
            assert events[-1]["choices"][0]["finish_reason"] == "length", body[-300:]
            assert body.rstrip().endswith(b"data: [DONE]")
            assert sum(1 for e in events if e["choices"] and e["choices"][0]["delta"].get("content")) >= 100
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
