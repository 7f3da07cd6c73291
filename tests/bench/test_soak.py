"""bench/soak.py for ~20 s with one worker: it samples the fleet, judges it and writes its raw
output, and appends nothing to bench/RESULTS.md (--no-record)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from testkit import load_bench

pytestmark = pytest.mark.timeout(150)


def test_soak_smoke(tmp_path: Path, model_dir: Path) -> None:
    mod = load_bench("soak")
    results = tmp_path / "RESULTS.md"
    rc = mod.main(["--duration", "20", "--interval", "2", "--workers", "1", "--rate", "6", "--num-gpu-blocks", "96",
                   "--idle-wait", "1", "--model", str(model_dir), "--workdir", str(tmp_path / "w"),
                   "--results", str(results), "--no-record", "--no-plot"])
    assert rc in (0, 1)  # a verdict either way; 2 would mean the fleet did not start
    assert not results.exists()
    out = json.loads((tmp_path / "w" / "soak.json").read_text())
    verdict = out["verdict"]
    assert set(verdict["processes"]) == {"frontend", "worker-0"}
    assert verdict["pass"] == (rc == 0)
    assert verdict["pass"] == (all(p["pass"] for p in verdict["processes"].values()) and verdict["requests"]["pass"])
    samples = out["samples"]
    phases = {s["phase"] for s in samples}
    assert {"idle-start", "warm-up", "idle-warm", "load", "idle-end"} <= phases
    loaded = [s for s in samples if s["phase"] == "load"]
    assert len(loaded) >= 3
    for s in loaded:
        assert s["frontend_rss_mb"] > 0 and s["worker-0_rss_mb"] > 0
        assert s["frontend_fds"] > 0 and s["worker-0_fds"] > 0
        assert s["frontend_tasks"] is not None and s["frontend_connections"] is not None
    for p in verdict["processes"].values():
        assert p["rss"]["slope"] is not None and p["rss"]["growth"] is not None
    assert verdict["processes"]["frontend"]["tasks"][2] is not None  # idle tasks at the end were measured
    req = out["requests"]
    assert req["ok"] > 0 and req["disconnected"] > 0 and req["rejected"] > 0
    assert req["failed"] == 0, req["errors"]
    assert out["idle"]["end"]["frontend_connections"] is not None
    with open(tmp_path / "w" / "soak_samples.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(samples) and "worker-0_fds" in rows[0]
