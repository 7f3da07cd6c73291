"""Scheduler: batching limits, chunked prefill, prefix hits, preemption, abort, stop rules."""
from __future__ import annotations

from collections.abc import Iterable

import pytest

from turbine.engine.block_manager import KVBlockManager
from turbine.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from turbine.engine.sequence import Sequence, SequenceStatus
from turbine.protocols.generate import StopConditions

EOS = 2


def make(num_blocks: int = 64, block_size: int = 4, **cfg: object) -> Scheduler:
    cfg.setdefault("eos_token_ids", (EOS,))
    return Scheduler(SchedulerConfig(**cfg), KVBlockManager(num_blocks, block_size))  # type: ignore[arg-type]


def new_seq(rid: str, prompt: Iterable[int], max_tokens: int = 4, **stop: object) -> Sequence:
    return Sequence(rid, list(prompt), stop=StopConditions(max_tokens=max_tokens, **stop))  # type: ignore[arg-type]


def fake_token(seq: Sequence) -> int:
    """Deterministic per (request, position); never EOS (2) unless a test scripts it."""
    return 10 + (sum(map(ord, seq.request_id)) * 31 + seq.num_output_tokens * 7) % 50


def step(s: Scheduler, sampler=fake_token) -> tuple[SchedulerOutput, list]:  # type: ignore[no-untyped-def]
    out = s.schedule()
    sampled = {e.seq.request_id: sampler(e.seq) for e in out.scheduled if e.produces_token}
    results = s.postprocess(out, sampled)
    s.block_manager.check_integrity()
    return out, results


def run_all(s: Scheduler, sampler=fake_token, max_steps: int = 10_000) -> dict[str, Sequence]:  # type: ignore[no-untyped-def]
    done: dict[str, Sequence] = {}
    for _ in range(max_steps):
        if not s.has_work():
            return done
        _, results = step(s, sampler)
        for r in results:
            if r.finish_reason is not None:
                done[r.seq.request_id] = r.seq
    raise AssertionError("scheduler did not drain")


def test_max_num_seqs_and_token_budget_hold_every_step() -> None:
    s = make(max_num_seqs=3, max_num_batched_tokens=16)
    for i in range(8):
        s.add(new_seq(f"r{i}", range(20, 30 + i), max_tokens=5))
    steps = 0
    while s.has_work():
        out, _ = step(s)
        steps += 1
        assert len(out.scheduled) <= 3 and s.num_running <= 3
        assert sum(e.num_new_tokens for e in out.scheduled) <= 16
        assert out.num_batched_tokens == sum(e.num_new_tokens for e in out.scheduled)
    assert s.block_manager.num_active_blocks == 0
    assert steps > 8  # three seats for eight requests: they took turns


def test_fcfs_admission() -> None:
    s = make(max_num_seqs=1)
    for i in range(3):
        s.add(new_seq(f"r{i}", [5, 6, 7], max_tokens=2))
    order = []
    while s.has_work():
        out, _ = step(s)
        order += [e.seq.request_id for e in out.scheduled if e.is_prefill]
    assert order == ["r0", "r1", "r2"]


def test_chunked_prefill_splits_long_prompts_and_samples_only_at_the_end() -> None:
    s = make(max_num_batched_tokens=32)
    s.add(new_seq("long", range(10, 110), max_tokens=3))
    chunks = []
    for _ in range(4):
        out, results = step(s)
        (entry,) = out.scheduled
        chunks.append(entry.num_new_tokens)
        (res,) = results
        if entry.num_new_tokens != 4:
            assert not entry.produces_token and res.token_id is None
    assert chunks == [32, 32, 32, 4]
    assert results[0].token_id is not None and s.get("long").num_output_tokens == 1
    out, _ = step(s)
    assert out.num_decode_seqs == 1 and out.num_prefill_tokens == 0


def test_decodes_are_served_before_new_prefills() -> None:
    s = make(max_num_batched_tokens=10)
    s.add(new_seq("a", range(10, 18), max_tokens=5))
    step(s)
    s.add(new_seq("b", range(30, 60), max_tokens=5))
    out, _ = step(s)
    assert [(e.seq.request_id, e.num_new_tokens, e.is_prefill) for e in out.scheduled] == [
        ("a", 1, False),
        ("b", 9, True),
    ]
    assert out.num_prefill_tokens == 9 and out.num_decode_seqs == 1


