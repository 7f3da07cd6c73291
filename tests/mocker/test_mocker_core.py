"""MockerCore: the synchronous step, synthetic tokens, usage, KV events, timing inputs."""
from __future__ import annotations

import json

import msgspec
import pytest

from turbine.mocker.core import MockerConfig, MockerCore
from turbine.protocols.generate import GenerateRequest, SamplingOptions, StopConditions
from turbine.protocols.kv_events import BlockStored

SMALL = MockerConfig(block_size=4, num_gpu_blocks=64, max_num_batched_tokens=64, context_length=256)


def req(rid: str, prompt: list[int], max_tokens: int = 6, **sampling: object) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid,
        token_ids=prompt,
        stop=StopConditions(max_tokens=max_tokens),
        sampling=SamplingOptions(**sampling),  # type: ignore[arg-type]
    )


def drain(core: MockerCore) -> dict[str, list]:  # type: ignore[type-arg]
    """request id -> its outputs, stepping until idle."""
    outs: dict[str, list] = {}  # type: ignore[type-arg]
    while core.has_work():
        for o in core.step().outputs:
            outs.setdefault(o.request_id, []).append(o)
    return outs


def tokens(outs: list) -> list[int]:  # type: ignore[type-arg]
    return [o.token_id for o in outs if o.token_id is not None]


def test_runs_to_max_tokens_with_usage_on_the_last_output() -> None:
    core = MockerCore(SMALL, vocab_size=100)
    core.add_request(req("a", list(range(10, 20)), max_tokens=5))
    outs = drain(core)["a"]
    assert len(tokens(outs)) == 5 and [o.finish_reason for o in outs][-1] == "length"
    last = outs[-1]
    assert (last.prompt_tokens, last.cached_tokens, last.completion_tokens) == (10, 0, 5)
    assert core.stats().kv_active_blocks == 0 and core.stats().num_running == 0


def test_greedy_is_deterministic_and_independent_of_seed() -> None:
    runs = []
    for seed in (None, 1, 2):
        core = MockerCore(SMALL, vocab_size=1000, rng_seed=seed)
        core.add_request(req("a", [5, 6, 7], temperature=0.0, seed=seed))
        runs.append(tokens(drain(core)["a"]))
    assert runs[0] == runs[1] == runs[2]
    core = MockerCore(SMALL, vocab_size=1000)
    core.add_request(req("b", [5, 6, 8], temperature=0.0))
    assert tokens(drain(core)["b"]) != runs[0]  # the prompt matters


def test_seeded_sampling_depends_on_seed_not_on_the_engine() -> None:
    def run(seed: int, rng_seed: int) -> list[int]:
        core = MockerCore(SMALL, vocab_size=1000, rng_seed=rng_seed)
        core.add_request(req("a", [5, 6, 7], max_tokens=12, temperature=0.8, seed=seed))
        return tokens(drain(core)["a"])

    assert run(7, 1) == run(7, 2)
    assert run(7, 1) != run(8, 1)


def test_unseeded_sampling_is_random() -> None:
    core = MockerCore(SMALL, vocab_size=10**6)
    core.add_request(req("a", [5, 6, 7], max_tokens=12))
    core.add_request(req("b", [5, 6, 7], max_tokens=12))
    outs = drain(core)
    assert tokens(outs["a"]) != tokens(outs["b"])


def test_never_samples_special_or_eos_ids() -> None:
    special = tuple(range(0, 6)) + (8, 9)
    core = MockerCore(SMALL, vocab_size=12, special_token_ids=special, eos_token_ids=(11,))
    for i in range(8):
        core.add_request(req(f"r{i}", [6, 7, 10], max_tokens=30, seed=i))
    seen = {t for outs in drain(core).values() for t in tokens(outs)}
    assert seen == {6, 7, 10}
    with pytest.raises(ValueError, match="special"):
        MockerCore(SMALL, vocab_size=3, special_token_ids=(0, 1, 2))


def test_stop_token_ids_end_a_stream() -> None:
    core = MockerCore(SMALL, vocab_size=4, special_token_ids=(0, 1))
    core.add_request(
        GenerateRequest(
            request_id="a",
            token_ids=[2, 3],
            stop=StopConditions(max_tokens=200, stop_token_ids=(3,)),
        )
    )
    outs = drain(core)["a"]
    assert outs[-1].finish_reason == "stop" and tokens(outs)[-1] == 3 and len(tokens(outs)) < 200


def test_prefix_cache_hit_is_reported_and_kv_events_emitted() -> None:
    core = MockerCore(SMALL, vocab_size=1000)
    prompt = list(range(100, 118))  # 4 full blocks + 2
    core.add_request(req("a", prompt))
    events = []
    while core.has_work():
        events += core.step().kv_events
    assert events and all(isinstance(e, BlockStored) for e in events)
    core.add_request(req("b", prompt))
    last = drain(core)["b"][-1]
    assert last.cached_tokens == 16 and last.prompt_tokens == 18
    assert {h for e in core.kv_snapshot() for h in e.block_hashes} >= {
        h for e in events for h in e.block_hashes
    }


