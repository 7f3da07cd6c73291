"""Discovery records a frontend must survive, and workers it must set aside and retry."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import msgspec
import pytest
from testkit import metric_values

from turbine.frontend.service import Frontend, FrontendConfig, RouterConfig
from turbine.launch import WorkerOptions, start_workers
from turbine.mocker.engine import MockerConfig
from turbine.protocols.model_card import ModelCard
from turbine.runtime.config import DiscoveryUrl, Runtime, RuntimeConfig
from turbine.runtime.discovery import Instance, MemoryDiscovery, MemoryStore, make_discovery
from turbine.runtime.events import InProcEventBus, ZmqEventSubscriber
from turbine.runtime.inproc import InProcClient
from turbine.runtime.tcp import TcpClient


def _card(model_dir: Path, **kw: object) -> dict:
    card = {"model_name": "tiny", "tokenizer_source": str(model_dir), "block_size": 16, "total_kv_blocks": 100,
            "max_num_seqs": 8, "context_length": 4096}
    card.update(kw)
    return card


def _write_record(directory: Path, iid: str, *, address: str, card: dict, event_address: str | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    inst = {"instance_id": iid, "component": "worker", "endpoint": "generate", "address": address,
            "event_address": event_address, "model_card": card, "metadata": {}}
    (directory / f"{iid}.json").write_text(json.dumps({"instance": inst, "pid": 1, "host": "h"}))


async def _generate(fe: Frontend, prompt: str = "hello") -> str:
    from turbine.frontend.generation import ChoiceSpec
    from turbine.protocols.generate import SamplingOptions, StopConditions

    m = fe.registry.get("tiny")
    spec = ChoiceSpec(f"r-{time.monotonic_ns()}", m.tokenizer.encode(prompt), SamplingOptions(),  # type: ignore[union-attr]
                      StopConditions(max_tokens=3, ignore_eos=True), [])
    pieces = [p async for p in fe.generation.stream_choice(m, spec, None)]
    return pieces[-1].finish_reason  # type: ignore[union-attr]


def _workers(fe: Frontend) -> list[str]:
    """Workers of `tiny` once its tokenizer is loaded (requests can be served)."""
    m = fe.registry.models.get("tiny")
    return sorted(m.workers) if m is not None and m.tokenizer is not None else []


async def _wait(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_malformed_file_records_are_skipped_and_discovery_goes_on(tmp_path: Path, model_dir: Path) -> None:
    disc_dir = tmp_path / "disc"
    _write_record(disc_dir, "bad-card", address="tcp://127.0.0.1:1", card=_card(model_dir, block_size=0))
    _write_record(disc_dir, "bad-events", address="tcp://127.0.0.1:1", card=_card(model_dir),
                  event_address="carrier-pigeon://nowhere")
    _write_record(disc_dir, "bad-address", address="tcp://no-port-here", card=_card(model_dir))
    (disc_dir / "garbage.json").write_text("{not json")
    fe = Frontend(FrontendConfig(port=0), discovery=make_discovery("file", disc_dir), client=TcpClient(),
                  subscriber=ZmqEventSubscriber())
    await fe.start()
    workers = []
    try:
        opts = WorkerOptions(model_dir=model_dir, model_name="tiny", mocker=MockerConfig(speedup_ratio=100))
        runtime = Runtime(RuntimeConfig(discovery=DiscoveryUrl(scheme="file", path=str(disc_dir))))  # no token
        workers = await start_workers(opts, 1, make_discovery("file", disc_dir), runtime)
        await _wait(lambda: _workers(fe) == [workers[0].worker_id])
        assert await _generate(fe) == "length"
        text = fe.metrics.render().decode()
        assert metric_values(text, "turbine_frontend_discovery_records_rejected_total") == [4.0]
        # ...and it still notices a worker leaving.
        await workers[0].stop()
        await workers[0].discovery.close()
        await _wait(lambda: not fe.registry.models["tiny"].workers)
    finally:
        for w in workers:
            await w.stop()
        await fe.stop()
        await fe.registry.discovery.close()


async def test_in_process_records_are_checked_too(model_dir: Path) -> None:
    store = MemoryStore()
    fe = Frontend(FrontendConfig(port=0), discovery=MemoryDiscovery(store), client=InProcClient(),
                  subscriber=InProcEventBus().subscriber())
    await fe.start()
    try:
        bad = Instance(instance_id="bad", component="worker", endpoint="generate", address="inproc://x",
                       model_card=ModelCard(**_card(model_dir, block_size=0)))
        worse = Instance(instance_id="worse", component="worker", endpoint="generate", address="inproc://y",
                         event_address="carrier-pigeon://", model_card=ModelCard(**_card(model_dir)))
        disc = MemoryDiscovery(store)
        await disc.register(bad)
        await disc.register(worse)
        await _wait(lambda: fe.registry.rejected_records == 2)
        assert "tiny" not in fe.registry.models
        # a good record after them is served
        good = msgspec.structs.replace(worse, instance_id="good", event_address=None)
        await disc.register(good)
        await _wait(lambda: _workers(fe) == ["good"])
    finally:
        await fe.stop()


async def test_health_says_loading_until_the_tokenizer_is_in(model_dir: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A worker registered before its model's tokenizer loaded: /health says ``loading`` (requests
    would get 503), then ``ok`` once the tokenizer is in; a readiness check waits on that."""
    import threading
    import urllib.error
    import urllib.request

    from turbine.frontend import model_registry

    gate = threading.Event()
    real = model_registry.TurbineTokenizer.from_dir

    def slow(path):  # type: ignore[no-untyped-def]
        gate.wait(10)
        return real(path)

    monkeypatch.setattr(model_registry.TurbineTokenizer, "from_dir", staticmethod(slow))
    store = MemoryStore()
    fe = Frontend(FrontendConfig(port=0), discovery=MemoryDiscovery(store), client=InProcClient(),
                  subscriber=InProcEventBus().subscriber())
    await fe.start()

    def get(path: str, body: bytes | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(fe.url + path, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        assert (await asyncio.to_thread(get, "/health"))[1]["status"] == "no_workers"
        w = Instance(instance_id="w", component="worker", endpoint="generate", address="inproc://w",
                     model_card=ModelCard(**_card(model_dir)))
        await MemoryDiscovery(store).register(w)
        await _wait(lambda: "tiny" in fe.registry.models)
        code, h = await asyncio.to_thread(get, "/health")
        assert (code, h["status"], h["loading"], h["models"]) == (200, "loading", ["tiny"], {"tiny": ["w"]})
        body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 1}).encode()
        code, err = await asyncio.to_thread(get, "/v1/completions", body)
        assert code == 503 and "loading its tokenizer" in err["error"]["message"]
        gate.set()
        await _wait(lambda: _workers(fe) == ["w"])
        code, h = await asyncio.to_thread(get, "/health")
        assert (code, h["status"], h["loading"]) == (200, "ok", [])
    finally:
        gate.set()
        await fe.stop()


