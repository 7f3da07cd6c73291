"""Hostile and careless input against a live server: bounded, 4xx, counted; auth, TLS and API details."""
from __future__ import annotations

import http.client
import json
import shutil
import ssl
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import openai
import pytest

from testkit import metric_values


def request(url: str, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def post_json(url: str, path: str, obj: object, **headers: str) -> tuple[int, dict]:
    status, _, data = request(url, "POST", path, json.dumps(obj).encode(), headers)
    return status, json.loads(data) if data else {}


def chat(**kw: object) -> dict:
    body: dict = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    body.update(kw)
    return body


def assert_400(url: str, body: dict, path: str = "/v1/chat/completions") -> dict:
    status, out = post_json(url, path, body)
    assert status == 400, out
    assert {"message", "type", "param", "code"} <= set(out["error"])
    return out["error"]


@pytest.mark.parametrize("fields", [
    {"seed": 2**70}, {"seed": -(2**70)}, {"max_tokens": 2**70}, {"max_completion_tokens": 2**64},
    {"stop_token_ids": [2**70]}, {"min_tokens": 2**65}, {"top_k": 2**65}, {"n": 2**70},
])
def test_integers_past_64_bits_are_400(server, fields: dict) -> None:  # type: ignore[no-untyped-def]
    assert_400(server.url, chat(**fields))


def test_token_id_prompts_past_64_bits_are_400(server) -> None:  # type: ignore[no-untyped-def]
    assert_400(server.url, {"model": "tiny", "prompt": [2**70, 1], "max_tokens": 1}, "/v1/completions")
    assert_400(server.url, {"model": "tiny", "prompt": [[1, 2**64]], "max_tokens": 1}, "/v1/completions")


def test_deeply_nested_json_is_400(server) -> None:  # type: ignore[no-untyped-def]
    deep = b"[" * 200_000 + b"]" * 200_000
    body = b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],"chat_template_kwargs":{"x":' + deep + b"}}"
    status, _, data = request(server.url, "POST", "/v1/chat/completions", body)
    assert status == 400, data[:200]
    nested: object = 1
    for _ in range(40):
        nested = {"a": nested}
    err = assert_400(server.url, chat(chat_template_kwargs={"x": nested}))
    assert err["param"] == "chat_template_kwargs"


def test_overlong_prompt_is_refused_before_tokenizing(server) -> None:  # type: ignore[no-untyped-def]
    prompt = "word " * 1_000_000  # 5 MB: under the body limit, far over the 4096-token context
    t0 = time.monotonic()
    err = assert_400(server.url, chat(messages=[{"role": "user", "content": prompt}]))
    assert err["code"] == "context_length_exceeded"
    assert time.monotonic() - t0 < 2.0  # tokenizing it would take seconds
    err = assert_400(server.url, {"model": "tiny", "prompt": [prompt], "max_tokens": 1}, "/v1/completions")
    assert err["code"] == "context_length_exceeded"


def test_prompts_times_n_is_bounded(server) -> None:  # type: ignore[no-untyped-def]
    err = assert_400(server.url, {"model": "tiny", "prompt": ["a"] * 20, "n": 10, "max_tokens": 1},
                     "/v1/completions")
    assert err["param"] == "n"


def test_memory_returns_to_baseline_after_hostile_bodies(server) -> None:  # type: ignore[no-untyped-def]
    def rss() -> float:
        _, _, data = request(server.url, "GET", "/metrics")
        return metric_values(data.decode(), "process_resident_memory_bytes")[0]

    big = "x" * (7 << 20)
    for _ in range(3):  # warm up allocator pools
        assert_400(server.url, chat(messages=[{"role": "user", "content": big}]))
    before = rss()
    for _ in range(10):
        assert_400(server.url, chat(messages=[{"role": "user", "content": big}]))
        assert_400(server.url, {"model": "tiny", "prompt": [list(range(1, 5000))] * 100, "max_tokens": 1},
                   "/v1/completions")
    assert rss() - before < 64 << 20


def test_model_by_id(server) -> None:  # type: ignore[no-untyped-def]
    status, _, data = request(server.url, "GET", "/v1/models/tiny")
    assert status == 200 and json.loads(data)["id"] == "tiny" and json.loads(data)["object"] == "model"
    status, _, data = request(server.url, "GET", "/v1/models/nope")
    assert status == 404 and json.loads(data)["error"]["code"] == "model_not_found"
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    assert client.models.retrieve("tiny").id == "tiny"


def test_developer_role_is_the_system_role(server, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    from turbine.frontend.tokenizer import TurbineTokenizer

    tok = TurbineTokenizer.from_dir(model_dir)
    as_dev = tok.apply_chat_template([{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}],
                                     add_generation_prompt=True)
    as_sys = tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                                     add_generation_prompt=True)
    assert as_dev == as_sys
    status, out = post_json(server.url, "/v1/chat/completions",
                            chat(messages=[{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]))
    assert status == 200, out


def test_allow_head_and_options(server) -> None:  # type: ignore[no-untyped-def]
    status, headers, _ = request(server.url, "GET", "/v1/chat/completions")
    assert status == 405 and headers["allow"] == "OPTIONS, POST"
    status, headers, body = request(server.url, "OPTIONS", "/v1/models")
    assert status == 204 and headers["allow"] == "GET, HEAD, OPTIONS" and body == b""
    status, headers, body = request(server.url, "HEAD", "/v1/models")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0


def test_4xx_replies_are_counted_and_unknown_models_add_no_series(server) -> None:  # type: ignore[no-untyped-def]
    def count(status: int) -> float:
        _, _, data = request(server.url, "GET", "/metrics")
        want = ('model="tiny"', 'endpoint="chat"', f'status="{status}"')
        return sum(float(line.rsplit(" ", 1)[1]) for line in data.decode().splitlines()
                   if line.startswith("turbine_frontend_requests_total{") and all(w in line for w in want))

    before = count(400)
    assert_400(server.url, chat(max_tokens=-1))
    assert count(400) == before + 1
    for i in range(20):
        post_json(server.url, "/v1/chat/completions", chat(model=f"no-such-model-{i}"))
    _, _, data = request(server.url, "GET", "/metrics")
    text = data.decode()
    assert "no-such-model" not in text
    for name in ("process_resident_memory_bytes", "process_open_fds", "turbine_process_asyncio_tasks",
                 "turbine_http_connections"):
        assert metric_values(text, name), name


def test_api_key(model_dir: Path, server_factory) -> None:  # type: ignore[no-untyped-def]
    with server_factory(model_dir, workers=1, api_keys=("sk-one", "sk-two")) as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic sk-one"}):
            status, hdrs, data = request(s.url, "POST", "/v1/chat/completions", json.dumps(chat()).encode(), headers)
            err = json.loads(data)["error"]
            assert status == 401 and err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
            assert hdrs["www-authenticate"] == "Bearer"
        assert request(s.url, "GET", "/v1/models")[0] == 401
        assert request(s.url, "GET", "/health")[0] == 200  # open for load balancers
        for key in ("sk-one", "sk-two"):
            client = openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0)
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            assert r.usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0).models.list()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https(model_dir: Path, server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    with server_factory(model_dir, workers=1, tls_certfile=str(cert), tls_keyfile=str(key)) as s:
        assert s.url.startswith("https://")
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0,
                               http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(cert))))
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4, stream=True)
        assert sum(1 for c in stream if c.choices and c.choices[0].delta.content is not None) >= 1