def test_abort_frees_blocks_at_once() -> None:
    core = MockerCore(SMALL, vocab_size=1000)
    core.add_request(req("a", list(range(30)), max_tokens=50))
    core.step()
    assert core.stats().kv_active_blocks > 0
    assert core.abort("a") and not core.abort("a")
    assert core.stats().kv_active_blocks == 0 and not core.has_work()


def test_step_duration_follows_the_timing_model() -> None:
    calls = []

    class Recorder:
        def step_seconds(self, num_prefill_tokens, num_decode_seqs, kv_usage, **kw):  # type: ignore[no-untyped-def]
            calls.append((num_prefill_tokens, num_decode_seqs, kv_usage, kw))
            return 0.25

    core = MockerCore(SMALL, vocab_size=1000, timing=Recorder())
    core.add_request(req("a", list(range(10, 20)), max_tokens=3))
    first = core.step()
    assert first.duration_s == 0.25 and first.num_prefill_tokens == 10
    core.step()
    assert calls[0][:2] == (10, 0) and calls[1][:2] == (0, 1)
    assert calls[1][2] == pytest.approx(3 / 64)  # 11 tokens -> 3 blocks of 4
    assert calls[1][3]["mean_decode_context"] == 11
    assert core.step().duration_s == 0.25 and not core.has_work()
    assert core.step().duration_s == 0.0  # idle: nothing scheduled, no time


def test_default_timing_is_the_polynomial_sped_up() -> None:
    core = MockerCore(MockerConfig(speedup_ratio=10.0), vocab_size=1000)
    core.add_request(req("a", list(range(1000)), max_tokens=2))
    assert core.step().duration_s == pytest.approx(32.1058589e-3 / 10)


def test_rejects_bad_requests() -> None:
    core = MockerCore(SMALL, vocab_size=100)
    with pytest.raises(ValueError, match="token ids"):
        core.add_request(req("a", [5, 100]))
    small_cache = MockerCore(MockerConfig(block_size=4, num_gpu_blocks=8), vocab_size=100)
    with pytest.raises(ValueError, match="whole cache"):
        small_cache.add_request(req("b", list(range(10)), max_tokens=30))
    with pytest.raises(ValueError, match="context length"):
        core.add_request(req("c", [1] * 256))
    with pytest.raises(ValueError):
        MockerConfig(speedup_ratio=0)


@pytest.mark.parametrize("vocab", [1, 2, 100, 4096, 4097, 128_256, 2**32, 2**32 + 5])
def test_token_id_range_is_checked_exactly(vocab: int) -> None:
    """The check packs the ids and tests them as 32-bit lanes of one big int: every edge."""
    import random
    from array import array

    rng = random.Random(vocab)
    for _ in range(60):
        ids = [rng.choice((0, vocab - 1, vocab, vocab + 1, rng.randrange(0, 2 * vocab + 2), rng.randrange(vocab),
                           -1, 2**32 - 1, 2**32)) for _ in range(rng.randrange(1, 40))]
        valid = min(ids) >= 0 and max(ids) < vocab
        core = MockerCore(MockerConfig(context_length=1000, num_gpu_blocks=64), vocab_size=vocab)
        if valid:
            core.add_request(req("a", ids))
        else:
            with pytest.raises(ValueError, match="token ids"):
                core.add_request(req("a", ids))
        ok = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        core.add_request(req("b", ok), prompt_u32=array("I", ok) if max(ok) < 2**32 else None)


def test_preemption_keeps_greedy_outputs_identical() -> None:
    def run(num_blocks: int) -> tuple[dict[str, list[int]], int]:
        cfg = MockerConfig(block_size=4, num_gpu_blocks=num_blocks, max_num_batched_tokens=64)
        core = MockerCore(cfg, vocab_size=5000)
        for i in range(6):
            core.add_request(req(f"r{i}", [i + 1] * 12, max_tokens=30, temperature=0.0))
        outs = drain(core)
        core.block_manager.check_integrity()
        return {rid: tokens(o) for rid, o in outs.items()}, core.scheduler.num_preemptions

    roomy, p0 = run(512)
    tight, p1 = run(30)
    assert p0 == 0 and p1 > 0 and tight == roomy


def test_public_surface() -> None:
    import turbine.mocker

    assert sorted(turbine.mocker.__all__) == [
        "MockEngine", "MockerConfig", "MockerCore", "PolynomialTiming", "ProfileTiming",
        "StepOutput", "StepResult", "TimingModel",
    ]
    assert all(hasattr(turbine.mocker, name) for name in turbine.mocker.__all__)


# -- async scheduling: one step scheduled ahead, as the built-in engine and vLLM run ------------------
ASYNC = MockerConfig(block_size=4, num_gpu_blocks=64, max_num_batched_tokens=64, context_length=256,
                     async_scheduling=True)


