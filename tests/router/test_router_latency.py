"""The predicted policy: its latency model by hand, its selector against the model, its choices."""
from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turbine.mocker.timing import PolynomialTiming
from turbine.protocols.model_card import WorkerTiming
from turbine.router.latency_model import LatencyModel, WorkerState
from turbine.router.latency_selector import predictions, select_by_latency
from turbine.router.load_tracker import LoadEstimate
from turbine.router.router import Router
from turbine.router.selector import select_worker

BS = 64


def poly_ms(tokens: int) -> float:
    """Dynamo's prefill polynomial (turbine/mocker/timing.py), milliseconds."""
    return 16.50142 + 1.518344e-2 * tokens + 4.209989e-7 * tokens * tokens


def decode_ms(usage: float) -> float:
    return max(1.0, 5.74 + 54.01 * usage - 25.74 * usage * usage)


def model(total_blocks: int = 1000, budget: int = 1024, speedup: float = 1.0) -> LatencyModel:
    return LatencyModel(PolynomialTiming(speedup), BS, total_blocks, budget)


def state(m: LatencyModel, queued: int = 0, decoding: int = 0, kv_blocks: int = 0) -> WorkerState:
    s = WorkerState(queued=queued, decoding=decoding, kv_blocks=kv_blocks)
    m.refresh(s)
    return s


def test_ttft_by_hand_chunks_the_queue_and_adds_the_decode_part() -> None:
    m = model(total_blocks=1000, budget=1024)
    # idle worker, 200 new tokens: one prefill-only step of 4 blocks (256 tokens: block-rounded)
    p = m.predict(state(m), 200)
    assert p.ttft_s == pytest.approx(poly_ms(256) / 1e3) and p.itl_s == 0.0
    # 1000 tokens queued ahead, 2 sequences decoding over 100 blocks: chunks of 1022 tokens
    s = state(m, queued=1000, decoding=2, kv_blocks=100)
    d = decode_ms(0.1)
    p = m.predict(s, 1100)  # 2100 tokens of work: two full chunks and 56 tokens
    full = poly_ms(1024) + d  # a full chunk rounds up to 16 blocks, capped at the budget
    assert p.ttft_s == pytest.approx((2 * full + poly_ms(64) + d) / 1e3)
    # the running requests' steps grow by a full chunk (and one more decoder) while it prefills
    assert p.itl_s == pytest.approx((poly_ms(1024) + d) / 1e3)
    # speedup divides every time
    fast = model(total_blocks=1000, budget=1024, speedup=4.0)
    assert fast.predict(state(fast, 1000, 2, 100), 1100).ttft_s == pytest.approx(p.ttft_s / 4)


@settings(max_examples=200, deadline=None)
@given(queued=st.integers(0, 20_000), decoding=st.integers(0, 300), kv=st.integers(0, 2000),
       prompt=st.integers(1, 30_000), overlap=st.integers(0, 500), budget=st.sampled_from([512, 2048, 8192]))
