"""Disaggregation under faults: bad or stale transfer parameters, and a prefill worker SIGKILLed
mid-transfer under load. The client always gets a normal response; no KV block stays held or
referenced on the workers that survive."""
from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
from pathlib import Path

import msgspec
import pytest

from testkit import MAX_TOKENS, Load, assert_clean, free_port, metric_values, spawn, wait_workers
from turbine.protocols.generate import GenerateDelta, GenerateRequest, StopConditions
from turbine.protocols.kv_transfer import KvTransferParams, KvTransferRequest

_enc = msgspec.msgpack.Encoder().encode
_dec = msgspec.msgpack.Decoder(GenerateDelta).decode
def prompt(k: int) -> list[int]:
    return list(range(1000 * k, 1000 * k + 64 * 6 + 10))  # 6 full blocks of 64 and a partial one


def _run(s, coro):  # type: ignore[no-untyped-def]
    return asyncio.run_coroutine_threadsafe(coro, s.loop).result(timeout=30)


async def _generate(client, address: str, req: GenerateRequest) -> list[GenerateDelta]:  # type: ignore[no-untyped-def]
    return [_dec(raw) async for raw in client.stream(address, "generate", _enc(req), timeout=20)]


def test_bad_and_stale_transfer_parameters(model_dir: Path, server_factory) -> None:  # type: ignore[no-untyped-def]
    from turbine.runtime.inproc import InProcClient

    with server_factory(model_dir, workers=0, prefill_workers=1, decode_workers=1, speedup=100.0) as s:
        prefill, decode = sorted(s.dep.workers, key=lambda w: w.card.role != "prefill")
        client = InProcClient()

        def hold(rid: str, k: int) -> KvTransferParams:
            req = GenerateRequest(request_id=rid, token_ids=prompt(k), stop=StopConditions(max_tokens=1),
                                  kv_transfer=KvTransferRequest(hold_s=30))
            deltas = _run(s, _generate(client, prefill.address, req))
            params = deltas[-1].kv_transfer
            assert params is not None and len(params.block_ids) == 7  # 6 full and a partial
            return params

        def decode_with(rid: str, k: int, params: KvTransferParams) -> list[GenerateDelta]:
            req = GenerateRequest(request_id=rid, token_ids=prompt(k) + [5], stop=StopConditions(max_tokens=4),
                                  kv_transfer=KvTransferRequest(source=params))
            return _run(s, _generate(client, decode.address, req))

        # Another prompt's blocks: refused with a clear error before anything is allocated.
        params = hold("p1", 1)
        forged = msgspec.structs.replace(params, block_hashes=[h + 1 for h in params.block_hashes])
        (d,) = decode_with("d1", 1, forged)
        assert d.finish_reason == "error" and "block hashes differ" in d.error
        # Blocks the prefill never offered: the pull fails, the decode worker prefills itself.
        params2 = hold("p2", 2)
        out = decode_with("d2", 2, msgspec.structs.replace(params2, block_ids=[b + 1000 for b in params2.block_ids]))
        assert out[-1].finish_reason == "length" and sum(len(x.token_ids) for x in out) == 4
        # A transfer already released (stale): same.
        s.call(lambda: prefill.engine.release_kv("p1"))
        out = decode_with("d3", 1, params)
        assert out[-1].finish_reason == "length" and sum(len(x.token_ids) for x in out) == 4
        # Nothing leaked on either side, and both keep serving.
        deadline = time.monotonic() + 5
        while s.call(lambda: prefill.engine.core.scheduler.held) and time.monotonic() < deadline:
            time.sleep(0.05)  # the decode worker's release of p2 is in flight
        for w in (prefill, decode):
            st = s.call(w.engine.stats)
            assert st.kv_active_blocks == 0 and st.num_running == 0, (w.card.role, st)
        assert s.call(lambda: decode.engine.core.scheduler.num_pull_failures) == 2
        _run(s, client.close())


def test_prefill_worker_sigkilled_mid_transfer_under_load(tmp_path: Path, model_dir: Path, procs) -> None:  # type: ignore[no-untyped-def]
    disc = tmp_path / "disc"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spawn(procs, "frontend", "--discovery-dir", str(disc), "--port", str(port), "--stall-timeout", "2",
          "--disagg-min-prefill-tokens", "0")
    common = ["--engine", "mock", "--model", str(model_dir), "--model-name", "tiny", "--discovery-dir", str(disc),
              "--speedup-ratio", "4", "--transfer-bandwidth", "2"]  # a pull of a few blocks takes ~0.1 s
    prefill = [spawn(procs, "worker", *common, "--role", "prefill") for _ in range(2)]
    spawn(procs, "worker", *common, "--role", "decode")
    wait_workers(url, 3, timeout=60)
    with Load(url, concurrency=6, prompt_words=300) as load:
        load.wait_ok(10)
        os.kill(prefill[0].pid, signal.SIGKILL)
        prefill[0].wait()
        load.wait_ok(15)
        stats = load.stop()
    assert_clean(stats, 25)
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    assert metric_values(text, 'turbine_disagg_decisions_total{decision="remote"}')[0] >= 20
    assert metric_values(text, "turbine_disagg_pulled_blocks_total")[0] > 0
    deadline = time.monotonic() + 5
    while (active := sum(metric_values(text, "turbine_worker_kv_active_blocks"))) and time.monotonic() < deadline:
        time.sleep(0.2)
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            text = r.read().decode()
    assert active == 0, text  # the survivors hold nothing: pulls ended, holds released
    assert MAX_TOKENS > 0
