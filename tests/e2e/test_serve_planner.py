"""`turbine serve --planner`: load arrives, the planner grows the process's workers; load stops,
it drains them back to the minimum. No request fails or migrates on the way."""
from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

from testkit import Load, free_port, metric_values, spawn, wait_workers


def _slow_profile(path: Path) -> Path:
    """Every decode step 25 ms whatever the batch, prefill steps 5 ms: with 4 sequences a worker
    serves 4 requests of 40 tokens per second, so a dozen closed-loop clients need several."""
    path.write_text(json.dumps({
        "version": 1, "meta": {"model": "llama3.1-8b", "device": "NVIDIA H200"},
        "prefill": {"new_tokens": [1, 16384], "ms": [5.0, 5.0]},
        "decode": {"batch_size": [1, 256], "ms": [25.0, 25.0]},
    }))
    return path


def _metrics(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        return r.read().decode()


def _workers(url: str) -> int:
    vals = metric_values(_metrics(url), "turbine_frontend_workers")
    return int(vals[0]) if vals else 0


def test_serve_planner_grows_and_drains_under_load(tmp_path: Path, model_dir: Path, procs) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spawn(procs, "serve", "--engine", "mock", "--model", str(model_dir), "--model-name", "tiny", "--port", str(port),
          "--profile", str(_slow_profile(tmp_path / "slow.json")), "--max-num-seqs", "4", "--planner",
          "--sla-ttft-ms", "400", "--sla-itl-ms", "60", "--planner-interval", "1.5", "--planner-max-workers", "5",
          "--planner-scale-down-cooldown", "4", "--planner-scale-down-window", "4", "--planner-predictor", "constant")
    wait_workers(url, 1, timeout=60)
    peak = 1
    with Load(url, concurrency=12) as load:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and peak < 3:
            time.sleep(0.5)
            peak = max(peak, _workers(url))
        load.wait_ok(20)
        stats = load.stop()
    assert peak >= 3, f"the planner did not grow the fleet under load (peak {peak})"
    deadline = time.monotonic() + 40
    while _workers(url) > 1:  # no load: back to the minimum, one drain at a time
        assert time.monotonic() < deadline, f"still {_workers(url)} workers 40 s after the load stopped"
        time.sleep(0.5)
    assert not stats.failed and not stats.truncated and stats.ok >= 20, stats
    text = _metrics(url)
    assert metric_values(text, "turbine_frontend_migrations_total") == [0.0]
    ups = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
           if line.startswith("turbine_planner_decisions_total") and 'action="up"' in line]
    downs = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line.startswith("turbine_planner_decisions_total") and 'action="down"' in line]
    assert ups and ups[0] >= 1 and downs and downs[0] >= 1
