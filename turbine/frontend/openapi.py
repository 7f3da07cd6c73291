"""The OpenAPI document served at ``GET /openapi.json``, built once from the live route table.

Schemas come from the msgspec types (``msgspec.json.schema_components``); this module only says
which type each route takes and returns, and which statuses it can answer. OpenAPI 3.2, for its
``itemSchema``: a ``text/event-stream`` response is described event by event.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from turbine import __version__
from turbine.frontend.errors import ErrorBody
from turbine.frontend.openai_protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelInfo,
    ModelList,
    Usage,
)

if TYPE_CHECKING:
    from turbine.frontend.api import OpenAIApi
    from turbine.frontend.http_server import HttpRequest, HttpResponse

OPENAPI_VERSION = "3.2.0"
_UNSET = msgspec.UNSET


# --- types only documented here: api.py writes these bodies without a Struct ------------------
class ChatDelta(msgspec.Struct, omit_defaults=True):
    """The first event of a choice carries the role, the following ones text, the last one nothing."""

    role: Literal["assistant"] | msgspec.UnsetType = _UNSET
    content: str | msgspec.UnsetType = _UNSET


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChatDelta
    logprobs: None
    finish_reason: str | None


class ChatCompletionChunk(msgspec.Struct, omit_defaults=True):
    """One streamed event; with ``stream_options.include_usage`` every event has ``usage`` (null
    until the last event, whose ``choices`` is empty)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None | msgspec.UnsetType = _UNSET


class CompletionChunkChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: None
    finish_reason: str | None


