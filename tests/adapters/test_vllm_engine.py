"""A real vLLM engine (vllm-cpu) behind Turbine's Engine interface, alone and in a mixed fleet.

One module-wide deployment on a background loop: a frontend with kv routing, a worker wrapping
vLLM's AsyncLLM and a worker running Turbine's built-in engine, both on the same tiny checkpoint
with 32-token blocks (the CPU attention backend needs multiples of 32).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm]')")
pytest.importorskip("torch", reason="the built-in engine needs torch")
for _k, _v in (("VLLM_CPU_KVCACHE_SPACE", "1"), ("VLLM_ENABLE_V1_MULTIPROCESSING", "0"),
               ("VLLM_NO_USAGE_STATS", "1"), ("DO_NOT_TRACK", "1")):
    os.environ.setdefault(_k, _v)

import openai  # noqa: E402

pytestmark = pytest.mark.timeout(300)  # the module's first test also starts vLLM

from turbine.protocols.generate import GenerateDelta, GenerateRequest, SamplingOptions, StopConditions  # noqa: E402

BS = 32
VLLM_ARGS = ["--block-size", str(BS), "--enforce-eager", "--distributed-executor-backend", "uni",
             "--dtype", "float32", "--max-num-seqs", "8", "--max-model-len", "1024", "--seed", "0"]


def prompt(i: int, n: int) -> list[int]:
    return [(37 * i + 11 * j) % 4000 + 20 for j in range(n)]


class Fleet:
    """Frontend + vLLM worker + built-in worker on one event loop thread."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.workers: list[Any] = []

    def run(self, coro, timeout: float = 120):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn):  # type: ignore[no-untyped-def]
        """Run a plain function on the loop thread (to read router or engine state safely)."""
        async def run():  # type: ignore[no-untyped-def]
            return fn()
        return self.run(run(), timeout=30)

    def __enter__(self) -> Fleet:
        from turbine.adapters.vllm_engine import VllmEngine
        from turbine.engine.builtin_engine import BuiltinEngine
        from turbine.frontend.service import Frontend, FrontendConfig, RouterConfig
        from turbine.runtime.discovery import MemoryDiscovery, MemoryStore
        from turbine.runtime.events import InProcEventBus
        from turbine.runtime.inproc import InProcClient

        self.thread.start()
        self.vllm = VllmEngine.create(self.model_dir, VLLM_ARGS, metrics_port=0)
        self.builtin = BuiltinEngine(self.model_dir, device="cpu", dtype="float32", block_size=BS,
                                     num_gpu_blocks=512, max_num_seqs=8)
        self.store, self.bus = MemoryStore(), InProcEventBus()
        self.frontend = Frontend(FrontendConfig(port=0, router=RouterConfig(policy="kv")),
                                 discovery=MemoryDiscovery(self.store), client=InProcClient(),
                                 subscriber=self.bus.subscriber())
        self.run(self.frontend.start())
        self.vllm_worker = self.add_worker(self.vllm, self.vllm.model_card("tiny", self.model_dir))
        self.builtin_worker = self.add_worker(self.builtin, self._card(self.builtin, "builtin"))
        self.run(asyncio.wait_for(self.frontend.registry.ready.wait(), 30))
        return self

    def _card(self, engine: Any, kind: str):  # type: ignore[no-untyped-def]
        from turbine.protocols.model_card import ModelCard

        return ModelCard(model_name="tiny", tokenizer_source=str(self.model_dir), block_size=engine.block_size,
                         total_kv_blocks=engine.num_kv_blocks, max_num_seqs=engine.max_num_seqs,
                         context_length=engine.context_length, engine=kind)

    def add_worker(self, engine: Any, card: Any):  # type: ignore[no-untyped-def]
        from turbine.runtime.discovery import MemoryDiscovery
        from turbine.runtime.inproc import InProcServer
        from turbine.worker.worker import Worker

        w = Worker(engine, card, discovery=MemoryDiscovery(self.store), server=InProcServer(),
                   publisher=self.bus.publisher())
        self.run(w.start())
        self.workers.append(w)
        return w

    @property
    def router(self):  # type: ignore[no-untyped-def]
        return self.frontend.registry.models["tiny"].router

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.frontend.url + "/v1", api_key="x", max_retries=0, timeout=60)

    def __exit__(self, *exc: object) -> None:
        for w in self.workers:
            self.run(w.stop(), timeout=60)
        self.run(self.frontend.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def fleet(model_dir: Path) -> Iterator[Fleet]:
    with Fleet(model_dir) as f:  # the session's tiny model, with weights
        yield f


def greedy(rid: str, tokens: list[int], max_tokens: int) -> GenerateRequest:
    return GenerateRequest(request_id=rid, token_ids=tokens, sampling=SamplingOptions(temperature=0.0),
                           stop=StopConditions(max_tokens=max_tokens, ignore_eos=True))


async def collect(engine: Any, req: GenerateRequest) -> list[GenerateDelta]:
    return [d async for d in engine.generate(req)]


# --- the engine alone ------------------------------------------------------------------------------
def test_model_card_is_read_from_the_running_engine(fleet: Fleet) -> None:
    cfg = fleet.vllm.llm.vllm_config
    card = fleet.vllm_worker.card
    assert (card.engine, card.block_size, card.max_num_seqs, card.context_length) == ("vllm", BS, 8, 1024)
    assert card.total_kv_blocks == cfg.cache_config.num_gpu_blocks > 0
    assert card.tokenizer_source == str(fleet.model_dir)


def test_token_deltas_with_usage_and_prefix_hits(fleet: Fleet) -> None:
    tokens = prompt(1, 100)
    first = fleet.run(collect(fleet.vllm, greedy("u1", tokens, 5)))
    assert (first[0].prompt_tokens, first[0].cached_tokens) == (100, 0)
    assert all(d.token_ids for d in first[:-1]) and sum(len(d.token_ids) for d in first) == 5
    end = first[-1]
    assert (end.finish_reason, end.prompt_tokens, end.completion_tokens) == ("length", 100, 5)
    again = fleet.run(collect(fleet.vllm, greedy("u2", tokens, 5)))
    assert again[0].cached_tokens == (100 - 1) // BS * BS  # vLLM recomputes the last prompt token
    assert [t for d in again for t in d.token_ids] == [t for d in first for t in d.token_ids]


@pytest.mark.parametrize("how", ["aclose", "cancel"])
def test_closing_the_stream_aborts_the_vllm_request(fleet: Fleet, how: str) -> None:
    async def scenario() -> int:
        stream = fleet.vllm.generate(greedy(f"c-{how}", prompt(2, 40), 900))
        if how == "aclose":
            async for _ in stream:
                break
            await stream.aclose()  # type: ignore[attr-defined]
        else:
            got = asyncio.Event()

            async def consume() -> None:
                async for _ in stream:
                    got.set()
            task = asyncio.get_running_loop().create_task(consume())
            await got.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return fleet.vllm.llm.get_num_unfinished_requests()

    assert fleet.run(scenario()) == 0
    assert fleet.vllm.stats().num_running == 0
    done = fleet.run(collect(fleet.vllm, greedy(f"after-{how}", prompt(3, 40), 3)))  # still serving
    assert done[-1].finish_reason == "length"


def test_requests_vllm_refuses_raise_value_error(fleet: Fleet) -> None:
    with pytest.raises(ValueError, match="maximum context length"):
        fleet.run(collect(fleet.vllm, greedy("long", prompt(4, 1100), 2)))
    lora = GenerateRequest(request_id="lora", token_ids=[1, 2], lora_name="x", stop=StopConditions(max_tokens=1))
    with pytest.raises(ValueError, match="LoRA"):
        fleet.run(collect(fleet.vllm, lora))
    assert fleet.vllm.llm.get_num_unfinished_requests() == 0


def test_vllm_metrics_and_health_pass_through(fleet: Fleet) -> None:
    fleet.run(collect(fleet.vllm, greedy("m1", prompt(5, 40), 2)))
    with urllib.request.urlopen(fleet.vllm.metrics_url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("vllm:")}
    assert {"vllm:num_requests_running", "vllm:prompt_tokens_total", "vllm:kv_cache_usage_perc"} <= names
    with urllib.request.urlopen(fleet.vllm.metrics_url + "/health", timeout=5) as r:
        assert r.status == 200 and json.loads(r.read())["status"] == "healthy"


def test_greedy_output_matches_turbines_builtin_engine(fleet: Fleet) -> None:
    for i, n in ((6, 9), (7, 64), (8, 150)):
        v = fleet.run(collect(fleet.vllm, greedy(f"pv{i}", prompt(i, n), 24)))
        b = fleet.run(collect(fleet.builtin, greedy(f"pb{i}", prompt(i, n), 24)))
        assert [t for d in v for t in d.token_ids] == [t for d in b for t in d.token_ids], (i, n)


# --- in a fleet ----------------------------------------------------------------------------------
def test_mixed_fleet_routes_repeats_to_the_holder_and_predicts_vllms_hit(fleet: Fleet) -> None:
    c = fleet.client()
    both = {fleet.vllm_worker.worker_id, fleet.builtin_worker.worker_id}

    def holders(ps: list[list[int]]) -> set[str]:
        return fleet.call(lambda: {wid for p in ps for wid in fleet.router.index.find_matches_for_tokens(p)})

    # Distinct prompts, one at a time: idle equal workers split ties at random, so send until both
    # hold some (6 at least; all on one worker after 16 has odds of 2^-15)
    prompts: list[list[int]] = []
    first = []
    while len(prompts) < 6 or (holders(prompts) != both and len(prompts) < 16):
        i = len(prompts)
        prompts.append(prompt(20 + i, 300 + 7 * i))
        first.append(c.completions.create(model="tiny", prompt=prompts[-1], max_tokens=4, temperature=0))
        time.sleep(0.05)  # its KV events reach the router
    deadline = time.monotonic() + 15  # every prompt's KV events have reached the router (an applier thread)
    while time.monotonic() < deadline and not fleet.call(
            lambda: all(fleet.router.index.find_matches_for_tokens(p) for p in prompts)):
        time.sleep(0.05)
    stats0 = fleet.call(fleet.router.stats.snapshot)
    again = [c.completions.create(model="tiny", prompt=p, max_tokens=4, temperature=0) for p in prompts]
    for p, a, b in zip(prompts, first, again):
        assert b.usage.prompt_tokens_details.cached_tokens == (len(p) - 1) // BS * BS
        assert b.choices[0].text == a.choices[0].text  # either engine, same greedy text
    stats = fleet.call(fleet.router.stats.snapshot)
    assert stats["overlap_abs_error_blocks"] == stats0["overlap_abs_error_blocks"]  # predicted == actual
    assert stats["events_rejected"] == 0
    assert holders(prompts) == both  # both got work


def test_vllm_snapshot_rebuilds_the_routers_view(fleet: Fleet) -> None:
    from turbine.router.router import Router

    wid = fleet.vllm_worker.worker_id
    # vLLM surely holds this one (the fleet test's prompts may all have gone to the other worker)
    own = prompt(90, 200)
    fleet.run(collect(fleet.vllm, greedy("snapshot", own, 2)))
    prompts = [own] + [prompt(20 + i, 300 + 7 * i) for i in range(16)]

    def held() -> list[int]:
        return fleet.call(lambda: [fleet.router.index.find_matches_for_tokens(p).get(wid, 0) for p in prompts])

    deadline = time.monotonic() + 15  # its KV events reach the router's index (an applier thread)
    while time.monotonic() < deadline and not held()[0]:
        time.sleep(0.05)
    snap = fleet.call(fleet.vllm.kv_snapshot)
    assert snap and all(ev.block_size == BS for ev in snap)
    rebuilt = Router("kv", block_size=BS)
    rebuilt.reset_worker(wid, snap)
    live = held()
    assert live[0] == len(own) // BS  # every full block of the prompt
    assert [rebuilt.index.find_matches_for_tokens(p).get(wid, 0) for p in prompts] == live


def test_a_worker_with_another_block_size_is_reported_at_registration(fleet: Fleet, caplog) -> None:  # type: ignore[no-untyped-def]
    from turbine.mocker.engine import MockEngine, MockerConfig

    caplog.set_level(logging.WARNING, logger="turbine.frontend")
    mock = MockEngine(MockerConfig(block_size=64, speedup_ratio=100.0), vocab_size=4096)
    w = fleet.add_worker(mock, fleet._card(mock, "mock"))
    try:
        fleet.run(asyncio.sleep(0.3))
        assert any("block size 64, others use 32" in r.getMessage() for r in caplog.records)
    finally:
        fleet.run(w.stop())
        fleet.workers.remove(w)


def test_stop_ends_open_streams_with_abort(fleet: Fleet) -> None:
    """Last: stopping the engine (a worker shutting down) ends every stream with "abort",
    which tells the frontend to continue the request on another worker."""
    async def scenario() -> list[GenerateDelta]:
        stream = fleet.vllm.generate(greedy("stopping", prompt(60, 64), 900))
        got = [await stream.__anext__()]  # type: ignore[attr-defined]
        await fleet.vllm.stop()
        return got + [d async for d in stream]

    deltas = fleet.run(scenario())
    assert deltas[-1].finish_reason == "abort" and deltas[-1].completion_tokens == sum(len(d.token_ids) for d in deltas)
    with pytest.raises(RuntimeError, match="not running"):
        fleet.run(collect(fleet.vllm, greedy("late", [1, 2, 3], 1)))
