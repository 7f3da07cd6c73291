"""Request tracing (turbine/runtime/tracing.py): one request's spans and their parent links, in
one process with an in-memory exporter (aggregated and disaggregated); off costs nothing."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

pytest.importorskip("opentelemetry.sdk")
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from turbine.protocols.generate import GenerateRequest, StopConditions
from turbine.runtime import tracing


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.configure(service_name="turbine-test", exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.shutdown()
    assert not tracing.tracer().enabled


def _post(url: str, body: dict, headers: dict | None = None) -> dict:
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _tree(exporter: InMemorySpanExporter) -> dict[str, list]:
    by_name: dict[str, list] = {}
    for s in exporter.get_finished_spans():
        by_name.setdefault(s.name, []).append(s)
    return by_name


def _parent(s) -> int | None:  # type: ignore[no-untyped-def]
    return None if s.parent is None else s.parent.span_id


def test_one_request_spans_frontend_router_worker_engine(spans: InMemorySpanExporter, model_dir: Path,
                                                         server_factory: Any) -> None:
    with server_factory(model_dir, workers=2, speedup=50.0) as s:
        out = _post(s.url, {"model": "tiny", "prompt": "hello there", "max_tokens": 5, "ignore_eos": True})
    assert out["usage"]["completion_tokens"] == 5
    t = _tree(spans)
    (req,) = t["turbine.request"]
    (route,) = t["turbine.route"]
    (worker,) = t["turbine.worker.generate"]
    assert req.parent is None  # a new trace: the client sent no traceparent
    trace_id = req.context.trace_id
    assert all(x.context.trace_id == trace_id for xs in t.values() for x in xs)
    assert _parent(route) == req.context.span_id
    assert _parent(worker) == req.context.span_id  # across the request plane
    assert route.attributes["turbine.worker_id"] == worker.attributes["turbine.worker_id"]
    assert route.attributes["turbine.route.policy"] == "predicted"
    for name in ("engine.queue", "engine.prefill", "engine.decode"):
        (e,) = t[name]
        assert _parent(e) == worker.context.span_id, name
    assert "engine.kv_transfer" not in t
    q, p, d = t["engine.queue"][0], t["engine.prefill"][0], t["engine.decode"][0]
    assert q.start_time <= q.end_time <= p.start_time <= p.end_time <= d.start_time <= d.end_time
    assert req.start_time <= route.start_time and worker.end_time <= req.end_time
    assert d.attributes["turbine.completion_tokens"] == 5
    assert req.attributes["turbine.finish_reason"] == "length"
    assert req.attributes["turbine.completion_tokens"] == 5
    assert worker.attributes["turbine.finish_reason"] == "length"
    assert [e.name for e in req.events] == ["first_token"]


def test_disaggregated_request_traces_both_workers_and_the_transfer(spans: InMemorySpanExporter, model_dir: Path,
                                                                    server_factory: Any) -> None:
    with server_factory(model_dir, workers=0, prefill_workers=1, decode_workers=1, speedup=50.0) as s:
        prompt = list(range(10, 10 + 700))  # beyond --disagg-min-prefill-tokens: prefilled remotely
        out = _post(s.url, {"model": "tiny", "prompt": prompt, "max_tokens": 4, "ignore_eos": True})
    assert out["usage"]["completion_tokens"] == 4
    t = _tree(spans)
    (req,) = t["turbine.request"]
    routes = {r.attributes["turbine.route.pool"]: r for r in t["turbine.route"]}
    assert set(routes) == {"prefill", "main"}
    workers = {w.attributes["turbine.role"]: w for w in t["turbine.worker.generate"]}
    assert set(workers) == {"prefill", "decode"}
    for w in workers.values():
        assert _parent(w) == req.context.span_id
    assert workers["decode"].attributes["turbine.kv_pull"] is True
    (transfer,) = t["engine.kv_transfer"]
    assert _parent(transfer) == workers["decode"].context.span_id
    assert transfer.attributes["turbine.kv.pulled_blocks"] > 0
    prefills = {_parent(p): p for p in t["engine.prefill"]}
    assert set(prefills) == {workers["prefill"].context.span_id, workers["decode"].context.span_id}
    assert transfer.end_time <= prefills[workers["decode"].context.span_id].start_time


def test_client_traceparent_is_the_parent(spans: InMemorySpanExporter, model_dir: Path, server_factory: Any) -> None:
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with server_factory(model_dir, workers=1, speedup=50.0) as s:
        _post(s.url, {"model": "tiny", "prompt": "hi", "max_tokens": 2}, {"traceparent": parent})
    (req,) = _tree(spans)["turbine.request"]
    assert f"{req.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert f"{req.parent.span_id:016x}" == "b7ad6b7169203331"


def test_span_api_and_traceparent_format(spans: InMemorySpanExporter) -> None:
    tr = tracing.tracer()
    root = tr.start("a", None, attributes={"k": 1, "skip": None})
    assert tracing.TRACEPARENT_RE.fullmatch(root.traceparent)
    child = tr.start("b", root.traceparent)
    child.event("e", x=1)
    child.error("boom")
    child.end()
    tr.record("c", root.traceparent, 1_000, 2_000, {"v": "w"})
    tr.start("d", "not-a-traceparent").end()  # a malformed parent starts a new trace
    root.end()
    got = {s.name: s for s in spans.get_finished_spans()}
    assert got["b"].parent.span_id == got["a"].context.span_id
    assert got["b"].status.status_code.name == "ERROR"
    assert got["c"].start_time == 1_000 and got["c"].end_time == 2_000
    assert got["d"].parent is None
    assert dict(got["a"].attributes) == {"k": 1}
    unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    assert tr.start("e", unsampled) is tracing.NOOP_SPAN  # the caller did not sample it: neither do we


def test_off_by_default_is_a_noop() -> None:
    tr = tracing.tracer()
    assert not tr.enabled
    span = tr.start("x", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    assert span is tracing.NOOP_SPAN and span.traceparent is None
    assert not tracing.configure(service_name="x")  # nothing asks for tracing: stays off


def test_generate_request_traceparent_is_backward_compatible() -> None:
    class OldRequest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):  # before the field existed
        request_id: str
        token_ids: list[int]
        stop: StopConditions

    enc = msgspec.msgpack.Encoder()
    old = enc.encode(OldRequest(request_id="r", token_ids=[1], stop=StopConditions(max_tokens=1)))
    assert msgspec.msgpack.decode(old, type=GenerateRequest).traceparent is None
    new = GenerateRequest(request_id="r", token_ids=[1], stop=StopConditions(max_tokens=1),
                          traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    assert msgspec.msgpack.decode(enc.encode(new), type=OldRequest).request_id == "r"  # an old worker ignores it
    plain = GenerateRequest(request_id="r", token_ids=[1], stop=StopConditions(max_tokens=1))
    assert b"traceparent" not in enc.encode(plain)  # off: the wire is unchanged


def test_missing_opentelemetry_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    with pytest.raises(tracing.TracingUnavailable, match=r"turbine\[otel\]"):
        tracing.configure(service_name="x", file="/dev/null")
    assert not tracing.tracer().enabled


def test_serving_without_tracing_never_imports_opentelemetry(model_dir: Path) -> None:
    code = textwrap.dedent(f"""
        import json, sys, urllib.request
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from testkit import ServerThread
        with ServerThread(__import__("pathlib").Path({str(model_dir)!r}), workers=1) as s:
            body = json.dumps({{"model": "tiny", "prompt": "hi", "max_tokens": 3}}).encode()
            r = urllib.request.urlopen(urllib.request.Request(s.url + "/v1/completions", body,
                                       {{"Content-Type": "application/json"}}), timeout=30)
            assert json.loads(r.read())["usage"]["completion_tokens"] == 3
        bad = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        print(json.dumps(bad))
    """)
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("OTEL_", "TURBINE_TRACE"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_otlp_endpoint_receives_the_spans() -> None:
    """--otlp-endpoint http://host:port: spans arrive at its /v1/traces as OTLP/HTTP protobuf."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    got: list[tuple[str, str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append((self.path, self.headers["Content-Type"], self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert tracing.configure(service_name="turbine-otlp-test", endpoint=f"http://127.0.0.1:{server.server_port}")
        tracing.tracer().start("exported").end()
        tracing.shutdown()  # flushes the batch
    finally:
        server.shutdown()
    (path, ctype, body), = got
    assert path == "/v1/traces" and ctype == "application/x-protobuf"
    msg = ExportTraceServiceRequest.FromString(body)
    rs = msg.resource_spans[0]
    assert {a.key: a.value.string_value for a in rs.resource.attributes}["service.name"] == "turbine-otlp-test"
    assert [s.name for ss in rs.scope_spans for s in ss.spans] == ["exported"]