class CompletionChunk(msgspec.Struct, omit_defaults=True):
    """One streamed event; ``usage`` as in ChatCompletionChunk."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None | msgspec.UnsetType = _UNSET


class Health(msgspec.Struct):
    """``models``: model -> worker instance ids; ``loading``: the models whose workers registered but
    whose tokenizer the frontend is still loading (their requests answer 503 until then);
    ``workers``: instance id -> model, address, metadata. ``status``: ok when a model can serve."""

    status: Literal["ok", "loading", "no_workers"]
    models: dict[str, list[str]]
    workers: dict[str, dict[str, str]]
    inflight: int
    loading: list[str] = []


class OpenApiDocument(msgspec.Struct):
    openapi: str
    info: dict[str, Any]
    paths: dict[str, dict[str, Any]]


# --- what each route takes, returns and can answer ---------------------------------------------
@dataclass(frozen=True)
class _Op:
    summary: str
    tag: str
    request: type | None = None  # JSON request body
    json: type | None = None  # 200 application/json
    stream: type | None = None  # 200 text/event-stream when the request asks for ``stream``
    text: str | None = None  # 200 text/plain, described in words
    errors: tuple[int, ...] = ()  # besides the transport ones, 401 (api keys) and 429 (in-flight limit)
    generates: bool = False  # refused with a 429 at the in-flight limit


_GENERATION_ERRORS = (400, 404, 500, 502, 503, 504)
_OPS: dict[tuple[str, str], _Op] = {
    ("POST", "/v1/chat/completions"): _Op(
        "Create a chat completion", "generation", ChatCompletionRequest, ChatCompletion, ChatCompletionChunk,
        errors=_GENERATION_ERRORS, generates=True),
    ("POST", "/v1/completions"): _Op(
        "Create a completion", "generation", CompletionRequest, Completion, CompletionChunk,
        errors=_GENERATION_ERRORS, generates=True),
    ("GET", "/v1/models"): _Op("List the models served now", "models", json=ModelList),
    ("GET", "/v1/models/{model}"): _Op("Describe a model served now", "models", json=ModelInfo, errors=(404,)),
    ("GET", "/health"): _Op("Models, workers and requests in flight", "operations", json=Health),
    ("GET", "/metrics"): _Op("Prometheus metrics", "operations",
                             text="Prometheus text exposition format, version 0.0.4"),
    ("GET", "/openapi.json"): _Op("This document", "operations", json=OpenApiDocument),
}

# Answered by the HTTP server for any route, before a handler runs (http_server.py).
_TRANSPORT_ERRORS = (400, 408, 413, 414, 417, 431, 503)
_REASONS = {
    400: "Invalid request: malformed HTTP or JSON, a field out of its bounds, an unsupported feature, "
         "or a prompt longer than the model's context",
    401: "Missing or wrong API key",
    404: "No such model (or route)",
    408: "The request was not received in time",
    413: "The request body is larger than the server's limit",
    414: "The request URL is too long",
    417: "Unsupported Expect header (only 100-continue is)",
    429: "The server is at its in-flight request limit; retry later",
    431: "Too many request headers, or too large",
    500: "A worker failed the request",
    502: "A worker ended the request abnormally",
    503: "No worker serves the model now, the request failed on several workers, "
         "the model is still loading, or the server is at its connection limit",
    504: "The request timed out",
}
_PARAM = re.compile(r"\{(\w+)\}")


def build_document(api: OpenAIApi) -> dict[str, Any]:
    """The OpenAPI document of every route in ``api.routes`` (a route missing from the table above
    is listed with ``x-turbine-undocumented``, so a test can insist there are none)."""
    used = {ErrorBody} | {t for op in _OPS.values() for t in (op.request, op.json, op.stream) if t}
    _, components = msgspec.json.schema_components(
        sorted(used, key=lambda t: t.__name__), ref_template="#/components/schemas/{name}")
    paths: dict[str, dict[str, Any]] = {}
    for path, methods in sorted(api.routes.items()):
        item = paths.setdefault(path, {})
        params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
                  for p in _PARAM.findall(path)]
        if params:
            item["parameters"] = params
        for method, (_, label, auth) in sorted(methods.items()):
            item[method.lower()] = _operation(api, method, path, label, auth and bool(api.api_keys))
    doc: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Turbine",
            "version": __version__,
            "description": "OpenAI-compatible LLM serving. Every route also answers HEAD (for GET) and "
                           "OPTIONS (204 with Allow); another method gets 405 with Allow; an unknown "
                           "path 404. Errors are OpenAI's {\"error\": {message, type, param, code}}.",
        },
        "paths": paths,
        "components": {"schemas": components, "responses": {}},
    }
    statuses = {int(s) for item in paths.values() for op in item.values() if "responses" in op
                for s in op["responses"] if s != "200"}
    doc["components"]["responses"] = {str(s): _error_response(s) for s in sorted(statuses)}
    if api.api_keys:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc


def _operation(api: OpenAIApi, method: str, path: str, label: str, auth: bool) -> dict[str, Any]:
    op = _OPS.get((method, path))
    out: dict[str, Any] = {"operationId": re.sub(r"[^a-z0-9]+", "_", f"{method} {path}".lower()).strip("_")}
    statuses = set(_TRANSPORT_ERRORS)
    content: dict[str, Any] = {}
    if op is None:
        out["x-turbine-undocumented"] = True
    else:
        out["summary"] = op.summary
        out["tags"] = [op.tag]
        statuses.update(op.errors)
        if op.generates and api.max_inflight:
            statuses.add(429)
        if op.request is not None:
            out["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(op.request)}}}
        if op.json is not None:
            content["application/json"] = {"schema": _ref(op.json)}
        if op.stream is not None:
            # Server-sent events: a chunk per event, an in-band error if the stream fails after it started,
            # then "[DONE]"
            content["text/event-stream"] = {"itemSchema": {
                "type": "object", "required": ["data"],
                "properties": {"data": {"anyOf": [
                    {"const": "[DONE]"},
                    {"contentMediaType": "application/json",
                     "contentSchema": {"anyOf": [_ref(op.stream), _ref(ErrorBody)]}},
                ]}}}}
        if op.text is not None:
            content["text/plain"] = {"schema": {"type": "string", "description": op.text}}
    responses: dict[str, Any] = {"200": {"description": op.summary if op else label}}
    if content:
        responses["200"]["content"] = content
    if auth:
        statuses.add(401)
        out["security"] = [{"bearer": []}]
    elif api.api_keys:
        out["security"] = []  # open even when keys are configured
    for s in sorted(statuses):
        responses[str(s)] = {"$ref": f"#/components/responses/{s}"}
    out["responses"] = responses
    return out


def _ref(t: type) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{t.__name__}"}


def _error_response(status: int) -> dict[str, Any]:
    out: dict[str, Any] = {"description": _REASONS[status],
                           "content": {"application/json": {"schema": _ref(ErrorBody)}}}
    if status == 401:
        out["headers"] = {"WWW-Authenticate": {"required": True, "schema": {"const": "Bearer"}}}
    elif status == 503:
        out["headers"] = {"Retry-After": {"schema": {"type": "string"}}}
    return out


class OpenApiRoute:
    """``GET /openapi.json``: the document, built on the first request (every route is added by then)."""

    def __init__(self, api: OpenAIApi):
        self.api = api
        self.body: bytes | None = None

    async def __call__(self, req: HttpRequest, resp: HttpResponse) -> None:
        if self.body is None:
            self.body = msgspec.json.encode(build_document(self.api))
        resp.send(200, self.body)
