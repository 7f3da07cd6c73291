"""BuiltinEngine: the MockEngine stream contract over a real forward run on a dedicated thread."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

torch = pytest.importorskip("torch")

from runner_toys import dense_greedy, greedy

from turbine.engine.builtin_engine import BuiltinEngine
from turbine.protocols.generate import GenerateDelta, GenerateRequest
from turbine.protocols.kv_events import BlockStored

pytestmark = pytest.mark.timeout(60)

PROMPT = list(range(10, 30))  # 20 tokens: five blocks of 4


@pytest.fixture
async def engine(make_core):  # type: ignore[no-untyped-def]
    eng = BuiltinEngine.from_core(make_core(num_gpu_blocks=64))
    await eng.start()
    yield eng
    await eng.stop()


async def collect(engine: BuiltinEngine, request: GenerateRequest) -> list[GenerateDelta]:
    return [d async for d in engine.generate(request)]


async def test_stream_contract_and_prefix_hit_usage(engine, toy_model) -> None:  # type: ignore[no-untyped-def]
    assert (engine.block_size, engine.num_kv_blocks, engine.max_num_seqs, engine.context_length) == (4, 64, 256, 1024)
    deltas = await collect(engine, greedy("a", PROMPT, 6))
    assert [len(d.token_ids) for d in deltas] == [1] * 6
    assert [d.finish_reason for d in deltas] == [None] * 5 + ["length"]
    assert (deltas[-1].prompt_tokens, deltas[-1].cached_tokens, deltas[-1].completion_tokens) == (20, 0, 6)
    assert (deltas[0].prompt_tokens, deltas[0].cached_tokens) == (20, 0) and deltas[1].prompt_tokens is None
    tokens = [d.token_ids[0] for d in deltas]
    assert tokens == dense_greedy(toy_model, PROMPT, 6)
    again = await collect(engine, greedy("b", PROMPT, 6))
    assert [d.token_ids[0] for d in again] == tokens
    assert again[0].cached_tokens == 16 and again[-1].cached_tokens == 16
    assert engine.stats()[:4] == (0, 64, 0, 0)


async def test_concurrent_streams_match_their_solo_runs(engine, toy_model) -> None:  # type: ignore[no-untyped-def]
    prompts = {f"r{i}": [(7 * i + j) % 300 + 2 for j in range(3 + 5 * i)] for i in range(5)}
    results = await asyncio.gather(*(collect(engine, greedy(rid, p, 8)) for rid, p in prompts.items()))
    for (rid, p), deltas in zip(prompts.items(), results, strict=True):
        assert [d.token_ids[0] for d in deltas] == dense_greedy(toy_model, p, 8), rid


async def test_forward_runs_off_the_event_loop(engine) -> None:  # type: ignore[no-untyped-def]
    names: list[str] = []
    model = engine.core.model
    original = model.forward

    def spy(*args):  # type: ignore[no-untyped-def]
        names.append(threading.current_thread().name)
        return original(*args)

    model.forward = spy
    try:
        await collect(engine, greedy("a", PROMPT, 3))
    finally:
        del model.forward
    assert names and set(names) == {"turbine-engine-steps"}


async def test_closing_or_cancelling_a_stream_aborts_and_frees_blocks(engine) -> None:  # type: ignore[no-untyped-def]
    stream = engine.generate(greedy("a", PROMPT, 200))
    await anext(stream)
    await anext(stream)
    assert engine.stats().kv_active_blocks > 0
    await stream.aclose()
    assert engine.stats()[:4] == (0, 64, 0, 0)

    got_one = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(greedy("b", PROMPT, 200)):
            got_one.set()

    task = asyncio.create_task(consume())
    await got_one.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.stats()[:4] == (0, 64, 0, 0)
    engine.core.block_manager.check_integrity()


async def test_kv_events_reach_the_sink_before_the_tokens(engine) -> None:  # type: ignore[no-untyped-def]
    seen: list[str] = []
    hashes: list[int] = []

    def sink(events):  # type: ignore[no-untyped-def]
        seen.append("events")
        for ev in events:
            assert isinstance(ev, BlockStored)
            hashes.extend(ev.block_hashes)

    engine.set_kv_event_sink(sink)
    async for d in engine.generate(greedy("a", PROMPT, 3)):
        seen.append("token")
    assert seen[0] == "events"  # the prompt's five full blocks are stored by the first step
    assert hashes == [h for ev in engine.kv_snapshot() for h in ev.block_hashes]


async def test_refusals_and_stop(make_core) -> None:  # type: ignore[no-untyped-def]
    eng = BuiltinEngine.from_core(make_core(num_gpu_blocks=8))
    with pytest.raises(RuntimeError, match="start"):
        await anext(eng.generate(greedy("a", PROMPT, 2)))
    await eng.start()
    with pytest.raises(ValueError, match="KV blocks"):
        await anext(eng.generate(greedy("big", PROMPT, 100)))
    stream = eng.generate(greedy("a", PROMPT, 12))
    await anext(stream)
    with pytest.raises(ValueError, match="already streaming"):
        await anext(eng.generate(greedy("a", PROMPT, 2)))
    await eng.stop()
    rest = [d async for d in stream]
    assert rest[-1].finish_reason == "abort" and rest[-1].prompt_tokens == 20
    assert eng.stats()[:4] == (0, 8, 0, 0)


async def test_a_crashing_step_ends_streams_with_an_error(make_core) -> None:  # type: ignore[no-untyped-def]
    eng = BuiltinEngine.from_core(make_core())

    def boom(*args):  # type: ignore[no-untyped-def]
        raise RuntimeError("device lost")

    eng.core.model.forward = boom
    try:
        await eng.start()
        deltas = await collect(eng, greedy("a", PROMPT, 4))
    finally:
        del eng.core.model.forward
    assert deltas[-1].finish_reason == "error" and "device lost" in (deltas[-1].error or "")
    await eng.stop()


async def test_a_step_that_never_ends_does_not_hang_stop(make_core, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    from turbine.engine import builtin_engine

    monkeypatch.setattr(builtin_engine, "_STOP_WAIT_S", 0.6)
    eng = BuiltinEngine.from_core(make_core())
    stuck, release = threading.Event(), threading.Event()

    def hang(*args):  # type: ignore[no-untyped-def]
        stuck.set()
        release.wait(30)
        raise RuntimeError("released")

    eng.core.model.forward = hang
    try:
        await eng.start()
        stream = eng.generate(greedy("a", PROMPT, 4))
        first = asyncio.ensure_future(anext(stream))
        assert await asyncio.to_thread(stuck.wait, 10)
        t0 = time.monotonic()
        with caplog.at_level("WARNING", logger="turbine.engine.builtin_engine"):
            await eng.stop()
        assert time.monotonic() - t0 < 5
        assert (await asyncio.wait_for(first, 5)).finish_reason == "abort"  # the client is not left waiting
        assert "step thread did not stop" in caplog.text and "in hang" in caplog.text  # where it sits, logged
    finally:
        release.set()
        del eng.core.model.forward


async def test_engine_from_a_model_directory(real_tiny_dir) -> None:  # type: ignore[no-untyped-def]
    eng = BuiltinEngine(real_tiny_dir, device="cpu", block_size=8, num_gpu_blocks=64, max_num_seqs=4,
                        max_num_batched_tokens=64, context_length=256)
    assert (eng.block_size, eng.num_kv_blocks, eng.max_num_seqs, eng.context_length) == (8, 64, 4, 256)
    await eng.start()
    try:
        deltas = await collect(eng, greedy("a", PROMPT, 5, ignore_eos=True))
    finally:
        await eng.stop()
    assert sum(len(d.token_ids) for d in deltas) == 5 and deltas[-1].finish_reason == "length"


def test_gpu_check_script_runs_on_cpu(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """bench/gpu_check.py is run by hand on a GPU; its CPU path keeps it from rotting."""
    pytest.importorskip("transformers")
    import json

    from testkit import load_bench

    mod = load_bench("gpu_check")
    rc = mod.main(["--preset", "tiny", "--device", "cpu", "--dir", str(tmp_path / "m"), "--out", str(tmp_path),
                   "--prompts", "2", "--prompt-len", "16", "--requests", "3", "--input-len", "20",
                   "--output-len", "6"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0 and report["ok"] and report["logits"]["rel_err_max"] <= 1e-4
    assert report["serving"]["output_tokens"] == 18 and report["serving"]["greedy_prefix_match_vs_dense"] == "6/6"
    assert "| 3 | 20 | 6 |" in (tmp_path / "gpu_check.md").read_text()


async def test_the_step_thread_launches_after_the_loop_handed_out_the_last_tokens(make_core) -> None:  # type: ignore[no-untyped-def]
    """Launching a step while the event loop delivers the previous one's tokens makes both fight
    for the GIL; the step thread waits (at most settle_wait_s) until the consumers have run."""
    core = make_core(num_gpu_blocks=64)
    eng = BuiltinEngine.from_core(core)
    eng.settle_wait_s = 5.0  # long: a missing hand-off would show as a 5 s stall and a failed check
    seen: list[int] = []  # tokens the consumer has processed
    returned: list[int] = []  # tokens the core had returned when each step() began
    behind: list[int] = []
    inner = core.step

    def step():  # type: ignore[no-untyped-def]
        behind.append(sum(returned) - len(seen))
        res = inner()
        returned.append(sum(1 for o in res.outputs if o.token_id is not None))
        return res

    core.step = step  # type: ignore[method-assign]
    await eng.start()
    try:
        t0 = asyncio.get_running_loop().time()
        async for d in eng.generate(greedy("a", PROMPT, 12)):
            time.sleep(0.003)  # a slow consumer: without the wait the next step would start meanwhile
            seen.extend(d.token_ids)
        assert asyncio.get_running_loop().time() - t0 < 4.0
    finally:
        await eng.stop()
    assert len(seen) == 12 and len(behind) >= 12
    assert behind == [0] * len(behind)  # every step began after the consumer had its tokens