def test_long_prefill_token_threshold_caps_each_chunk() -> None:
    s = make(max_num_batched_tokens=64, long_prefill_token_threshold=10)
    s.add(new_seq("a", range(10, 35)))
    s.add(new_seq("b", range(40, 45)))
    out, _ = step(s)
    assert [e.num_new_tokens for e in out.scheduled] == [10, 5]


def test_without_chunked_prefill_a_prompt_waits_for_a_step_it_fits() -> None:
    s = make(max_num_batched_tokens=16, enable_chunked_prefill=False)
    s.add(new_seq("a", range(10, 22)))
    s.add(new_seq("b", range(30, 42)))
    out, _ = step(s)
    assert [e.num_new_tokens for e in out.scheduled] == [12]
    out, _ = step(s)
    assert [(e.seq.request_id, e.num_new_tokens) for e in out.scheduled] == [("a", 1), ("b", 12)]
    with pytest.raises(ValueError, match="chunked prefill is off"):
        s.add(new_seq("c", range(17)))


def test_prefix_hit_reports_full_blocks_minus_the_last_token() -> None:
    s = make(block_size=4)
    s.add(new_seq("a", range(10, 20)))  # 10 tokens: 2 full blocks
    run_all(s)
    s.add(new_seq("b", range(10, 20)))
    out, _ = step(s)
    assert s.get("b").num_cached_tokens == 8 and out.scheduled[0].num_new_tokens == 2
    s.add(new_seq("c", range(10, 18)))  # exactly 2 blocks, all cached: recompute the last one
    out, _ = step(s)
    (entry,) = [e for e in out.scheduled if e.seq.request_id == "c"]
    assert entry.seq.num_cached_tokens == 4 and entry.num_new_tokens == 4
    s.add(new_seq("d", range(50, 60)))
    step(s)
    assert s.get("d").num_cached_tokens == 0


def test_preemption_under_block_pressure_gives_identical_outputs() -> None:
    def workload(s: Scheduler) -> None:
        for i in range(6):
            s.add(new_seq(f"r{i}", [1 + i] * 3 + list(range(20, 30)), max_tokens=24))

    roomy = make(num_blocks=256)
    workload(roomy)
    expected = {rid: q.output_token_ids for rid, q in run_all(roomy).items()}
    assert roomy.num_preemptions == 0

    tight = make(num_blocks=24)  # 6 requests x 37 tokens need ~60 blocks at the end
    workload(tight)
    got = run_all(tight)
    assert tight.num_preemptions > 0
    assert {rid: q.output_token_ids for rid, q in got.items()} == expected
    assert all(q.finish_reason == "length" for q in got.values())
    assert tight.block_manager.num_active_blocks == 0


def test_preemption_is_lifo_and_requeues_at_the_front() -> None:
    s = make(num_blocks=6, block_size=2, max_num_batched_tokens=64)
    for rid in ("old", "mid", "new"):
        s.add(new_seq(rid, [7, 8, 9], max_tokens=8))
    s.add(new_seq("later", [3, 4, 5], max_tokens=2))
    outs = [step(s)[0] for _ in range(3)]
    # Step 3: "old" needs a third block, none is free: the newest running one goes.
    assert [q.request_id for q in outs[2].preempted] == ["new"]
    assert [e.seq.request_id for e in outs[2].scheduled] == ["old", "mid"]
    assert [q.request_id for q in s.waiting] == ["new", "later"]
    preempted = ["new"]
    victim = s.get(preempted[0])
    assert victim.status is SequenceStatus.WAITING and victim.num_computed_tokens == 0
    assert victim.block_table == [] and victim.num_preemptions == 1


def test_resumed_sequence_reuses_its_cached_prefix() -> None:
    s = make(num_blocks=12, block_size=2, max_num_seqs=4)
    for i in range(3):
        s.add(new_seq(f"r{i}", [40 + i] * 6, max_tokens=10))
    resumed = []
    while s.has_work():
        out, _ = step(s)
        resumed += [e for e in out.scheduled if e.seq.num_preemptions and e.is_prefill]
    assert resumed and any(e.num_new_tokens < e.seq.num_prompt_tokens for e in resumed)


