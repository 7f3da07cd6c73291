"""MockEngine: streams, abort on close/cancel, stop, KV event sink, idle behaviour, pacing."""
from __future__ import annotations

import asyncio
import time

import pytest

from turbine.mocker.engine import MockEngine, MockerConfig
from turbine.protocols.generate import GenerateDelta, GenerateRequest, SamplingOptions, StopConditions
from turbine.protocols.kv_events import BlockStored

pytestmark = pytest.mark.timeout(30)

FAST = MockerConfig(block_size=4, num_gpu_blocks=256, speedup_ratio=1000.0)


class ConstantTiming:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def step_seconds(self, num_prefill_tokens, num_decode_seqs, kv_usage, **kw):  # type: ignore[no-untyped-def]
        return self.seconds


def req(rid: str, prompt: list[int] | None = None, max_tokens: int = 8) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid,
        token_ids=prompt if prompt is not None else list(range(10, 30)),
        stop=StopConditions(max_tokens=max_tokens),
        sampling=SamplingOptions(temperature=0.0),
    )


async def collect(engine: MockEngine, request: GenerateRequest) -> list[GenerateDelta]:
    return [d async for d in engine.generate(request)]


async def started(config: MockerConfig = FAST, **kw: object) -> MockEngine:
    engine = MockEngine(config, vocab_size=1000, **kw)  # type: ignore[arg-type]
    await engine.start()
    return engine


async def test_stream_has_one_token_per_delta_and_usage_at_the_end() -> None:
    engine = await started()
    deltas = await collect(engine, req("a", max_tokens=6))
    assert [len(d.token_ids) for d in deltas] == [1] * 6
    assert [d.finish_reason for d in deltas] == [None] * 5 + ["length"]
    last = deltas[-1]
    assert (last.prompt_tokens, last.cached_tokens, last.completion_tokens) == (20, 0, 6)
    # The first token already tells the prefix-cache hit (a stop string may end the stream early).
    assert (deltas[0].prompt_tokens, deltas[0].cached_tokens) == (20, 0)
    assert deltas[1].prompt_tokens is None
    again = await collect(engine, req("b", max_tokens=6))  # greedy: same tokens, cache hit
    assert [d.token_ids for d in again] == [d.token_ids for d in deltas]
    assert again[-1].cached_tokens == 16 and again[0].cached_tokens == 16
    assert engine.stats().kv_active_blocks == 0
    await engine.stop()


async def test_closing_the_stream_aborts_and_frees_blocks() -> None:
    engine = await started()
    stream = engine.generate(req("a", max_tokens=900))
    await anext(stream)
    await anext(stream)
    assert engine.stats().kv_active_blocks > 0
    await stream.aclose()
    assert engine.stats() [:4] == (0, 256, 0, 0)
    await engine.stop()


async def test_cancelling_the_consumer_aborts_the_request() -> None:
    engine = await started()
    got_one = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(req("a", max_tokens=900)):
            got_one.set()

    task = asyncio.create_task(consume())
    await got_one.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.stats().kv_active_blocks == 0 and engine.stats().num_running == 0
    await engine.stop()


async def test_stop_ends_open_streams_with_abort() -> None:
    engine = await started(MockerConfig(block_size=4, num_gpu_blocks=256, speedup_ratio=1.0))
    streams = [engine.generate(req(f"r{i}", max_tokens=900)) for i in range(3)]
    firsts = [asyncio.create_task(anext(s)) for s in streams]
    await asyncio.sleep(0.01)
    await engine.stop()
    for s, first in zip(streams, firsts):
        deltas = [await first] + [d async for d in s]
        assert deltas[-1].finish_reason == "abort"
        assert deltas[-1].prompt_tokens == 20
    assert engine.stats().kv_active_blocks == 0
    with pytest.raises(RuntimeError, match="not running"):
        await anext(engine.generate(req("late")))


async def test_kv_events_reach_the_sink_after_steps() -> None:
    engine = await started()
    batches: list[list] = []  # type: ignore[type-arg]
    engine.set_kv_event_sink(batches.append)
    await collect(engine, req("a", prompt=list(range(10, 27)), max_tokens=8))
    stored = [h for b in batches for e in b if isinstance(e, BlockStored) for h in e.block_hashes]
    assert len(stored) == 6  # 17 prompt + 7 computed output tokens = 24 = 6 full blocks
    assert {h for e in engine.kv_snapshot() for h in e.block_hashes} == set(stored)
    engine.set_kv_event_sink(None)
    await engine.stop()


async def test_a_failing_sink_does_not_stop_the_engine() -> None:
    engine = await started()

    def broken(events: list) -> None:  # type: ignore[type-arg]
        raise RuntimeError("sink down")

    engine.set_kv_event_sink(broken)
    deltas = await collect(engine, req("a", max_tokens=4))
    assert deltas[-1].finish_reason == "length"
    await engine.stop()


async def test_idle_engine_does_not_step() -> None:
    engine = await started()
    await collect(engine, req("a", max_tokens=3))
    steps = engine.core.num_steps
    await asyncio.sleep(0.05)
    assert engine.core.num_steps == steps and engine._task is not None and not engine._task.done()
    await engine.stop()


async def test_invalid_requests_raise() -> None:
    engine = await started()
    with pytest.raises(ValueError, match="whole cache"):
        await collect(engine, req("big", max_tokens=5000, prompt=list(range(10, 200))))
    stream = engine.generate(req("dup", max_tokens=1000))
    await anext(stream)
    with pytest.raises(ValueError, match="already"):
        await collect(engine, req("dup"))
    await stream.aclose()
    await engine.stop()


async def test_step_loop_crash_ends_streams_with_error() -> None:
    class Broken:
        def step_seconds(self, *a, **kw):  # type: ignore[no-untyped-def]
            raise ZeroDivisionError("model exploded")

    engine = await started(timing=Broken())
    deltas = await collect(engine, req("a"))
    assert deltas[-1].finish_reason == "error" and "model exploded" in (deltas[-1].error or "")
    await engine.stop()


async def test_steps_take_the_modeled_time() -> None:
    engine = await started(timing=ConstantTiming(0.004))
    t0 = time.perf_counter()
    await collect(engine, req("a", max_tokens=10))  # 10 steps
    elapsed = time.perf_counter() - t0
    assert elapsed >= 10 * 0.004 - 0.002
    await engine.stop()


async def test_absolute_deadlines_keep_tiny_steps_on_pace() -> None:
    # 1000 steps of 50 us: a relative sleep rounds each to a 1 ms timer tick (>= 1 s total).
    engine = await started(timing=ConstantTiming(50e-6))
    t0 = time.perf_counter()
    await collect(engine, req("a", max_tokens=1000, prompt=[5, 6, 7]))
    elapsed = time.perf_counter() - t0
    assert 0.05 - 0.002 <= elapsed < 0.6
    await engine.stop()


async def test_many_engines_share_one_loop() -> None:
    engines = [await started(MockerConfig(speedup_ratio=1000.0)) for _ in range(200)]
    results = await asyncio.gather(*(collect(e, req(f"r{i}", max_tokens=4)) for i, e in enumerate(engines)))
    assert all(r[-1].finish_reason == "length" for r in results)
    steps = [e.core.num_steps for e in engines]
    await asyncio.sleep(0.02)
    assert [e.core.num_steps for e in engines] == steps
    await asyncio.gather(*(e.stop() for e in engines))
