"""Two `turbine frontend --router predicted` processes in front of one fleet share its load:
the second sends its request to the worker the first left idle, from the workers' load reports."""
from __future__ import annotations

import re
import threading
import time
import urllib.request
from pathlib import Path

import openai

from testkit import free_port, spawn, wait_workers


def running(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'turbine_worker_requests_running\{[^}]*worker="([^"]+)"[^}]*\} ([0-9.e+]+)', text)}


def wait_for(check, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_second_frontend_avoids_the_first_ones_workers(tmp_path: Path, model_dir: Path, procs) -> None:  # type: ignore[no-untyped-def]
    disc = tmp_path / "discovery"
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    for p in ports:
        spawn(procs, "frontend", "--discovery-dir", str(disc), "--port", str(p), "--router", "predicted")
    # speedup 1: a 300-token decode takes ~2 s, long enough to look at the fleet mid-stream
    spawn(procs, "worker", "--engine", "mock", "--model", str(model_dir), "--model-name", "tiny",
          "--discovery-dir", str(disc), "--num-workers", "4", "--speedup-ratio", "1")
    for u in urls:
        wait_workers(u, 4, timeout=60)
    clients = [openai.OpenAI(base_url=u + "/v1", api_key="x", max_retries=0, timeout=60) for u in urls]
    errors: list[BaseException] = []

    def generate(client: openai.OpenAI, i: int) -> None:
        try:
            r = client.completions.create(model="tiny", prompt=f"request {i} " + "tok " * 300, max_tokens=300,
                                          extra_body={"min_tokens": 300, "ignore_eos": True})
            assert r.usage.completion_tokens == 300
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=generate, args=(clients[0], i)) for i in range(3)]
    for t in threads:
        t.start()
    # the first frontend spreads its three over three workers; wait until the second one has the reports
    busy = wait_for(lambda: (r := running(urls[1])) and len(r) == 4 and sum(v > 0 for v in r.values()) == 3 and r, 10,
                    "three busy workers in the second frontend's view")
    idle = [w for w, v in busy.items() if v == 0]
    assert len(idle) == 1
    last = threading.Thread(target=generate, args=(clients[1], 99))
    last.start()
    threads.append(last)
    after = wait_for(lambda: (r := running(urls[1])) and all(v > 0 for v in r.values()) and r, 10,
                     "a request on every worker")
    assert after[idle[0]] == 1 and max(after.values()) == 1  # nobody got two
    for t in threads:
        t.join(60)
    assert not errors, errors
