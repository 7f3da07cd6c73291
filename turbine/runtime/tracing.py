"""Request tracing: OpenTelemetry spans when enabled, nothing at all when not.

One request's trace, across processes (the W3C ``traceparent`` travels in GenerateRequest)::

    frontend process                          worker process
    turbine.request ─────── traceparent ────▶ turbine.worker.generate
      turbine.route  (per attempt; pool,       engine.queue        arrival -> first admitted
                      worker, overlap)         engine.kv_transfer  pulling a prefill worker's KV (disagg)
      [turbine.route pool=prefill ──────────▶  turbine.worker.generate on the prefill worker ...]
                                               engine.prefill      admitted (or KV landed) -> first token
                                               engine.decode       first token -> last

Off by default. ``tracer()`` is then a ``NoopTracer``: its spans are one shared object whose
``traceparent`` is None, so no GenerateRequest carries one and nothing downstream does more than
compare it with None. ``opentelemetry`` is imported by ``configure()`` only (``pip install
'turbine[otel]'``). Enabled by ``--otlp-endpoint URL`` or the standard ``OTEL_EXPORTER_OTLP_ENDPOINT``
/ ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (OTLP over HTTP/protobuf; ``OTEL_EXPORTER_OTLP_PROTOCOL=grpc``
uses gRPC), or ``TURBINE_TRACE_FILE=PATH`` (finished spans as JSON lines, ``{pid}`` expanded: tests
and debugging without a collector). ``OTEL_SDK_DISABLED=true`` keeps it off.

Spans take explicit parents (a traceparent string), never an ambient context: a choice's stream is
an async generator resumed by whichever task reads it, where context variables would not follow.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from typing import Any

TRACEPARENT_RE = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


class TracingUnavailable(RuntimeError):
    """Tracing was asked for but the otel extra is not installed; the message says how to get it."""


class Span:
    """A span that records nothing (tracing off, or a parent that was not sampled)."""

    __slots__ = ()
    traceparent: str | None = None  # this span as a W3C traceparent: the parent of its children

    def set(self, key: str, value: Any) -> None:
        pass

    def event(self, name: str, **attributes: Any) -> None:
        pass

    def error(self, message: str) -> None:
        pass

    def end(self, end_ns: int | None = None) -> None:
        pass


NOOP_SPAN = Span()


class NoopTracer:
    enabled = False

    def start(self, name: str, parent: str | None = None, *, start_ns: int | None = None,
              attributes: dict[str, Any] | None = None) -> Span:
        return NOOP_SPAN

    def record(self, name: str, parent: str | None, start_ns: int, end_ns: int,
               attributes: dict[str, Any] | None = None) -> None:
        pass

    def shutdown(self) -> None:
        pass


_tracer: Any = NoopTracer()


def tracer() -> Any:
    """The process's tracer: a NoopTracer unless ``configure()`` enabled tracing."""
    return _tracer


# --- OpenTelemetry (imported only once tracing is enabled) -----------------------------------------
class _OtelSpan(Span):
    __slots__ = ("_span", "traceparent")

    def __init__(self, span: Any) -> None:
        self._span = span
        c = span.get_span_context()
        self.traceparent = f"00-{c.trace_id:032x}-{c.span_id:016x}-{int(c.trace_flags):02x}"

    def set(self, key: str, value: Any) -> None:
        if value is not None:
            self._span.set_attribute(key, value)

    def event(self, name: str, **attributes: Any) -> None:
        self._span.add_event(name, {k: v for k, v in attributes.items() if v is not None})

    def error(self, message: str) -> None:
        from opentelemetry.trace import Status, StatusCode

        self._span.set_status(Status(StatusCode.ERROR, message))

    def end(self, end_ns: int | None = None) -> None:
        self._span.end(end_time=end_ns)


class OtelTracer:
    enabled = True

    def __init__(self, provider: Any) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("turbine")

    def start(self, name: str, parent: str | None = None, *, start_ns: int | None = None,
              attributes: dict[str, Any] | None = None) -> Span:
        attrs = {k: v for k, v in attributes.items() if v is not None} if attributes else None
        span = self._tracer.start_span(name, context=_parent_context(parent), attributes=attrs, start_time=start_ns)
        return _OtelSpan(span) if span.is_recording() else NOOP_SPAN

    def record(self, name: str, parent: str | None, start_ns: int, end_ns: int,
               attributes: dict[str, Any] | None = None) -> None:
        """A span whose times are already known (the engine's phases, measured as they happened)."""
        self.start(name, parent, start_ns=start_ns, attributes=attributes).end(max(start_ns, end_ns))

    def shutdown(self) -> None:
        self.provider.force_flush()
        self.provider.shutdown()


def _parent_context(traceparent: str | None) -> Any:
    """An OpenTelemetry context holding the remote parent, or an empty one (a new trace)."""
    from opentelemetry import trace
    from opentelemetry.context import Context

    m = TRACEPARENT_RE.fullmatch(traceparent) if traceparent else None
    if m is None:
        return Context()
    sc = trace.SpanContext(int(m.group(1), 16), int(m.group(2), 16), is_remote=True,
                           trace_flags=trace.TraceFlags(int(m.group(3), 16)))
    if not sc.is_valid:
        return Context()
    return trace.set_span_in_context(trace.NonRecordingSpan(sc), Context())