class Fixed:
    """Every step lasts ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def step_seconds(self, num_prefill_tokens, num_decode_seqs, kv_usage, **kw):  # type: ignore[no-untyped-def]
        return self.seconds


def first_token_time(config: MockerConfig, arrive_after_steps: int) -> float:
    """Virtual time of request b's first token when it arrives just after ``a``'s step k starts."""
    core = MockerCore(config, vocab_size=1000, timing=Fixed(0.01))
    core.add_request(req("a", list(range(10, 20)), max_tokens=40))
    t = 0.0
    for k in range(arrive_after_steps + 12):
        if k == arrive_after_steps:
            core.add_request(req("b", list(range(30, 38)), max_tokens=2))
        res = core.step()
        t += res.duration_s
        if any(o.request_id == "b" and o.token_id is not None for o in res.outputs):
            return round(t, 6)
    raise AssertionError("b never produced a token")


def test_async_scheduling_delays_a_new_request_by_one_step() -> None:
    # b arrives at 0.03 s, just before the call that starts the step running over [0.03, 0.04]:
    # step by step, that call schedules b into it; scheduling ahead, that step was fixed at 0.02 s
    # (when the previous one started), so b joins the next one and its token comes a step later.
    assert first_token_time(SMALL, 3) == 0.04
    assert first_token_time(ASYNC, 3) == 0.05


def test_async_scheduling_yields_the_same_tokens_and_frees_everything() -> None:
    def run(config: MockerConfig, num_blocks: int) -> dict[str, list[int]]:
        cfg = msgspec.structs.replace(config, num_gpu_blocks=num_blocks)
        core = MockerCore(cfg, vocab_size=5000)
        for i in range(6):
            core.add_request(req(f"r{i}", [i + 1] * 12, max_tokens=30, temperature=0.0))
        core.add_request(req("stop", [9] * 10, max_tokens=30, temperature=0.0))
        outs = drain(core)
        core.block_manager.check_integrity()
        assert core.stats().kv_active_blocks == 0 and not core.in_flight
        assert all(o[-1].finish_reason == "length" and len(tokens(o)) == 30 for o in outs.values())
        return {rid: tokens(o) for rid, o in outs.items()}

    sync = run(SMALL, 512)
    assert run(ASYNC, 512) == sync
    assert run(ASYNC, 30) == sync  # with preemptions


def test_async_scheduling_abort_of_an_in_flight_request() -> None:
    core = MockerCore(ASYNC, vocab_size=1000)
    core.add_request(req("a", list(range(30)), max_tokens=50))
    core.step()
    assert core.in_flight and core.abort("a")
    assert core.stats().kv_active_blocks == 0
    res = core.step()  # the launched step completes; its aborted sequence yields nothing
    assert res.outputs == [] and not core.in_flight and not core.has_work()


def test_async_scheduling_follows_the_profile(tmp_path) -> None:  # type: ignore[no-untyped-def]
    profile = {"meta": {"async_scheduling": True},
               "prefill": {"new_tokens": [16, 1024], "ms": [10.0, 20.0]},
               "decode": {"batch_size": [1, 64], "ms": [5.0, 8.0]}}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    assert MockerCore(MockerConfig(profile=str(path)), vocab_size=100).pipelined
    assert not MockerCore(MockerConfig(profile=str(path), async_scheduling=False), vocab_size=100).pipelined
    profile["meta"] = {}
    path.write_text(json.dumps(profile))
    assert not MockerCore(MockerConfig(profile=str(path)), vocab_size=100).pipelined
    assert not MockerCore(MockerConfig(), vocab_size=100).pipelined  # Dynamo's polynomial: step by step


def test_callers_block_hashes_and_token_array_change_nothing() -> None:
    """A caller (the simulator) may hand over the prompt as a u32 array with its block hashes."""
    from array import array

    from turbine.protocols.block_hashing import block_hashes

    prompts = [[(i * 7 + j) % 90 + 5 for j in range(n)] for i, n in enumerate((9, 17, 4, 33, 17))]
    prompts[4] = prompts[1][:12] + [3, 3, 3, 3, 3]  # a prefix hit
    runs = []
    for given in (False, True):
        core = MockerCore(SMALL, vocab_size=100, rng_seed=1)
        outs, events = {}, []
        for i, p in enumerate(prompts):
            if given:
                core.add_request(req(f"r{i}", array("I", p)), prompt_u32=array("I", p),  # type: ignore[arg-type]
                                 block_hashes=block_hashes(p, SMALL.block_size).sequence)
            else:
                core.add_request(req(f"r{i}", p))
            while i >= 3 and core.has_work():  # the last one arrives after r1 is cached
                res = core.step()
                events += res.kv_events
                for o in res.outputs:
                    outs.setdefault(o.request_id, []).append(o)
        core.block_manager.check_integrity()
        runs.append((outs, [(type(e).__name__, e.block_hashes, list(getattr(e, "token_ids", []))) for e in events]))
    assert runs[0] == runs[1]
    assert any(o.cached_tokens for outs in runs[1][0].values() for o in outs)
