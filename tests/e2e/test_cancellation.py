"""A client that disconnects mid-stream frees everything: no in-flight request, no active KV block."""
from __future__ import annotations

import json
import socket
import time
import urllib.request
from urllib.parse import urlparse

from testkit import metric_values


def scrape(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return r.read().decode()


def test_disconnect_mid_stream_frees_request_and_kv_blocks(model_dir, server_factory) -> None:  # type: ignore[no-untyped-def]
    with server_factory(model_dir, workers=2, speedup=1.0, block_size=16) as s:
        u = urlparse(s.url)
        body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "long story " * 100}],
                           "max_tokens": 3000, "stream": True}).encode()
        sock = socket.create_connection((u.hostname, u.port), timeout=10)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        received = b""
        while received.count(b"data: ") < 5:
            received += sock.recv(4096)
        assert received.startswith(b"HTTP/1.1 200")
        # While it streams, the request holds KV blocks and counts as in flight.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            m = scrape(s.url)
            if sum(metric_values(m, "turbine_worker_kv_active_blocks")) > 0:
                break
            time.sleep(0.05)
        assert sum(metric_values(m, "turbine_frontend_inflight_requests")) == 1
        assert sum(metric_values(m, "turbine_worker_kv_active_blocks")) > 0
        assert sum(metric_values(m, "turbine_worker_kv_capacity_blocks")) > 0
        sock.close()
        t0 = time.monotonic()
        while True:
            m = scrape(s.url)
            inflight = sum(metric_values(m, "turbine_frontend_inflight_requests"))
            active = sum(metric_values(m, "turbine_worker_kv_active_blocks"))
            if inflight == 0 and active == 0:
                break
            assert time.monotonic() - t0 < 2.0, f"inflight={inflight} active_blocks={active} after 2 s"
            time.sleep(0.05)
        # Nothing is still running on the workers either.
        stats = s.call(lambda: [w.engine.stats() for w in s.dep.workers])
        assert all(st.num_running == 0 and st.num_waiting == 0 and st.kv_active_blocks == 0 for st in stats)