class JsonLinesExporter:
    """Finished spans as one JSON object a line (an OpenTelemetry SpanExporter)."""

    def __init__(self, path: str) -> None:
        self.path = path.replace("{pid}", str(os.getpid()))
        self._lock = threading.Lock()
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed by shutdown

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = [json.dumps(span_record(s)) + "\n" for s in spans]
        with self._lock:
            if not self._file.closed:
                self._file.writelines(lines)
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        with self._lock:
            if not self._file.closed:
                self._file.flush()
        return True

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()


def span_record(s: Any) -> dict[str, Any]:
    """A finished SDK span as plain data (what JsonLinesExporter writes, what tests read)."""
    c = s.context
    return {
        "name": s.name,
        "service": s.resource.attributes.get("service.name"),
        "pid": os.getpid(),
        "trace_id": f"{c.trace_id:032x}",
        "span_id": f"{c.span_id:016x}",
        "parent_span_id": None if s.parent is None else f"{s.parent.span_id:016x}",
        "start_ns": s.start_time,
        "end_ns": s.end_time,
        "status": s.status.status_code.name,
        "attributes": dict(s.attributes or {}),
        "events": [{"name": e.name, "ns": e.timestamp, "attributes": dict(e.attributes or {})} for e in s.events],
    }


def _traces_url(endpoint: str) -> str:
    """OTLP/HTTP wants the traces path; a bare collector address gets it (as the env variable does)."""
    from urllib.parse import urlsplit

    if not endpoint.startswith(("http://", "https://")):
        endpoint = "http://" + endpoint
    return endpoint.rstrip("/") + "/v1/traces" if urlsplit(endpoint).path in ("", "/") else endpoint


def configure(*, service_name: str, endpoint: str | None = None, exporter: Any = None,
              file: str | None = None) -> bool:
    """Enable tracing for this process; False (and nothing imported) when nothing asks for it.

    ``endpoint``: an OTLP collector (``--otlp-endpoint``); else the standard OTEL_EXPORTER_OTLP_*
    variables. ``exporter``: any SpanExporter (tests: an in-memory one). ``file``: JSON lines (else
    $TURBINE_TRACE_FILE). Raises TracingUnavailable without the otel extra.
    """
    global _tracer
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    from_env = bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    file = file or env.get("TURBINE_TRACE_FILE") or None
    if not (endpoint or from_env or exporter is not None or file):
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        raise TracingUnavailable("tracing needs OpenTelemetry: pip install 'turbine[otel]'") from None
    resource = Resource.create({} if env.get("OTEL_SERVICE_NAME") else {"service.name": service_name})
    provider = TracerProvider(resource=resource)
    if endpoint or from_env:
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(endpoint)))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if file:
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(file)))
    shutdown()
    _tracer = OtelTracer(provider)
    return True


def _otlp_exporter(endpoint: str | None) -> Any:
    grpc = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                          os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")) == "grpc"
    try:
        if grpc:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc

            return Grpc(endpoint=endpoint) if endpoint else Grpc()
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http
    except ImportError:
        kind = "grpc" if grpc else "http"
        raise TracingUnavailable(f"exporting over OTLP needs opentelemetry-exporter-otlp-proto-{kind}: "
                                 "pip install 'turbine[otel]'") from None
    return Http(endpoint=_traces_url(endpoint)) if endpoint else Http()


def shutdown() -> None:
    """Flush and stop the exporters; tracing is off afterwards."""
    global _tracer
    old, _tracer = _tracer, NoopTracer()
    old.shutdown()


def record_route(span: Span, t0_ns: int, router: Any, decision: Any, attempt: int, *, queued: bool = False,
                 pool: str = "main") -> None:
    """A ``turbine.route`` span under ``span``: a router's decision (a router.RouteDecision), from
    ``t0_ns`` (any wait in the frontend's route queue included) to now."""
    tracer().record("turbine.route", span.traceparent, t0_ns, time.time_ns(), {
        "turbine.route.pool": pool, "turbine.route.policy": getattr(router, "policy_name", None),
        "turbine.worker_id": decision.worker_id, "turbine.route.overlap_blocks": decision.overlap_blocks,
        "turbine.route.predicted_ttft_s": decision.predicted_ttft_s, "turbine.route.attempt": attempt,
        "turbine.route.queued": queued})


def add_tracing_args(p: Any) -> None:
    p.add_argument("--otlp-endpoint", default=None, metavar="URL",
                   help="export request traces (OpenTelemetry) to this OTLP/HTTP collector, e.g. "
                   "http://127.0.0.1:4318 (default: $OTEL_EXPORTER_OTLP_ENDPOINT; off when neither is set; "
                   "needs pip install 'turbine[otel]')")


__all__ = ["NOOP_SPAN", "JsonLinesExporter", "NoopTracer", "OtelTracer", "Span", "TracingUnavailable",
           "add_tracing_args", "configure", "record_route", "shutdown", "span_record", "tracer"]
