"""`turbine serve --router-max-queued 1`: a burst larger than the workers admit waits in the
frontend's queue and every request still completes; the counters say how many waited."""
from __future__ import annotations

import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from testkit import free_port, spawn, wait_workers


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M))


def test_burst_beyond_the_queue_limit_waits_and_completes(tmp_path: Path, model_dir: Path, procs) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spawn(procs, "serve", "--engine", "mock", "--model", str(model_dir), "--model-name", "tiny", "--port", str(port),
          "--workers", "2", "--router", "predicted", "--router-max-queued", "1", "--speedup-ratio", "4")
    wait_workers(url, 2, timeout=60)
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)

    def one(i: int) -> int:
        r = client.completions.create(model="tiny", prompt=f"burst {i} " + "word " * 400, max_tokens=8,
                                      extra_body={"min_tokens": 8, "ignore_eos": True})
        return r.usage.completion_tokens

    with ThreadPoolExecutor(12) as pool:
        assert list(pool.map(one, range(12))) == [8] * 12
    assert metric(url, "turbine_router_declined_total") >= 1
    assert metric(url, "turbine_router_queued_requests_total") >= 1
    assert metric(url, "turbine_router_queue_rejected_total") == 0
