"""Live trace replay against a fake OpenAI server: request bodies, send times, the summary,
and the `turbine bench --trace` command line."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import msgspec
import pytest
from aiohttp import web

from turbine.bench.replay import ReplayConfig, replay
from turbine.bench.trace import MOONCAKE_BLOCK_TOKENS as B
from turbine.bench.trace import TokenSynth, TraceRequest, write_trace


class FakeCompletions:
    """Streams one text chunk per requested token; reports half the prompt as cached."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.recv: list[float] = []

    async def start(self) -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self.handle)
        app.router.add_get("/v1/models", self.models)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}"

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "fake-model"}]})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.recv.append(time.perf_counter())
        body = await request.json()
        self.bodies.append(body)
        if body["max_tokens"] == 13:
            return web.json_response({"error": {"message": "unlucky"}}, status=500)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(body["max_tokens"]):
            await resp.write(b'data: {"choices":[{"text":"x"}]}\n\n')
            await asyncio.sleep(0.001)
        n = len(body["prompt"])
        usage = {"prompt_tokens": n, "completion_tokens": body["max_tokens"],
                 "prompt_tokens_details": {"cached_tokens": n // 2}}
        await resp.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp


def _trace() -> list[TraceRequest]:
    """Five requests 200 ms apart sharing their first block; the last one (13 tokens) fails."""
    return [TraceRequest(timestamp_ms=1000 + 200 * i, input_length=B + 10 * i, output_length=3 + i if i < 4 else 13,
                         hash_ids=(1, 100 + i)) for i in range(5)]


async def test_replay_sends_token_prompts_at_trace_times() -> None:
    fake = FakeCompletions()
    url = await fake.start()
    try:
        reqs = _trace()
        out = await replay(reqs, ReplayConfig(url=url, speed=2.0, progress=False))
    finally:
        await fake.runner.cleanup()
    synth = TokenSynth(4096)
    bodies = sorted(fake.bodies, key=lambda b: b["max_tokens"])
    for req, body in zip(reqs, bodies):
        assert body["prompt"] == synth.prompt(req)
        assert body["max_tokens"] == body["min_tokens"] == req.output_length
        assert body["ignore_eos"] is True and body["stream"] is True
        assert body["stream_options"] == {"include_usage": True}
        assert body["model"] == "fake-model"
    # Arrivals 200 ms apart in the trace, so 100 ms apart at speed 2: never early (the schedule
    # is absolute), late only by a loose bound on a busy machine.
    for i, at in enumerate(out.sent_at_s):
        assert 0.1 * i - 0.005 <= at <= 0.1 * i + 0.3, out.sent_at_s
    rep = out.report
    assert (rep.requests, rep.ok, rep.errors) == (5, 4, 1)  # output_length 13 fails
    assert rep.hit_rate == pytest.approx(sum(r.prompt_tokens // 2 for r in out.results if r.ok)
                                         / sum(r.prompt_tokens for r in out.results if r.ok))
    assert rep.ideal_hit_rate == pytest.approx(4 / 10)  # hash id 1 repeats 4 times out of 10 blocks
    assert out.results[0].output_tokens == 3 and len(out.results[0].itl_s) == 2
    assert rep.to_dict()["mode"] == "live"


def test_bench_trace_command_line(tmp_path: Path) -> None:
    fake = FakeCompletions()
    loop = asyncio.new_event_loop()
    url = loop.run_until_complete(fake.start())
    import threading

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        trace = tmp_path / "t.jsonl"
        write_trace(trace, [r for r in _trace() if r.output_length != 13])
        from turbine.cli import main

        with pytest.raises(SystemExit) as ex:
            main(["bench", "--url", url, "--trace", str(trace), "--speed", "10", "--max-requests", "3",
                  "--json", str(tmp_path / "out.json"), "--slo-ttft", "5000", "--slo-itl", "500"])
        assert ex.value.code == 0
    finally:
        asyncio.run_coroutine_threadsafe(fake.runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    d = msgspec.json.decode((tmp_path / "out.json").read_bytes())
    assert d["requests"] == 3 and d["errors"] == 0
    assert d["slo"] == {"ttft_ms": 5000.0, "itl_ms": 500.0}
    assert d["goodput_rps"] > 0 and set(d["ttft_ms"]) == {"p50", "p90", "p99"}


def test_bench_trace_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from turbine.cli import main

    (tmp_path / "bad.jsonl").write_text('{"timestamp": 0}\n')
    with pytest.raises(SystemExit) as ex:
        main(["bench", "--trace", str(tmp_path / "bad.jsonl"), "--json", str(tmp_path / "o.json")])
    assert ex.value.code == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
