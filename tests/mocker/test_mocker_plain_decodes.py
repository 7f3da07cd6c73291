"""MockerCore.run_plain_decodes (the simulator's fast path) against step() one step at a time.

Two cores replay the same random workload on a virtual clock: one calls ``step()`` for every
step, the other runs plain decode steps at once whenever it can (up to the next arrival, as the
fleet simulator does). Every token, its step's end time, every finish, every KV event, the
sampler's RNG state and the final KV cache must be identical. The workloads mix random, greedy
and seeded sampling, shared prefixes, tiny caches (preemption), stop tokens, EOS, min_tokens and
context-length limits.
"""
from __future__ import annotations

import random
from typing import Any

import pytest

from turbine.engine.scheduler import Scheduler, SchedulerConfig
from turbine.engine.block_manager import KVBlockManager
from turbine.engine.sequence import Sequence
from turbine.mocker.core import MockerConfig, MockerCore
from turbine.mocker.timing import PolynomialTiming
from turbine.protocols.generate import GenerateRequest, SamplingOptions, StopConditions

VOCAB = 300
EOS = 7


class _ContextTiming:
    """A decode step's time grows with the sequences' mean length (as a measured profile's does)."""

    def step_seconds(self, num_prefill_tokens: int, num_decode_seqs: int, kv_usage: float, *,
                     mean_prefill_context: float = 0.0, mean_decode_context: float = 0.0) -> float:
        return (1e-3 * (num_prefill_tokens > 0) + 1e-4 * num_prefill_tokens + 3e-4 * num_decode_seqs
                + 1e-6 * mean_decode_context + 2e-3 * kv_usage)


def _workload(rng: random.Random, n: int) -> list[tuple[float, GenerateRequest]]:
    prefixes = [[rng.randrange(20, VOCAB) for _ in range(rng.randrange(1, 24))] for _ in range(4)]
    out = []
    t = 0.0
    for i in range(n):
        t += rng.choice((0.0, rng.expovariate(30.0)))
        prompt = rng.choice(prefixes) + [rng.randrange(20, VOCAB) for _ in range(rng.randrange(1, 30))]
        kind = rng.random()
        sampling = (SamplingOptions() if kind < 0.6 else SamplingOptions(temperature=0.0) if kind < 0.8
                    else SamplingOptions(seed=rng.randrange(1000)))
        max_tokens = rng.randrange(1, 90)
        stop = StopConditions(
            max_tokens=max_tokens, min_tokens=rng.choice((0, 0, min(max_tokens, 5))),
            ignore_eos=rng.random() < 0.7,
            stop_token_ids=tuple(rng.sample(range(20, VOCAB), 3)) if rng.random() < 0.15 else ())
        out.append((t, GenerateRequest(request_id=f"r{i}", token_ids=prompt, sampling=sampling, stop=stop)))
    return out


def _replay(core: MockerCore, work: list[tuple[float, GenerateRequest]], fast: bool) -> dict[str, Any]:
    """Drive ``core`` on a virtual clock; every token with its step's end time, every event."""
    tokens: list[tuple[float, str, int | None, str | None]] = []
    events: list[Any] = []
    t, i, runs, run_steps = 0.0, 0, 0, 0
    while i < len(work) or core.has_work():
        while i < len(work) and work[i][0] <= t:
            try:
                core.add_request(work[i][1])
            except ValueError:
                pass
            i += 1
        if not core.has_work():
            if i == len(work):
                break  # the last arrivals never fit
            t = work[i][0]
            continue
        if fast:
            run = core.run_plain_decodes(t, work[i][0] if i < len(work) else float("inf"))
            if run is not None:
                runs += 1
                run_steps += len(run.ends)
                batches = dict(run.events)
                for k, end in enumerate(run.ends):
                    events.extend(batches.get(k, ()))
                    tokens.extend((end, rid, toks[k], None) for rid, toks in zip(run.request_ids, run.tokens))
                t = run.ends[-1]
                continue
        res = core.step()
        events.extend(res.kv_events)
        tokens.extend((t + res.duration_s, o.request_id, o.token_id, o.finish_reason) for o in res.outputs)
        if not res.outputs and not core.in_flight and i < len(work):
            t = max(t, work[i][0])  # nothing fits: wait for an arrival (as the simulator does)
        else:
            t += res.duration_s
    bm = core.block_manager
    state = (core.num_steps, core._random.__self__.getstate(), sorted(bm._hash_to_block.items()),
             list(bm._evictable), list(bm._free), bytes(bm._ref))
    return {"tokens": tokens, "events": events, "state": state, "runs": runs, "run_steps": run_steps}


