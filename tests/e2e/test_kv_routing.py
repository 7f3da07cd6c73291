"""KV-aware routing end to end: repeated prompts land on the worker that holds their blocks."""
from __future__ import annotations

import time
from pathlib import Path

import openai

from testkit import free_port, spawn, wait_workers

BLOCK = 16


def prompts(n: int) -> list[list[int]]:
    return [[(7 * i + j) % 3000 + 10 for j in range(40 * BLOCK + 5)] for i in range(n)]


def index_blocks(url: str) -> float:
    import re
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(r"^turbine_router_index_blocks\{[^}]*\} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def cached_fractions(client: openai.OpenAI, rounds: int, n: int, pause: float = 0.0) -> list[float]:
    out = []
    for r in range(rounds):
        for p in prompts(n):
            res = client.completions.create(model="tiny", prompt=p, max_tokens=2)
            if r:
                out.append(res.usage.prompt_tokens_details.cached_tokens / res.usage.prompt_tokens)
            time.sleep(pause)
    return out


def test_kv_router_sends_repeats_to_the_holder(model_dir: Path, server_factory) -> None:  # type: ignore[no-untyped-def]
    with server_factory(model_dir, workers=4, speedup=100.0, block_size=BLOCK) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        fractions = cached_fractions(c, rounds=3, n=6)
        router = s.dep.frontend.registry.models["tiny"].router
        index_blocks = s.call(lambda: router.index_blocks)
    assert min(fractions) >= 0.95, fractions  # every repeat found its whole prefix
    assert index_blocks >= 6 * 40


def test_kv_routing_over_zmq_and_resync_for_a_late_frontend(tmp_path: Path, model_dir: Path, procs) -> None:  # type: ignore[no-untyped-def]
    disc = tmp_path / "discovery"
    for _ in range(2):
        spawn(procs, "worker", "--engine", "mock", "--model", str(model_dir), "--model-name", "tiny",
              "--discovery-dir", str(disc), "--speedup-ratio", "100", "--block-size", str(BLOCK))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    fe = spawn(procs, "frontend", "--discovery-dir", str(disc), "--port", str(port), "--router", "kv")
    wait_workers(url, 2, timeout=60)
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=10)
    fractions = cached_fractions(c, rounds=2, n=4, pause=0.05)
    assert min(fractions) >= 0.95, fractions

    # A new frontend heard none of those events: it must rebuild the index from the workers' snapshots.
    fe.terminate()
    fe.wait(timeout=10)
    port2 = free_port()
    url2 = f"http://127.0.0.1:{port2}"
    spawn(procs, "frontend", "--discovery-dir", str(disc), "--port", str(port2), "--router", "kv")
    wait_workers(url2, 2, timeout=60)
    deadline = time.monotonic() + 15  # the snapshots are fetched and applied in the background
    while time.monotonic() < deadline and index_blocks(url2) < 4 * 40:
        time.sleep(0.1)
    assert index_blocks(url2) >= 4 * 40, "the late frontend did not rebuild its index from the workers' snapshots"
    # Route at once, before the late frontend has heard any load report: the first report it
    # hears may be taken while its own first request ran and arrive after it ended, and must not
    # read as another frontend's load (that sent a repeat to the worker without its prefix).
    c2 = openai.OpenAI(base_url=url2 + "/v1", api_key="x", max_retries=0, timeout=10)
    for p in prompts(4):
        res = c2.completions.create(model="tiny", prompt=p, max_tokens=2)
        assert res.usage.prompt_tokens_details.cached_tokens >= res.usage.prompt_tokens - BLOCK
