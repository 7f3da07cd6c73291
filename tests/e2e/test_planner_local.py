"""The planner's local connector on real processes: 1 -> 3 -> 1 workers under load with no failed
and no migrated request, nothing left running; a killed planner's workers drain and exit."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from testkit import Load, free_port, health, metric_values, spawn, wait_workers

from turbine.planner.connectors.local import LocalProcessConnector, worker_command

PROFILE = Path(__file__).resolve().parents[2] / "bench" / "profiles" / "h200_llama3-8b_bf16.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def test_local_connector_scales_one_three_one_under_load(tmp_path: Path, model_dir: Path, procs) -> None:  # type: ignore[no-untyped-def]
    disc = tmp_path / "disc"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spawn(procs, "frontend", "--discovery-dir", str(disc), "--port", str(port))
    args = ["--engine", "mock", "--model", str(model_dir), "--model-name", "tiny", "--speedup-ratio", "4"]
    cmd = worker_command("agg", args, discovery_dir=disc)
    conn = LocalProcessConnector({"agg": cmd}, drain_timeout_s=20, log_dir=tmp_path / "logs")

    async def scenario():  # type: ignore[no-untyped-def]
        await conn.scale("agg", 1)
        await asyncio.to_thread(wait_workers, url, 1, 60)
        with Load(url, concurrency=6) as load:
            await asyncio.to_thread(load.wait_ok, 10)
            await conn.scale("agg", 3)
            assert (await conn.current())["agg"] == 3
            await asyncio.to_thread(wait_workers, url, 3, 60)
            await asyncio.to_thread(load.wait_ok, 20)
            await conn.scale("agg", 1)  # the two newest drain under load
            assert (await conn.current())["agg"] == 1
            await conn.wait_drained(60)
            await asyncio.to_thread(wait_workers, url, 1, 30)
            await asyncio.to_thread(load.wait_ok, 10)
            stats = load.stop()
        pids = [pid for _, pid, _ in conn.processes()]
        await conn.close()
        return stats, pids

    stats, pids = asyncio.run(scenario())
    assert not stats.failed and not stats.truncated and stats.ok >= 40, stats
    assert conn.started == 3 and conn.drained == 3 and conn.kills == 0  # two scaled down, the last at close
    assert pids and not any(_alive(p) for p in pids)
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    assert metric_values(text, "turbine_frontend_migrations_total") == [0.0]  # drained, never cut off


def test_killed_planner_leaves_no_orphan_worker(tmp_path: Path, model_dir: Path, procs) -> None:  # type: ignore[no-untyped-def]
    disc = tmp_path / "disc"
    port, mport = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    spawn(procs, "frontend", "--discovery-dir", str(disc), "--port", str(port))
    planner = subprocess.Popen(
        [sys.executable, "-m", "turbine", "planner", "--frontend-url", url, "--connector", "local",
         "--discovery-dir", str(disc), "--profile", str(PROFILE), "--speedup-ratio", "20",
         "--sla-ttft-ms", "500", "--sla-itl-ms", "50", "--planner-interval", "1", "--planner-min-workers", "2",
         "--metrics-port", str(mport),
         "--worker-args", f"--engine mock --model {model_dir} --model-name tiny --speedup-ratio 20"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    procs.append(planner)
    wait_workers(url, 2, timeout=60)  # it started its minimum
    deadline = time.monotonic() + 20
    while True:  # its first decisions are exported
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=2) as r:
                text = r.read().decode()
            if 'turbine_planner_workers{kind="current",pool="agg"} 2.0' in text:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "the planner exported no decision"
        time.sleep(0.2)
    workers = _children(planner.pid)
    assert len(workers) == 2
    planner.kill()
    planner.wait()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in workers):
        assert time.monotonic() < deadline, "workers outlived their planner"
        time.sleep(0.1)
    assert wait_workers(url, 0, timeout=15) >= 0 and health(url).get("models", {}).get("tiny", []) == []
