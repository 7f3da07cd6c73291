"""TP=2 (two gloo ranks: this process and one spawned) against TP=1 on the same checkpoint, for
the Llama, Qwen2 (q/k/v bias, one KV head for two ranks) and Qwen3 (q/k norms) shapes.

One scenario per model exercises chunked prefill (a 12-token budget under longer prompts),
preemption (the KV cache holds two of the four requests), a prefix hit (a prompt repeated after
its request finished) and async scheduling (decodes whose input tokens are still on the device:
rank 0 broadcasts them). Every step's logits must agree within float32 rounding (the ranks'
all-reduces sum in another order) and every greedy token must be identical.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tp_models import SHAPES

from turbine.engine.builtin_core import BuiltinConfig, BuiltinCore
from turbine.protocols.generate import GenerateRequest, SamplingOptions, StopConditions

CONFIG = {"device": "cpu", "block_size": 4, "num_gpu_blocks": 14, "max_num_seqs": 4, "max_num_batched_tokens": 12}
TOL = 1e-4


class _Recorder:
    """Wraps the runner's sampler: keeps every step's (full-vocabulary) logits."""

    def __init__(self, sampler: Any) -> None:
        self.sampler, self.logits = sampler, []

    def __call__(self, logits: torch.Tensor, batch: Any) -> torch.Tensor:
        self.logits.append(logits.clone())
        return self.sampler(logits, batch)


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (14, 20, 17, 23)]


def _scenario(core: BuiltinCore) -> dict[str, Any]:
    rec = core.runner.sampler = _Recorder(core.runner.sampler)
    prompts = _prompts(core.vocab_size)
    tokens: dict[str, list[int]] = {}
    cached: dict[str, int] = {}
    preempted = chunked = 0

    def run() -> None:
        nonlocal preempted, chunked
        while core.has_work():
            res = core.step()
            preempted += res.num_preempted
            chunked += res.num_prefill_tokens == CONFIG["max_num_batched_tokens"]
            for o in res.outputs:
                if o.token_id is not None:
                    tokens.setdefault(o.request_id, []).append(o.token_id)
                if o.finish_reason is not None:
                    cached[o.request_id] = o.cached_tokens

    def req(rid: str, prompt: list[int]) -> GenerateRequest:
        return GenerateRequest(request_id=rid, token_ids=prompt, sampling=SamplingOptions(temperature=0.0),
                               stop=StopConditions(max_tokens=6, ignore_eos=True))

    for i, p in enumerate(prompts):
        core.add_request(req(f"r{i}", p))
    run()
    core.add_request(req("again", prompts[1] + [5, 6, 7]))  # r1's prompt is cached now
    run()
    return {"tokens": tokens, "cached": cached, "preempted": preempted, "chunked": chunked, "logits": rec.logits}


# The Qwen2 run ends as if rank 0 had died (its end of rank 1's pipe closes): rank 1 must exit
# by itself, non-zero. The others end with an orderly close.
ORPHANED = "qwen2"


@pytest.fixture(scope="module", params=sorted(SHAPES))
def pair(request: pytest.FixtureRequest, tp_models: dict[str, Path]):  # type: ignore[no-untyped-def]
    path = tp_models[request.param]
    one = _scenario(BuiltinCore.load(path, BuiltinConfig(**CONFIG)))
    core = BuiltinCore.load(path, BuiltinConfig(**CONFIG, tensor_parallel_size=2))
    assert core.executor is not None
    rank1 = core.executor.ranks[0]
    try:
        two = _scenario(core)
        if request.param == ORPHANED:
            rank1.conn.close()
            rank1.proc.join(30)
    finally:
        core.close()
    two["exitcode"] = rank1.proc.exitcode
    return one, two


def test_greedy_tokens_identical(pair) -> None:  # type: ignore[no-untyped-def]
    one, two = pair
    assert set(one["tokens"]) == {"r0", "r1", "r2", "r3", "again"}
    assert all(len(t) == 6 for t in one["tokens"].values())
    assert two["tokens"] == one["tokens"]


def test_logits_within_tolerance(pair) -> None:  # type: ignore[no-untyped-def]
    one, two = pair
    assert len(two["logits"]) == len(one["logits"]) > 8
    for a, b in zip(one["logits"], two["logits"], strict=True):
        assert a.shape == b.shape and a.shape[1] == b.shape[1]  # the whole vocabulary, padding dropped
        assert a.std() > 0.1
        assert (a - b).abs().max().item() < TOL


def test_prefix_hit_preemption_and_chunked_prefill_under_tp(pair) -> None:  # type: ignore[no-untyped-def]
    one, two = pair
    assert two["preempted"] > 0 and two["preempted"] == one["preempted"]
    assert two["chunked"] > 0
    assert two["cached"]["again"] > 0 and two["cached"] == one["cached"]


def test_ranks_exit_zero_on_close_and_non_zero_when_rank_0_is_gone(pair, request) -> None:  # type: ignore[no-untyped-def]
    _, two = pair
    orphaned = request.node.callspec.params["pair"] == ORPHANED
    assert two["exitcode"] == (1 if orphaned else 0)