def test_abort_frees_blocks_in_any_state() -> None:
    s = make(max_num_seqs=1)
    s.add(new_seq("run", range(10, 30), max_tokens=50))
    s.add(new_seq("wait", range(10, 30), max_tokens=50))
    step(s)
    step(s)
    assert s.block_manager.num_active_blocks > 0
    assert s.abort("wait") and s.abort("run")
    assert not s.abort("run") and not s.abort("unknown")
    assert s.block_manager.num_active_blocks == 0 and not s.has_work()
    s.block_manager.check_integrity()


def test_abort_between_schedule_and_postprocess() -> None:
    s = make()
    s.add(new_seq("a", range(10, 20)))
    s.add(new_seq("b", range(30, 40)))
    out = s.schedule()
    assert s.abort("a")
    results = s.postprocess(out, {e.seq.request_id: 11 for e in out.scheduled})
    assert [r.seq.request_id for r in results] == ["b"]
    assert s.get("a") is None and s.num_running == 1
    s.block_manager.check_integrity()


def scripted(tokens: list[int]):  # type: ignore[no-untyped-def]
    return lambda seq: tokens[seq.num_output_tokens]


def finish(s: Scheduler, seq: Sequence, tokens: list[int]) -> Sequence:
    s.add(seq)
    run_all(s, scripted(tokens))
    return seq


def test_eos_stops_and_is_kept() -> None:
    q = finish(make(), new_seq("a", [5, 6], max_tokens=10), [11, 12, EOS, 13])
    assert q.output_token_ids == [11, 12, EOS] and q.finish_reason == "stop"


def test_eos_is_ignored_before_min_tokens_and_with_ignore_eos() -> None:
    q = finish(make(), new_seq("a", [5, 6], max_tokens=10, min_tokens=3), [EOS, EOS, EOS, 9])
    assert q.output_token_ids == [EOS, EOS, EOS] and q.finish_reason == "stop"
    q = finish(make(), new_seq("b", [5, 6], max_tokens=3, ignore_eos=True), [EOS] * 3)
    assert q.num_output_tokens == 3 and q.finish_reason == "length"


def test_stop_token_ids_respect_min_tokens_and_ignore_eos() -> None:
    kw = {"stop_token_ids": (77,), "ignore_eos": True, "min_tokens": 2}
    q = finish(make(), new_seq("a", [5, 6], max_tokens=10, **kw), [77, 77, 8])
    assert q.output_token_ids == [77, 77] and q.finish_reason == "stop"


def test_max_tokens_and_context_length_end_with_length() -> None:
    q = finish(make(), new_seq("a", [5, 6], max_tokens=4), [9] * 10)
    assert q.num_output_tokens == 4 and q.finish_reason == "length"
    q = finish(make(max_model_len=8), new_seq("b", range(10, 16), max_tokens=10), [9] * 10)
    assert q.num_tokens == 8 and q.finish_reason == "length"


def test_finished_sequences_free_their_blocks() -> None:
    s = make()
    for i in range(5):
        s.add(new_seq(f"r{i}", range(10 + i, 30 + i), max_tokens=3))
    run_all(s)
    bm = s.block_manager
    assert bm.num_active_blocks == 0 and bm.num_cached_blocks > 0


@pytest.mark.parametrize(
    ("seq", "cfg", "match"),
    [
        (new_seq("a", range(300), max_tokens=1), {}, "more than the whole cache"),
        (new_seq("a", range(10), max_tokens=250), {}, "more than the whole cache"),
        (new_seq("a", range(10), max_tokens=0), {}, "max_tokens"),
        (new_seq("a", range(10), max_tokens=2, min_tokens=3), {}, "min_tokens"),
        (new_seq("a", range(10), max_tokens=2), {"max_model_len": 10}, "context length"),
    ],
)
def test_add_rejects_requests_that_can_never_run(seq: Sequence, cfg: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(**cfg).add(seq)


def test_add_accepts_a_request_that_fills_the_cache_exactly() -> None:
    s = make(num_blocks=4, block_size=4)
    s.add(new_seq("a", range(10, 20), max_tokens=7))  # 10 + 7 - 1 = 16 slots = 4 blocks
    assert run_all(s)["a"].num_output_tokens == 7
    with pytest.raises(ValueError, match="already scheduled"):
        s.add(new_seq("b", [1]))
        s.add(new_seq("b", [1]))
