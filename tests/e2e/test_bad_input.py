"""Careless and hostile clients get clear OpenAI-style 4xx errors, and the server keeps serving."""
from __future__ import annotations

import http.client
import json
import socket
from urllib.parse import urlparse

import pytest


def post(url: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        data = r.read()
        return r.status, (json.loads(data) if data else {})
    finally:
        conn.close()


def chat(**kw: object) -> bytes:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    body.update(kw)
    return json.dumps(body).encode()


def assert_error(status: int, body: dict, expected: int) -> None:
    assert status == expected, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert {"message", "type", "param", "code"} <= set(err)


def assert_still_serving(url: str) -> None:
    status, body = post(url, "/v1/chat/completions", chat())
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2, 3]", b'{"model": "tiny", "messages": ', b"\xff\xfe"])
def test_malformed_json_is_400(server, body: bytes) -> None:  # type: ignore[no-untyped-def]
    assert_error(*post(server.url, "/v1/chat/completions", body), 400)
    assert_still_serving(server.url)


@pytest.mark.parametrize("fields,param", [
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": 7}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages"),
    ({"stop": ["a"] * 40}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"logprobs": True}, "logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_bad_parameters_are_400(server, fields: dict, param: str) -> None:  # type: ignore[no-untyped-def]
    status, body = post(server.url, "/v1/chat/completions", chat(**fields))
    assert_error(status, body, 400)
    assert body["error"]["param"] == param or param in body["error"]["message"]


def test_bad_completion_prompts(server) -> None:  # type: ignore[no-untyped-def]
    for prompt in ("", [], [[]], [-1, 2], [10**9]):
        body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 2}).encode()
        assert_error(*post(server.url, "/v1/completions", body), 400)


def test_unknown_model_is_404(server) -> None:  # type: ignore[no-untyped-def]
    status, body = post(server.url, "/v1/chat/completions", chat(model="no-such-model"))
    assert_error(status, body, 404)
    assert body["error"]["code"] == "model_not_found"


def test_prompt_longer_than_context_is_400(server) -> None:  # type: ignore[no-untyped-def]
    huge = "word " * 20000
    status, body = post(server.url, "/v1/chat/completions",
                        chat(messages=[{"role": "user", "content": huge}]))
    assert_error(status, body, 400)
    assert body["error"]["code"] == "context_length_exceeded"
    status, body = post(server.url, "/v1/chat/completions", chat(max_tokens=10**6))
    assert_error(status, body, 400)
    assert_still_serving(server.url)


def test_huge_body_is_413_and_server_survives(server) -> None:  # type: ignore[no-untyped-def]
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"a" * (40 << 20) + b'"}]}'
    u = urlparse(server.url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body))
        try:
            s.sendall(body[: 1 << 20])
        except OSError:
            pass
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b'"error"' in reply
    assert_still_serving(server.url)


def test_chunked_huge_body_is_413(server) -> None:  # type: ignore[no-untyped-def]
    u = urlparse(server.url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"a" * (1 << 20)
        try:
            for _ in range(40):
                s.sendall(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        except OSError:
            pass
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert_still_serving(server.url)


def test_unknown_route_and_method(server) -> None:  # type: ignore[no-untyped-def]
    assert_error(*post(server.url, "/v1/nothing", b"{}"), 404)
    u = urlparse(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("GET", "/v1/chat/completions")
    r = conn.getresponse()
    assert r.status == 405 and "error" in json.loads(r.read())
    conn.close()


def test_garbage_http_gets_400(server) -> None:  # type: ignore[no-untyped-def]
    u = urlparse(server.url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(b"\x00\x01 NOT HTTP AT ALL\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 400")
    assert_still_serving(server.url)


def test_inflight_limit_gives_429(model_dir, server_factory) -> None:  # type: ignore[no-untyped-def]
    import threading

    with server_factory(model_dir, workers=1, speedup=1.0, max_inflight=1) as s:
        slow = threading.Thread(target=post, args=(s.url, "/v1/chat/completions", chat(max_tokens=300)))
        slow.start()
        import time

        deadline = time.monotonic() + 5
        while s.call(lambda: s.dep.frontend.api.inflight) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        status, body = post(s.url, "/v1/chat/completions", chat())
        assert_error(status, body, 429)
        slow.join(timeout=30)
        assert_still_serving(s.url)


def test_request_timeout_is_504_and_frees_the_worker(model_dir, server_factory) -> None:  # type: ignore[no-untyped-def]
    with server_factory(model_dir, workers=1, speedup=1.0, request_timeout_s=0.3) as s:
        status, body = post(s.url, "/v1/chat/completions", chat(max_tokens=2000))
        assert_error(status, body, 504)
        import time

        deadline = time.monotonic() + 2
        while (stats := s.call(lambda: s.dep.workers[0].engine.stats())).num_running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stats.num_running == 0 and stats.kv_active_blocks == 0
