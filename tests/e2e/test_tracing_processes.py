"""Tracing across processes: `turbine frontend` and `turbine worker` each write their finished
spans to a file (TURBINE_TRACE_FILE); the worker's spans are children of the frontend's request
span, in the same trace, though they were made in another process."""
from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
from testkit import free_port, spawn, wait_workers

pytest.importorskip("opentelemetry.sdk")


def _records(d: Path) -> list[dict]:
    out = []
    for f in d.glob("spans-*.jsonl"):
        out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


def test_worker_spans_are_children_of_the_frontend_span(tmp_path: Path, model_dir: Path, procs: list,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    spans = tmp_path / "spans"
    spans.mkdir()
    monkeypatch.setenv("TURBINE_TRACE_FILE", str(spans / "spans-{pid}.jsonl"))
    disc = tmp_path / "discovery"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    frontend = spawn(procs, "frontend", "--discovery-dir", str(disc), "--port", str(port))
    worker = spawn(procs, "worker", "--engine", "mock", "--model", str(model_dir), "--model-name", "tiny",
                   "--discovery-dir", str(disc), "--speedup-ratio", "20")
    wait_workers(url, 1, timeout=60)
    body = json.dumps({"model": "tiny", "prompt": "a traced request", "max_tokens": 4, "ignore_eos": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert json.loads(r.read())["usage"]["completion_tokens"] == 4

    want = {"turbine.request", "turbine.route", "turbine.worker.generate", "engine.queue", "engine.prefill",
            "engine.decode"}
    deadline = time.monotonic() + 10
    while True:
        records = _records(spans)
        names = {r["name"] for r in records}
        if want <= names:
            break
        assert time.monotonic() < deadline, sorted(names)
        time.sleep(0.1)

    by_name = {r["name"]: r for r in records}
    request, route, gen = by_name["turbine.request"], by_name["turbine.route"], by_name["turbine.worker.generate"]
    assert request["pid"] == frontend.pid and request["service"] == "turbine-frontend"
    assert route["pid"] == frontend.pid and route["parent_span_id"] == request["span_id"]
    assert gen["pid"] == worker.pid and gen["service"] == "turbine-worker"
    assert gen["parent_span_id"] == request["span_id"]  # the link crossed the request plane
    assert gen["attributes"]["turbine.worker_id"] == route["attributes"]["turbine.worker_id"]
    for name in ("engine.queue", "engine.prefill", "engine.decode"):
        assert by_name[name]["pid"] == worker.pid
        assert by_name[name]["parent_span_id"] == gen["span_id"], name
    assert {r["trace_id"] for r in records} == {request["trace_id"]}  # one request, one trace
    assert request["start_ns"] <= gen["start_ns"] <= gen["end_ns"] <= request["end_ns"] + 5_000_000  # two clocks
