"""Load generator against a fake OpenAI SSE server with known chunks and delays.

Timing checks use lower bounds the server guarantees (it sleeps at least that long) and loose
upper bounds, so a busy 2-core machine cannot make them fail.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import aiohttp
import msgspec
import pytest
from aiohttp import web

from turbine.bench import cpu as cpu_mod
from turbine.bench.loadgen import (
    AllFailed,
    LoadConfig,
    SseStream,
    arrival_times,
    build_bodies,
    endpoint_url,
    models_url,
    run_load,
    send_request,
)
from turbine.bench.prompts import build_prompts
from turbine.bench.replay import ReplayConfig
from turbine.bench.stats import Percentiles, RequestResult, format_table, percentile, summarize


@dataclass
class FakeOpenAI:
    """Streams `chunks` one-token chunks: the first after `first_delay`, then every `gap` s.

    The prompt selects a behaviour: containing "FAIL500" → HTTP 500; "ERREVENT" → an error
    event mid-stream; "TRUNCATE" → the connection closes before [DONE]; "NOUSAGE" → no usage.
    """

    chunks: int = 5
    first_delay: float = 0.0
    gap: float = 0.0
    cached: int = 32
    bodies: list[dict] = field(default_factory=list)
    recv_times: list[float] = field(default_factory=list)
    peers: set = field(default_factory=set)
    in_flight: int = 0
    max_in_flight: int = 0
    url: str = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        app.router.add_post("/v1/completions", self.handle)
        app.router.add_get("/v1/models", self.models)
        self.runner = web.AppRunner(app, handler_cancellation=True)  # a client hang-up ends its handler
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model"}]})

    def _chunk(self, body: dict, i: int) -> dict:
        if "messages" in body:
            return {"choices": [{"index": 0, "delta": {"content": f"t{i} "}}]}
        return {"choices": [{"index": 0, "text": f"t{i} "}]}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.recv_times.append(time.monotonic())
        self.peers.add(request.transport.get_extra_info("peername"))
        prompt = body.get("prompt") or body["messages"][0]["content"]
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": self.chunks,
                 "prompt_tokens_details": {"cached_tokens": self.cached}}
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if "FAIL500" in prompt:
                return web.Response(status=500, text="boom")
            await asyncio.sleep(self.first_delay)
            if not body.get("stream"):
                await asyncio.sleep(self.gap * (self.chunks - 1))
                msg = {"message": {"role": "assistant", "content": "x"}} if "messages" in body \
                    else {"text": "x"}
                return web.json_response({"choices": [{"index": 0, **msg}], "usage": usage})
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(self.chunks):
                if i:
                    await asyncio.sleep(self.gap)
                await resp.write(b"data: " + json.dumps(self._chunk(body, i)).encode() + b"\n\n")
                if i == 1 and "ERREVENT" in prompt:
                    await resp.write(b'data: {"error": {"message": "engine died"}}\n\n')
                if i == 1 and "TRUNCATE" in prompt:
                    request.transport.close()
                    return resp
            if "NOUSAGE" not in prompt:
                await resp.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
            if "NODONE" not in prompt:
                await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            self.in_flight -= 1


@pytest.fixture
async def server():
    s = FakeOpenAI()
    await s.start()
    yield s
    await s.stop()


# ---- pure parts ---------------------------------------------------------------------------------
def test_percentile_matches_linear_interpolation():
    xs = [float(x) for x in range(1, 101)]  # 1..100
    assert percentile(xs, 50) == pytest.approx(50.5)
    assert percentile(xs, 90) == pytest.approx(90.1)
    assert percentile(xs, 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(xs, 101)


def test_summarize_counts_tokens_errors_and_cpu():
    ok = [RequestResult(ok=True, ttft_s=0.010 * (i + 1), itl_s=[0.002, 0.004], e2e_s=0.1,
                        prompt_tokens=100, output_tokens=50, cached_tokens=64) for i in range(10)]
    bad = [RequestResult(ok=False, error="HTTP 500: boom")] * 2
    rep = summarize(ok + bad, 2.0, {"frontend": 0.6, "gone": None}, concurrency=4)
    d = rep.to_dict()
    assert (d["requests"], d["ok"], d["errors"]) == (12, 10, 2)
    assert d["req_per_s"] == 5.0 and d["output_tokens_per_s"] == 250.0
    assert d["ttft_ms"]["p50"] == pytest.approx(55.0) and d["ttft_ms"]["p99"] == pytest.approx(99.1)
    assert d["itl_ms"] == {"p50": 3.0, "p90": 4.0, "p99": 4.0}
    assert d["cpu_ms_per_request"] == {"frontend": 50.0, "gone": None}  # 600 ms / 12 requests
    assert d["cpu_pct"] == {"frontend": 30.0, "gone": None}
    assert d["prompt_tokens_mean"] == 100 and d["cached_tokens_mean"] == 64
    assert d["first_errors"] == ["HTTP 500: boom"] * 2
    for key in ("duration_s", "e2e_ms"):
        assert key in d
    table = format_table([rep]).splitlines()
    assert len(table) == 3 and "cpu ms/req frontend" in table[0]
    assert len({len(line) for line in table}) == 1  # aligned
    assert format_table([rep], markdown=True).startswith("| label")


def test_sse_stream_parses_split_crlf_multiline_and_done():
    events = (b": keepalive\r\n\r\ndata: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\r\n\r\n"
              b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n"
              b"data: {\"choices\":[{\"delta\":\ndata: {\"content\":\"b\"}}]}\n\n"
              b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}\n\n"
              b"data: [DONE]\n\n")
    sse = SseStream()
    for i in range(len(events)):  # one byte at a time: every split point is exercised
        sse.feed(events[i:i + 1], float(i))
    assert len(sse.content_times) == 2  # the role-only chunk carries no content
    assert sse.usage is not None and sse.usage.completion_tokens == 2
    assert sse.done and sse.error is None


def test_arrival_times_are_seeded_poisson():
    a = arrival_times(2000, 50.0, seed=3)
    assert a == arrival_times(2000, 50.0, seed=3) and a != arrival_times(2000, 50.0, seed=4)
    assert a[0] == 0.0 and all(y >= x for x, y in zip(a, a[1:]))
    assert 2000 / a[-1] == pytest.approx(50.0, rel=0.1)


def test_prompts_are_deterministic_with_shared_prefix():
    p = build_prompts(5, 200, shared_prefix_tokens=80, seed=1)
    assert p == build_prompts(5, 200, shared_prefix_tokens=80, seed=1)
    assert len(set(p)) == 5
    prefix = os.path.commonprefix(p)
    assert len(prefix.split()) >= 60  # ~80 tokens / 1.1 tokens per word
    assert all(160 <= len(x.split()) <= 200 for x in p)
    with pytest.raises(ValueError):
        build_prompts(1, 10, shared_prefix_tokens=11)


def test_prompts_trimmed_with_a_tokenizer_have_the_requested_length():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from turbine.bench.prompts import word_pool

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(word_pool()[:20000])],
                            trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    p = build_prompts(4, 120, shared_prefix_tokens=50, seed=2, tokenizer=tok)
    assert len(set(p)) == 4 and len(os.path.commonprefix(p)) > 100
    assert all(abs(len(tok.encode(x).ids) - 120) <= 2 for x in p)  # +-2: re-tokenising the seam


def test_bodies_ask_for_exact_token_counts():
    cfg = LoadConfig(max_tokens=7, prompts=["hi"], completions=False)
    body = msgspec.json.decode(build_bodies(cfg, "m", 1)[0])
    assert body == {"model": "m", "max_tokens": 7, "stream": True, "ignore_eos": True, "min_tokens": 7,
                    "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": "hi"}]}
    cfg = LoadConfig(max_tokens=7, prompts=["hi"], completions=True, stream=False)
    body = msgspec.json.decode(build_bodies(cfg, "m", 1)[0])
    assert body["prompt"] == "hi" and "stream_options" not in body and body["stream"] is False
    assert cfg.endpoint() == "http://127.0.0.1:8000/v1/completions"


def test_config_validation():
    with pytest.raises(ValueError, match="exactly one"):
        LoadConfig(concurrency=4, rate=2.0).validate()
    with pytest.raises(ValueError, match="exactly one"):
        LoadConfig(concurrency=None).validate()
    with pytest.raises(ValueError, match="concurrency"):
        LoadConfig(concurrency=0).validate()
    with pytest.raises(ValueError, match="url"):
        LoadConfig(url="127.0.0.1:8000").validate()


def test_url_forms():
    chat, comp = "http://h:8/v1/chat/completions", "http://h:8/v1/completions"
    for url in ("http://h:8", "http://h:8/", "http://h:8/v1", "http://h:8/v1/", chat, chat + "/"):
        assert endpoint_url(url, completions=False) == chat, url
        assert models_url(url) == "http://h:8/v1/models", url
    assert endpoint_url("http://h:8/v1", completions=True) == endpoint_url(comp, completions=True) == comp
    assert models_url(comp) == "http://h:8/v1/models"
    assert endpoint_url("https://h/proxy/v1/", completions=False) == "https://h/proxy/v1/chat/completions"
    assert ReplayConfig(url="http://h:8/v1").endpoint() == comp  # trace mode had the same /v1/v1 bug
    for bad in ("http://h:8/v2", "http://h:8/v1/models", "http://h:8/api"):
        with pytest.raises(ValueError, match="cannot use url path"):
            LoadConfig(url=bad).validate()
    with pytest.raises(ValueError, match="these requests are for /v1/chat/completions"):
        LoadConfig(url=comp).validate()  # chat bodies to the completions endpoint would all fail
    with pytest.raises(ValueError, match="http://"):
        endpoint_url("http:///v1", completions=False)


def test_cpu_meter_and_pid_parsing():
    assert cpu_mod.parse_pids("fe=12, w=34+") == [cpu_mod.Target("fe", 12), cpu_mod.Target("w", 34, True)]
    for bad in ("fe", "fe=x", "=3", "a=1,a=2"):
        with pytest.raises(ValueError):
            cpu_mod.parse_pids(bad)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in cpu_mod.descendants(os.getpid())
        meter = cpu_mod.CpuMeter([cpu_mod.Target("me", os.getpid()), cpu_mod.Target("dead", 2**22 + 7)])
        meter.start()
        t = time.process_time()
        while time.process_time() - t < 0.3:
            pass
        used = meter.stop()
    finally:
        child.kill()
        child.wait()
    assert used["dead"] is None
    assert 0.15 <= used["me"] <= 5.0


# ---- against the fake server --------------------------------------------------------------------
async def test_send_request_measures_ttft_itl_and_usage(server):
    server.chunks, server.first_delay, server.gap = 5, 0.05, 0.02
    body = build_bodies(LoadConfig(prompts=["one two three"]), "fake-model", 1)[0]
    async with aiohttp.ClientSession() as s:
        r = await send_request(s, server.url + "/v1/chat/completions", body, stream=True)
    assert r.ok and r.error is None
    assert 0.05 <= r.ttft_s < 2.0
    assert len(r.itl_s) == 4 and all(0 <= g < 2.0 for g in r.itl_s)
    assert sum(r.itl_s) >= 0.06  # four gaps of >= 20 ms, minus delivery jitter
    assert r.e2e_s >= r.ttft_s + sum(r.itl_s) - 1e-9
    assert (r.prompt_tokens, r.output_tokens, r.cached_tokens) == (3, 5, 32)


async def test_closed_loop_report_counts_and_excludes_warmup(server):
    server.chunks, server.first_delay, server.gap = 4, 0.02, 0.005
    cfg = LoadConfig(url=server.url, concurrency=4, num_requests=24, warmup=4, prompt_tokens=40,
                     max_tokens=4, pids=f"self={os.getpid()}")
    rep = await run_load(cfg)
    d = rep.to_dict()
    assert len(server.bodies) == 28 and server.bodies[0]["model"] == "fake-model"  # from /v1/models
    assert (d["requests"], d["ok"], d["errors"]) == (24, 24, 0)
    assert server.max_in_flight == 4
    assert d["output_tokens_per_s"] * d["duration_s"] == pytest.approx(24 * 4, rel=0.01)
    assert d["cached_tokens_mean"] == 32 and 25 <= d["prompt_tokens_mean"] <= 40
    assert 20.0 <= d["ttft_ms"]["p50"] <= d["ttft_ms"]["p90"] <= d["ttft_ms"]["p99"] < 2000
    assert 0.0 <= d["itl_ms"]["p50"] <= d["itl_ms"]["p99"] < 2000
    assert d["e2e_ms"]["p50"] >= d["ttft_ms"]["p50"] * 0.9
    # 24 requests, 4 at a time, each >= 35 ms: at least 6 rounds
    assert d["duration_s"] >= 0.2 and d["req_per_s"] == pytest.approx(24 / d["duration_s"], rel=0.01)
    assert set(d["cpu_ms_per_request"]) == {"self", "loadgen"} and d["cpu_pct"]["self"] >= 0
    assert len(server.peers) <= 4  # keep-alive: connections are reused


async def test_errors_are_counted_and_usage_fallback(server):
    server.chunks = 3
    prompts = ["ok", "FAIL500", "ok", "ERREVENT", "TRUNCATE", "NOUSAGE", "NODONE"]
    cfg = LoadConfig(url=server.url, model="m", concurrency=2, num_requests=14, warmup=0,
                     prompts=prompts)
    rep = await run_load(cfg)
    assert (rep.requests, rep.ok, rep.errors) == (14, 6, 8)
    errors = " | ".join(rep.first_errors)
    assert "HTTP 500" in errors and "engine died" in errors and "[DONE]" in errors
    assert "ClientPayloadError" in errors  # the truncated one
    assert rep.output_tokens_mean == 3  # NOUSAGE requests fall back to counted chunks


async def test_fresh_connections_non_streaming_and_completions(server):
    server.chunks = 6
    cfg = LoadConfig(url=server.url, model="m", concurrency=2, num_requests=8, warmup=0,
                     fresh_conn=True, stream=False, completions=True, prompt_tokens=20)
    rep = await run_load(cfg)
    assert (rep.ok, rep.errors) == (8, 0)
    assert len(server.peers) == 8  # one TCP connection per request
    assert all("prompt" in b and b["stream"] is False for b in server.bodies)
    assert rep.ttft_ms == Percentiles() and rep.itl_ms == Percentiles()  # unmeasurable
    assert rep.e2e_ms.p50 is not None and rep.output_tokens_mean == 6


async def test_open_loop_follows_the_schedule_not_the_responses(server):
    server.chunks, server.first_delay = 1, 0.3
    cfg = LoadConfig(url=server.url, model="m", concurrency=None, rate=40.0, num_requests=20,
                     warmup=0, seed=5, prompts=["x"])
    rep = await run_load(cfg)
    last = arrival_times(20, 40.0, 5)[-1]
    assert rep.ok == 20
    assert server.max_in_flight >= 3  # a closed loop of 1 would never overlap
    span = server.recv_times[-1] - server.recv_times[0]
    assert last - 0.05 <= span <= last + 1.5
    assert last + 0.3 <= rep.duration_s <= last + 0.3 + 3.0


@pytest.mark.parametrize("suffix,completions", [
    ("", False), ("/", False), ("/v1", False), ("/v1/", False), ("/v1/chat/completions", False),
    ("/v1", True), ("/v1/completions", True),
])
async def test_every_url_form_reaches_the_endpoint_and_model_list(server, suffix, completions):
    cfg = LoadConfig(url=server.url + suffix, concurrency=1, num_requests=2, warmup=0, prompts=["x"],
                     completions=completions, progress=False)
    rep = await run_load(cfg)  # model=None: GET /v1/models from the same URL
    assert (rep.ok, rep.errors) == (2, 0), rep.first_errors
    assert [b["model"] for b in server.bodies] == ["fake-model"] * 2
    assert all(("prompt" in b) == completions for b in server.bodies)


async def test_stops_early_when_every_request_fails_and_cancels_the_rest(server):
    # 20 at a time: the 16 FAIL500s fail at once, the 4 others hang for 30 s. Waiting for those,
    # or sending all 500, would take far longer than the 15 s allowed; cancelling them hangs up.
    server.first_delay = 30.0
    cfg = LoadConfig(url=server.url, model="m", concurrency=20, num_requests=500, warmup=0,
                     prompts=["FAIL500"] * 16 + ["hang"] * 4, timeout_s=60, progress=False)
    t0 = time.monotonic()
    with pytest.raises(AllFailed, match="first 16 load requests all failed") as ex:
        await asyncio.wait_for(run_load(cfg), 15)
    assert time.monotonic() - t0 < 10
    assert len(server.bodies) < 60
    for _ in range(100):  # the hung requests' connections were closed, so their handlers end
        if server.in_flight == 0:
            break
        await asyncio.sleep(0.05)
    assert server.in_flight == 0
    assert str(ex.value).count("HTTP 500: boom") == 1  # distinct first errors only


async def test_stops_early_in_open_loop(server):
    cfg = LoadConfig(url=server.url, model="m", concurrency=None, rate=500.0, num_requests=2000,
                     warmup=0, prompts=["FAIL500"], progress=False)
    with pytest.raises(AllFailed, match="HTTP 500"):
        await asyncio.wait_for(run_load(cfg), 15)
    assert len(server.bodies) < 200  # the schedule would send 2000 over 4 s


async def test_stops_after_a_failed_warmup(server):
    cfg = LoadConfig(url=server.url, model="m", concurrency=4, num_requests=200, warmup=4,
                     prompts=["FAIL500"], progress=False)
    with pytest.raises(AllFailed, match="first 4 warm-up requests all failed"):
        await asyncio.wait_for(run_load(cfg), 15)
    assert len(server.bodies) == 4  # the measured phase never started


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_cli_stops_early_against_a_closed_port():
    port = _closed_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "turbine.bench.loadgen", "--url", f"http://127.0.0.1:{port}/v1", "--model", "m",
        "--concurrency", "4", "-n", "1000", "--prompt-tokens", "20", "--warmup", "0", "--no-progress",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    err = stderr.decode()
    assert proc.returncode == 1, err
    assert "stopped early: the first 16 load requests all failed" in err and f"127.0.0.1:{port}" in err
    assert "Traceback" not in err and "%|" not in err  # a message, no progress bar
    assert "TTFT" not in stdout.decode()  # no table of zeros


async def test_cli_writes_json(server, tmp_path):
    out = tmp_path / "r.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "turbine.bench.loadgen", "--url", server.url, "--concurrency", "2",
        "-n", "6", "--prompt-tokens", "30", "--max-tokens", "5", "--pids", f"test={os.getpid()}",
        "--json", str(out), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    assert b"RuntimeWarning" not in stderr
    d = json.loads(out.read_text())
    for key in ("requests", "ok", "errors", "duration_s", "req_per_s", "output_tokens_per_s",
                "ttft_ms", "itl_ms", "e2e_ms", "cpu_ms_per_request", "cpu_pct",
                "prompt_tokens_mean", "cached_tokens_mean"):
        assert key in d
    assert d["ok"] == 6 and set(d["ttft_ms"]) == {"p50", "p90", "p99"}
    assert "test" in d["cpu_pct"] and "TTFT p50" in stdout.decode()
    assert "load: 100%" in stderr.decode() and "warm-up: 100%" in stderr.decode()  # progress bars
    assert all(b["max_tokens"] == 5 and b["min_tokens"] == 5 for b in server.bodies)
