"""GET /openapi.json describes the API, and schemathesis finds a live server true to it.

schemathesis reads the document from the running server and fuzzes every operation (schema
examples, boundary values, then random valid and invalid data), derandomized, with a bounded
number of examples: no 5xx, and every status, content type, header, body and SSE event as
documented; invalid data is refused; other methods get 405 with Allow.

Not checked: that every request valid by the schema succeeds (positive_data_acceptance). Some
rules span fields or depend on the model (prompts x n, prompt + max_tokens within the context,
min_tokens <= max_tokens, stream_options only with stream, token ids below the vocabulary) and
are 400s the document lists; and JSON Schema counts 2.0 as an integer, which msgspec refuses.
"""
from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from testkit import ServerThread

CONTEXT = 256  # a small context keeps the longest fuzzed generations (128 choices x the context) cheap
MAX_EXAMPLES = 25  # fuzzed cases per operation and mode (valid and invalid data)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, negative_data_rejection, unsupported_method, allow_header_conformance]


@pytest.fixture(scope="module")
def small_model(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("openapi") / "tiny-test"
    shutil.copytree(model_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["max_position_embeddings"] = CONTEXT
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def live(small_model: Path, server_factory: type[ServerThread]) -> Iterator[ServerThread]:
    with server_factory(small_model, workers=1, speedup=1000.0) as s:
        yield s


@pytest.fixture(scope="module")
def document(live: ServerThread) -> dict:
    with urllib.request.urlopen(live.url + "/openapi.json", timeout=10) as r:
        assert r.status == 200 and r.headers["content-type"] == "application/json"
        return json.loads(r.read())


def _schemathesis(live: ServerThread, document: dict, **config: object) -> schemathesis.schemas.BaseSchema:
    """The document as served, plus the served model's name as an example (schema examples are where
    schemathesis starts from) and in a dictionary (random requests name it mostly), so that fuzzed
    requests get past the 404 to the real work. Loaded from a dict: schemathesis skips the operation
    that serves a document it loads by URL, and GET /openapi.json is to be fuzzed too."""
    doc = json.loads(json.dumps(document))
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        doc["components"]["schemas"][name]["properties"]["model"]["examples"] = ["tiny"]
    doc["paths"]["/v1/models/{model}"]["parameters"][0]["schema"]["examples"] = ["tiny"]
    parameters = {f"{where}.model": {"dictionary": "models", "probability": 0.8} for where in ("body", "path")}
    generation = {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none", "mode": "all"}
    settings = {
        "seed": 17,  # with deterministic generation: the same requests every run
        "suppress-health-check": ["too_slow"],  # a busy CI machine is not a failure of the server
        "base-url": live.url,
        "request-timeout": 30,
        "dictionaries": {"models": {"values": ["tiny"]}},
        "parameters": {**parameters, **config.pop("parameters", {})},  # type: ignore[dict-item]
        "generation": {**generation, **config.pop("generation", {})},  # type: ignore[dict-item]
        "phases": {"stateful": {"enabled": False}},
        **config,
    }
    return schemathesis.openapi.from_dict(doc, config=SchemathesisConfig.from_dict(settings))


@pytest.fixture(scope="module")
def api_schema(live: ServerThread, document: dict) -> schemathesis.schemas.BaseSchema:
    return _schemathesis(live, document)


@pytest.fixture(scope="module")
def stream_schema(live: ServerThread, document: dict) -> schemathesis.schemas.BaseSchema:
    """Random valid requests that all stream: the SSE events checked against the chunk schemas."""
    return _schemathesis(live, document, parameters={"body.stream": True}, generation={"mode": "positive"},
                         phases={"examples": {"enabled": False}, "coverage": {"enabled": False},
                                 "stateful": {"enabled": False}})


def test_document_is_valid_openapi_and_lists_every_route(live: ServerThread, document: dict) -> None:
    import jsonschema_rs

    assert document["openapi"].startswith("3.")
    schema = schemathesis.openapi.from_dict(document)
    schema.validate()  # against the OpenAPI metaschema of its version
    for name, component in document["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(component), name  # JSON Schema 2020-12
    routes = live.call(lambda: {path: set(methods) for path, methods in live.dep.frontend.api.routes.items()})
    documented = {path: {m.upper() for m in item if m != "parameters"} for path, item in document["paths"].items()}
    assert documented == routes
    for path, item in document["paths"].items():
        for method, op in item.items():
            if method != "parameters":
                assert "x-turbine-undocumented" not in op, f"{method.upper()} {path}: add it to openapi._OPS"
    assert {p["name"] for p in document["paths"]["/v1/models/{model}"]["parameters"]} == {"model"}
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "401" not in chat["responses"] and "security" not in chat  # no API keys on this server


@pytest.fixture(scope="module")
def keyed(small_model: Path, server_factory: type[ServerThread]) -> Iterator[ServerThread]:
    with server_factory(small_model, workers=1, speedup=1000.0, api_keys=("k",), max_inflight=4) as s:
        yield s


@pytest.fixture(scope="module")
def keyed_document(keyed: ServerThread) -> dict:
    with urllib.request.urlopen(keyed.url + "/openapi.json", timeout=10) as r:  # no key: open, like /health
        return json.loads(r.read())


def test_document_with_api_keys_and_an_inflight_limit(keyed_document: dict) -> None:
    doc = keyed_document
    schemathesis.openapi.from_dict(doc).validate()
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["security"] == [{"bearer": []}] and {"401", "429"} <= set(chat["responses"])
    assert "429" not in doc["paths"]["/v1/models"]["get"]["responses"]
    for path in ("/health", "/openapi.json"):
        assert doc["paths"][path]["get"]["security"] == [] and "401" not in doc["paths"][path]["get"]["responses"]


@pytest.fixture(scope="module")
def keyed_schema(keyed: ServerThread, keyed_document: dict) -> schemathesis.schemas.BaseSchema:
    """No key: every protected operation must answer a documented 401, the open ones serve."""
    return _schemathesis(keyed, keyed_document, generation={"max-examples": 5},
                         phases={"examples": {"enabled": False}, "coverage": {"enabled": False},
                                 "stateful": {"enabled": False}})


@schemathesis.pytest.from_fixture("api_schema").parametrize()
def test_live_server_conforms_to_its_openapi_document(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS)


@schemathesis.pytest.from_fixture("stream_schema").include(method="POST").parametrize()
def test_live_server_streams_conform_to_its_openapi_document(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS)


@schemathesis.pytest.from_fixture("keyed_schema").parametrize()
def test_api_keys_are_enforced_as_documented(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=[*CHECKS, ignored_auth])