async def test_failing_worker_is_set_aside_with_backoff(model_dir: Path) -> None:
    """A worker whose address refuses connections: requests go elsewhere, it is retried later,
    each failure in a row doubling the time it is skipped."""
    from turbine.frontend import model_registry

    runtime = Runtime()  # mem://: one store, one bus
    store, bus = runtime.store, runtime.bus
    assert store is not None and bus is not None
    fe = Frontend(FrontendConfig(port=0, router=RouterConfig(policy="round-robin")), discovery=MemoryDiscovery(store),
                  client=InProcClient(), subscriber=bus.subscriber())
    await fe.start()
    opts = WorkerOptions(model_dir=model_dir, model_name="tiny", mocker=MockerConfig(speedup_ratio=100, block_size=16))
    workers = await start_workers(opts, 1, MemoryDiscovery(store), runtime)
    try:
        await MemoryDiscovery(store).register(Instance(
            instance_id="dead", component="worker", endpoint="generate", address="inproc://nobody-here",
            model_card=ModelCard(**_card(model_dir))))
        await _wait(lambda: len(_workers(fe)) == 2)
        for _ in range(6):
            assert await _generate(fe) == "length"
        until, backoff = fe.registry._suspect["dead"]
        assert backoff == model_registry.SUSPECT_S
        fe.registry._suspect["dead"] = (0.0, backoff)  # its time is up: the next request may try it again
        for _ in range(2):
            assert await _generate(fe) == "length"
        assert fe.registry._suspect["dead"][1] == 2 * model_registry.SUSPECT_S
        assert "dead" in fe.registry.models["tiny"].workers  # set aside, not forgotten
        assert fe.registry.candidates(fe.registry.models["tiny"]) == [workers[0].worker_id]
    finally:
        for w in workers:
            await w.stop()
        await fe.stop()


@pytest.mark.parametrize("given,env,expect", [("flag", "env", "flag"), (None, "env", "env")])
def test_fleet_token_precedence(tmp_path: Path, monkeypatch, given, env, expect) -> None:  # type: ignore[no-untyped-def]
    from turbine.runtime.fleet_token import ENV, fleet_token

    monkeypatch.setenv(ENV, env)
    assert fleet_token(tmp_path, given) == expect


def test_fleet_token_file_is_private_and_shared(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import os
    import stat

    from turbine.runtime.fleet_token import ENV, FILE_NAME, fleet_token

    monkeypatch.delenv(ENV, raising=False)
    a, b = fleet_token(tmp_path / "d"), fleet_token(tmp_path / "d")
    assert a == b and len(a) >= 32
    mode = stat.S_IMODE(os.stat(tmp_path / "d" / FILE_NAME).st_mode)
    assert mode == 0o600
