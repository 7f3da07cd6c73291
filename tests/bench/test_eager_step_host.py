"""bench/eager_step_host.py on CPU with the tiny preset: the served cases run through every mode
(core stepped here, on a plain thread, under BuiltinEngine with and without the settle wait)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from testkit import load_bench

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.timeout(180)


def test_eager_step_host_runs_on_cpu(tmp_path: Path) -> None:
    mod = load_bench("eager_step_host")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert mod.main(["--preset", "tiny", "--dir", str(tmp_path / "m"), "--out", str(tmp_path / "o"),
                         "--budget-s", "0", "--served-s", "0.4", "--no-results"]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "o" / "eager_step_host.json").read_text())
    cases = [r["case"] for r in report["served"]]
    assert cases == ["main thread", "step thread", "engine settle=0", "engine settle=0.01", "engine settle=0"]
    assert all(r["eager_steps"] > 0 and r["eager_served_ms"] > 0 and r["decode_ms"] > 0 for r in report["served"])
    md = (tmp_path / "o" / "eager_step_host.md").read_text()
    assert md.startswith("## eager_step_host") and "| engine settle=0.01 |" in md and "tottime" in md
