"""`turbine worker --engine builtin --tensor-parallel-size 2` (gloo on CPU) in a fleet: it serves,
and when one of its rank processes is SIGKILLed mid-stream, the worker ends (exit code 1, out of
discovery) and the client's stream completes on the other worker."""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from testkit import free_port, health, metric_values, spawn, wait_workers

pytest.importorskip("torch")
pytestmark = [pytest.mark.timeout(180), pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")]

PROFILES = Path(__file__).resolve().parents[2] / "bench" / "profiles"
MAX_TOKENS = 400  # long enough to be running when the rank dies, even on a fast machine


def _slow_profile(path: Path) -> Path:
    """A measured profile with every step 1000x slower: the predicted router sends a request to
    the other worker while it is idle."""
    prof = json.loads((PROFILES / "h200_llama3-8b_bf16.json").read_text())
    for section in ("prefill", "decode", "mixed"):
        if isinstance(prof.get(section), dict) and "ms" in prof[section]:
            prof[section]["ms"] = [[v * 1000 if v is not None else v for v in row] for row in prof[section]["ms"]]
    path.write_text(json.dumps(prof))
    return path


def _busy_workers(url: str, timeout: float = 10.0) -> list[str]:
    """Workers running a request, once one reports it (a load report follows the request's start,
    then the 1 s heartbeat)."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        busy = [w for w, n in re.findall(r'turbine_worker_requests_running\{model="tiny",worker="([^"]+)"\} (\S+)',
                                         metrics) if float(n) > 0]
        if busy or time.monotonic() > deadline:
            return busy
        time.sleep(0.1)


def _rank_pids(pid: int) -> list[int]:
    """The worker's tensor-parallel rank processes (its spawned children, not the resource tracker)."""
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return [k for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]


def test_killed_rank_ends_the_worker_and_the_stream_completes_elsewhere(
        tmp_path: Path, weighted_model: Path, procs) -> None:  # type: ignore[no-untyped-def]
    import openai

    disc = tmp_path / "discovery"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    common = ["worker", "--engine", "builtin", "--device", "cpu", "--model", str(weighted_model), "--model-name",
              "tiny", "--discovery-dir", str(disc), "--num-gpu-blocks", "256"]
    spawn(procs, "frontend", "--discovery-dir", str(disc), "--port", str(port))
    tp = spawn(procs, *common, "--tensor-parallel-size", "2")
    spawn(procs, *common, "--profile", str(_slow_profile(tmp_path / "slow.json")))
    wait_workers(url, 2, timeout=120)
    workers = health(url)["workers"]
    tp_id = next(w for w, info in workers.items() if int(info["pid"]) == tp.pid)
    ranks = _rank_pids(tp.pid)
    assert len(ranks) == 1

    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    pieces: list[str] = []
    finish: list[str | None] = []
    usage: list = []
    started = threading.Event()

    def consume() -> None:
        stream = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=MAX_TOKENS, stream=True,
                                           stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True})
        for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].text or "")
                if chunk.choices[0].finish_reason:
                    finish.append(chunk.choices[0].finish_reason)
            if chunk.usage:
                usage.append(chunk.usage)
            if len(pieces) >= 5:
                started.set()

    t = threading.Thread(target=consume)
    t.start()
    assert started.wait(60)
    assert _busy_workers(url) == [tp_id], "the predicted router sends the request to the fast (TP=2) worker"
    assert not finish, "the stream is still running when its rank dies"
    os.kill(ranks[0], signal.SIGKILL)
    t.join(timeout=120)
    assert not t.is_alive()
    assert finish == ["length"] and usage and usage[0].completion_tokens == MAX_TOKENS
    assert tp.wait(timeout=60) == 1  # the TP worker drained and exited non-zero
    deadline = time.monotonic() + 10
    while len(health(url).get("models", {}).get("tiny", [])) != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(health(url)["models"]["tiny"]) == 1
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        assert sum(metric_values(resp.read().decode(), "turbine_frontend_migrations_total")) >= 1
