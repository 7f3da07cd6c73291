"""A rank that dies takes the engine down cleanly: its streams end with "abort" (a frontend
continues them elsewhere), later requests too, ``on_fatal`` runs once, nothing hangs; a split the
model cannot take fails before any spawn. (A rank whose rank 0 is gone: test_tp_engine.py.)"""
from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from turbine.engine.builtin_core import BuiltinConfig, BuiltinCore
from turbine.engine.builtin_engine import BuiltinEngine
from turbine.engine.parallel import RankFailure
from turbine.protocols.generate import GenerateRequest, SamplingOptions, StopConditions

pytestmark = pytest.mark.timeout(90)

CONFIG = {"device": "cpu", "block_size": 4, "num_gpu_blocks": 128, "tensor_parallel_size": 2}


def _req(rid: str, max_tokens: int) -> GenerateRequest:
    return GenerateRequest(request_id=rid, token_ids=list(range(5, 25)), sampling=SamplingOptions(temperature=0.0),
                           stop=StopConditions(max_tokens=max_tokens, ignore_eos=True))


async def test_killed_rank_aborts_streams_and_ends_the_engine(tp_models: dict[str, Path]) -> None:
    core = await asyncio.to_thread(BuiltinCore.load, tp_models["llama"], BuiltinConfig(**CONFIG))
    eng = BuiltinEngine.from_core(core)
    fatal: list[BaseException] = []
    eng.on_fatal = fatal.append
    await eng.start()
    rank1 = core.executor.ranks[0].proc  # type: ignore[union-attr]
    try:
        deltas = []
        t0 = time.monotonic()
        async for d in eng.generate(_req("a", 400)):
            deltas.append(d)
            if len(deltas) == 3:
                os.kill(rank1.pid, signal.SIGKILL)
        assert time.monotonic() - t0 < 30
        assert 3 <= len(deltas) < 400
        assert deltas[-1].finish_reason == "abort" and not deltas[-1].error  # "abort": the frontend migrates it
        assert len(fatal) == 1 and isinstance(fatal[0], RankFailure) and "rank 1" in str(fatal[0]), fatal
        late = [d async for d in eng.generate(_req("b", 4))]
        assert [d.finish_reason for d in late] == ["abort"]
    finally:
        await asyncio.wait_for(eng.stop(), 30)
    assert rank1.exitcode == -signal.SIGKILL


def test_impossible_splits_fail_before_any_spawn(tp_models: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="num_attention_heads"):
        BuiltinCore.load(tp_models["llama"], BuiltinConfig(device="cpu", tensor_parallel_size=8))
    with pytest.raises(ValueError, match="KV tiers"):
        BuiltinConfig(tensor_parallel_size=2, host_kv_gb=1.0)