def test_selector_costs_agree_with_the_model(queued: int, decoding: int, kv: int, prompt: int, overlap: int,
                                             budget: int) -> None:
    """The selector inlines the model's arithmetic; with work_weight 0 and one candidate its
    prediction is the model's, and the chosen worker's reported TTFT is always the model's."""
    m = model(total_blocks=1000, budget=budget)
    s = state(m, queued, decoding, kv)
    ov = min(overlap, prompt // BS)
    sel = select_by_latency(["w"], {"w": ov}, {"w": s}, {"w": m}, prompt, rng=random.Random(0), work_weight=0.0)
    want = m.predict(s, prompt - ov * BS)
    assert (sel.ttft_s, sel.itl_s) == (want.ttft_s, want.itl_s)
    assert predictions(["w"], {"w": ov}, {"w": s}, {"w": m}, prompt) == [(want.ttft_s, want.itl_s)]


def test_a_prefix_hit_wins_when_it_saves_more_than_the_holders_queue_costs() -> None:
    m = model(total_blocks=10_000, budget=8192)
    models = {"a": m, "b": m}
    rng = random.Random(0)
    prompt = 8000
    # b holds 120 of the prompt's 125 blocks but is decoding 8 requests: still far faster
    states = {"a": state(m), "b": state(m, decoding=8, kv_blocks=800)}
    assert select_by_latency(["a", "b"], {"b": 120}, states, models, prompt, rng=rng).worker_id == "b"
    # b also has 30k prompt tokens queued: waiting for them costs more than computing 8000 tokens
    states["b"] = state(m, queued=30_000, decoding=8, kv_blocks=800)
    assert select_by_latency(["a", "b"], {"b": 120}, states, models, prompt, rng=rng).worker_id == "a"


def test_decode_batches_weigh_milliseconds_not_blocks() -> None:
    """A worker holding a long prefix but decoding many sequences still wins the request: its
    decode part adds a few ms a step, while the kv cost counts each of its KV blocks like a
    prompt block to compute (Dynamo's default)."""
    m = model(total_blocks=16384, budget=8192)
    states = {"a": state(m), "b": state(m, decoding=40, kv_blocks=4000)}
    sel = select_by_latency(["a", "b"], {"b": 60}, states, {"a": m, "b": m}, 64 * 64, rng=random.Random(0))
    assert sel.worker_id == "b"
    loads = {"a": LoadEstimate(), "b": LoadEstimate(decode_blocks=4000)}
    kv = select_worker(["a", "b"], {"b": 60}, loads, 64, block_size=BS, rng=random.Random(0))
    assert kv.worker_id == "a"  # 64 blocks to compute vs 4 + 4000 blocks of decode load


def test_itl_guard_keeps_a_long_prefill_off_decoding_workers() -> None:
    m = model(total_blocks=16384, budget=8192)
    models = {"a": m, "b": m}
    states = {"a": state(m, decoding=4, kv_blocks=200), "b": state(m, queued=2000)}
    rng = random.Random(0)
    prompt = 6000
    free = select_by_latency(["a", "b"], {}, states, models, prompt, rng=rng)
    assert free.worker_id == "a" and free.guarded  # no guard: a is faster (b has a queue)
    guarded = select_by_latency(["a", "b"], {}, states, models, prompt, rng=rng, max_itl_s=0.05)
    assert guarded.worker_id == "b" and guarded.guarded and guarded.itl_s == 0.0
    # nobody passes (both decode): the fastest takes it, and says the guard was overridden
    states["b"] = state(m, queued=2000, decoding=1, kv_blocks=10)
    over = select_by_latency(["a", "b"], {}, states, models, prompt, rng=rng, max_itl_s=0.05)
    assert over.worker_id == "a" and not over.guarded and over.itl_s > 0.05


def test_a_worker_without_room_for_the_prompt_is_avoided() -> None:
    m = model(total_blocks=100, budget=8192)
    states = {"a": state(m, decoding=3, kv_blocks=95), "b": state(m, queued=3000)}
    sel = select_by_latency(["a", "b"], {"a": 10}, states, {"a": m, "b": m}, 64 * 12, rng=random.Random(0))
    assert sel.worker_id == "b"


def test_heterogeneous_workers_each_use_their_own_timing() -> None:
    r = Router("predicted", block_size=BS, seed=1)
    r.worker_added("slow", 16384, WorkerTiming(max_num_batched_tokens=8192, speedup_ratio=1.0))
    r.worker_added("fast", 16384, WorkerTiming(max_num_batched_tokens=8192, speedup_ratio=3.0))
    for i in range(20):
        d = r.route(f"r{i}", ["slow", "fast"], list(range(1000 + i)))
        assert d is not None and d.worker_id == "fast" and d.predicted_ttft_s is not None
        r.finished(f"r{i}")
    # a queue on the fast worker three times the slow one's cost sends work to the slow one
    r.loads.routed("big", "fast", 40_000)
    assert r.predict("slow", 4000)[0] == pytest.approx(poly_ms(4032) / 1e3)
    d = r.route("x", ["slow", "fast"], list(range(4000)))
    assert d is not None and d.worker_id == "slow"
    assert r.predict("slow", 4000)[0] == pytest.approx(poly_ms(8000) / 1e3)  # now behind x


def test_a_bad_profile_in_a_card_is_refused() -> None:
    r = Router("predicted", block_size=BS)
    with pytest.raises(ValueError):
        r.latency_model(1000, WorkerTiming(max_num_batched_tokens=8192, profile={"prefill": {}}))
    with pytest.raises(ValueError):
        Router("predicted", max_itl_s=0)
    with pytest.raises(ValueError):
        Router("predicted", max_queued=-1)
    assert Router("predicted").max_itl_s == math.inf