@pytest.mark.parametrize("seed", range(24))
def test_runs_of_plain_decodes_equal_step_by_step(seed: int) -> None:
    rng = random.Random(seed)
    cfg = MockerConfig(block_size=rng.choice((2, 4, 16)), num_gpu_blocks=rng.choice((24, 64, 400)),
                       max_num_seqs=rng.choice((2, 4, 32)), max_num_batched_tokens=rng.choice((16, 64, 512)),
                       context_length=rng.choice((64, 120, 512)), enable_prefix_caching=rng.random() < 0.8)
    timing = _ContextTiming() if seed % 2 else PolynomialTiming(2.0)
    work = _workload(rng, rng.randrange(5, 40))
    eos = (EOS,) if seed % 3 == 0 else ()
    special = (0, 1, 150) if seed % 4 == 0 else ()
    slow, fast = (_replay(MockerCore(cfg, vocab_size=VOCAB, rng_seed=seed, timing=timing, eos_token_ids=eos,
                                     special_token_ids=special), work, f) for f in (False, True))
    assert fast["tokens"] == slow["tokens"]
    assert fast["events"] == slow["events"]
    assert fast["state"] == slow["state"]
    assert slow["runs"] == 0


def test_runs_cover_the_decodes() -> None:
    """One long decode: one run, through the steps that fill a block or need a new one."""
    core = MockerCore(MockerConfig(block_size=16, num_gpu_blocks=64, context_length=4096), vocab_size=VOCAB)
    core.add_request(GenerateRequest(request_id="a", token_ids=list(range(20, 60)),
                                     stop=StopConditions(max_tokens=100, ignore_eos=True)))
    out = _replay(core, [], fast=True)
    # 40 prompt tokens: a prefill, then decodes at lengths 41..139. The steps that fill a block
    # (48, 64, ...: an event each) or need a new one (49, 65, ...) are in the run, the one that
    # ends the request (139) is not: one run of 98 steps
    assert out["runs"] == 1 and out["run_steps"] == 98 and core.num_steps == 100
    assert len(out["events"]) == 7  # the prefill's two blocks, then blocks 2..7 filled during the run
    assert len([x for x in out["tokens"] if x[2] is not None]) == 100
    assert not core.has_work()


def test_a_run_stops_at_until_and_is_none_when_the_next_step_is_not_plain() -> None:
    core = MockerCore(MockerConfig(block_size=64, num_gpu_blocks=64), vocab_size=VOCAB, timing=PolynomialTiming())
    core.add_request(GenerateRequest(request_id="a", token_ids=list(range(20, 30)),
                                     stop=StopConditions(max_tokens=50, ignore_eos=True)))
    assert core.run_plain_decodes(0.0, 1.0) is None  # the prefill comes first
    first = core.step()
    d = PolynomialTiming().step_seconds(0, 1, core.block_manager.usage)
    run = core.run_plain_decodes(first.duration_s, first.duration_s + 2.5 * d)
    assert run is not None and len(run.ends) == 3  # steps starting at +0, +d, +2d; not +3d
    assert core.get("a").num_output_tokens == 4 and core.num_steps == 4


def test_plain_decode_steps_counts_exactly_until_something_happens() -> None:
    """The scheduler's count: the next ``m`` steps are plain, the one after is not."""
    rng = random.Random(5)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, eos_token_ids=(EOS,),
                                  max_model_len=150), KVBlockManager(40, 16))
    for i in range(4):  # the last one may stop at EOS: no plain steps while it runs
        s.add(Sequence(f"s{i}", [rng.randrange(20, 99) for _ in range(rng.randrange(3, 40))],
                       stop=StopConditions(max_tokens=rng.randrange(20, 140) if i < 3 else 8, ignore_eos=i < 3)))
    checked = 0
    while s.has_work():
        m = s.plain_decode_steps()
        for k in range(m + 1):
            s.block_manager.take_events()
            tables = [list(q.block_table) for q in s.running]
            regs = [q.num_registered_blocks for q in s.running]
            running = list(s.running)
            out = s.schedule()
            results = s.postprocess(out, {e.seq.request_id: rng.randrange(20, 99) for e in out.scheduled
                                          if e.produces_token})
            plain = (not out.preempted and [e.seq for e in out.scheduled] == running
                     and all(not e.is_prefill for e in out.scheduled)
                     and [list(q.block_table) for q in running] == tables
                     and [q.num_registered_blocks for q in running] == regs
                     and all(r.finish_reason is None for r in results)
                     and not s.block_manager.take_events())
            if m and k < m:
                assert plain, (m, k)
                checked += 1
            elif m:
                assert not plain  # the count is exact, not merely safe
                break
            if not s.has_work():
                break
            if not m:
                break
    assert checked > 50
