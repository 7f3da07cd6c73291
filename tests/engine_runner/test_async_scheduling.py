"""Async scheduling: the core plans and launches step k+1 before it reads step k's tokens.

Every request must see exactly what the synchronous core gives it (tokens, finish reason,
usage), through stop tokens that are only known a step late, preemption of a sequence whose
token is still in flight, aborts mid-flight and chunked prefill; no block may leak.
"""
from __future__ import annotations

import random
from collections import Counter

import pytest

torch = pytest.importorskip("torch")

from runner_toys import greedy

from turbine.engine.builtin_core import BuiltinCore
from turbine.protocols.generate import GenerateRequest, SamplingOptions, StopConditions

pytestmark = pytest.mark.timeout(120)


def workload(seed: int, stop_pool: list[int]) -> list[tuple[int, GenerateRequest]]:
    """(arrival call, request): greedy and seeded sampling, stop tokens, min_tokens, ignore_eos."""
    rng = random.Random(seed)
    items = []
    for i in range(14):
        prompt = [rng.randrange(2, 300) for _ in range(rng.choice((1, 3, 9, 17, 40)))]
        kind = rng.random()
        sampling = (SamplingOptions(temperature=0.0) if kind < 0.5
                    else SamplingOptions(temperature=0.9, top_k=rng.choice((0, 20)), seed=rng.randrange(1 << 30)))
        stop = StopConditions(max_tokens=rng.randint(1, 24),
                              stop_token_ids=tuple(rng.sample(stop_pool, 2)) if rng.random() < 0.8 else (),
                              min_tokens=rng.choice((0, 0, 2)), ignore_eos=rng.random() < 0.2)
        items.append((rng.randrange(0, 12), GenerateRequest(request_id=f"r{i}", token_ids=prompt,
                                                            sampling=sampling, stop=stop)))
    return items


def drive(core: BuiltinCore, items: list[tuple[int, GenerateRequest]], abort_at: dict[str, int] | None = None
          ) -> dict[str, tuple[list[int], str | None, int]]:
    """Run to completion: request id -> (tokens, finish reason, completion_tokens)."""
    tokens: dict[str, list[int]] = {}
    final: dict[str, tuple[str | None, int]] = {}
    pending = sorted(items, key=lambda x: x[0])
    aborts = dict(abort_at or {})
    calls = 0
    while pending or core.has_work():
        while pending and pending[0][0] <= calls:
            core.add_request(pending.pop(0)[1])
        for rid, at in list(aborts.items()):
            if at <= calls and rid in tokens:
                assert core.abort(rid)
                del aborts[rid]
                final[rid] = ("abort", len(tokens[rid]))
        res = core.step()
        calls += 1
        for o in res.outputs:
            assert o.request_id not in final, f"{o.request_id} produced output after it finished"
            if o.token_id is not None:
                tokens.setdefault(o.request_id, []).append(o.token_id)
                assert o.completion_tokens == len(tokens[o.request_id])
            if o.finish_reason is not None:
                final[o.request_id] = (o.finish_reason, o.completion_tokens)
        core.block_manager.check_integrity()
        assert calls < 2000
    assert core.stats().kv_active_blocks == 0 and not core.has_work()
    return {rid: (tokens.get(rid, []), *final[rid]) for rid in final}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("blocks,budget", [(256, 64), (24, 16)])  # roomy / preempting, chunked
@pytest.mark.parametrize("overlap_prefill,eager_min", [(False, 0), (True, 0), (True, 1024)])
def test_async_outputs_equal_sync_outputs(make_core, seed, blocks, budget, overlap_prefill, eager_min) -> None:  # type: ignore[no-untyped-def]
    """eager_min 0: every step launches ahead; 1024: on CPU (no graphs, every step eager) each
    step is staged behind the one before it, and launched at the start of the next call."""
    probe = make_core()
    for i, n in enumerate((1, 3, 9, 17, 40)):
        probe.add_request(greedy(f"p{i}", [(7 * j + n) % 298 + 2 for j in range(n)], 24, ignore_eos=True))
    seen: Counter[int] = Counter()
    while probe.has_work():
        seen.update(o.token_id for o in probe.step().outputs if o.token_id is not None)
    stop_pool = [t for t, _ in seen.most_common(6)]  # tokens the toy model produces often: stops fire
    items = workload(seed, stop_pool)
    sync = drive(make_core(num_gpu_blocks=blocks, max_num_batched_tokens=budget, async_scheduling=False), items)
    core = make_core(num_gpu_blocks=blocks, max_num_batched_tokens=budget, overlap_prefill_steps=overlap_prefill,
                     eager_overlap_min_tokens=eager_min)
    assert core.config.async_scheduling
    got = drive(core, items)
    assert got == sync
    reasons = {r for _, r, _ in sync.values()}
    assert "stop" in reasons and "length" in reasons
    if blocks == 24:
        assert core.scheduler.num_preemptions > 0


def _count_launches(core):  # type: ignore[no-untyped-def]
    launched, fixed = [], []
    orig_launch, orig_prepare = core.runner.launch, core.runner.prepare

    def launch(batch, prev=None):  # type: ignore[no-untyped-def]
        launched.append(batch.num_tokens)
        return orig_launch(batch, prev)

    def prepare(out, prev=None):  # type: ignore[no-untyped-def]
        batch = orig_prepare(out, prev)
        fixed.append(batch.fix is not None)
        return batch

    core.runner.launch, core.runner.prepare = launch, prepare  # type: ignore[method-assign]
    return launched, fixed


def test_steps_overlap_and_decodes_read_tokens_on_the_device(make_core) -> None:  # type: ignore[no-untyped-def]
    core = make_core(eager_overlap_min_tokens=0)  # launch every step ahead, eager ones too
    assert core.config.overlap_prefill_steps
    launched, fixed = _count_launches(core)
    core.add_request(greedy("a", list(range(10, 31)), 5, ignore_eos=True))
    res = core.step()
    assert [o.token_id is not None for o in res.outputs] == [True]  # the prefill's token
    assert len(launched) == 2 and core.in_flight  # the first decode was launched before it was read
    while core.has_work():
        core.step()
    # 1 prefill + 4 decodes; max_tokens is known ahead, so no step runs past the last token
    assert len(launched) == 5
    assert fixed == [False, True, True, True, True]


def test_an_eager_step_is_staged_behind_a_short_step(make_core) -> None:  # type: ignore[no-untyped-def]
    """The prefill's token comes back before the (eager, on CPU) decode behind it is launched;
    the next call launches that decode first, then completes it; tokens as without staging."""
    ref = make_core(async_scheduling=False)
    ref.add_request(greedy("a", list(range(10, 31)), 5, ignore_eos=True))
    want = []
    while ref.has_work():
        want += [o.token_id for o in ref.step().outputs]
    core = make_core()
    assert core.config.eager_overlap_min_tokens == 1024
    launched, fixed = _count_launches(core)
    core.add_request(greedy("a", list(range(10, 31)), 5, ignore_eos=True))
    got = [o.token_id for o in core.step().outputs]
    assert len(launched) == 1 and len(fixed) == 2 and core.in_flight and core.has_work()  # decode staged
    assert core.stats().num_running == 1
    res = core.step()
    assert len(launched) == 2 and res.num_decode_seqs == 1  # launched, then completed, in one call
    got += [o.token_id for o in res.outputs]
    while core.has_work():
        got += [o.token_id for o in core.step().outputs]
    assert got == want and len(launched) == 5 and fixed == [False, True, True, True, True]
    # finish_inflight launches a staged step before completing it
    core.add_request(greedy("b", list(range(40, 61)), 5, ignore_eos=True))
    core.step()
    assert core.in_flight
    done = core.finish_inflight()
    assert done is not None and done.num_decode_seqs == 1 and not core.in_flight
    core.abort("b")
    assert core.stats().kv_active_blocks == 0


def test_a_stop_token_known_late_drops_the_extra_step(make_core) -> None:  # type: ignore[no-untyped-def]
    core = make_core(async_scheduling=False)
    core.add_request(greedy("a", list(range(10, 31)), 8, ignore_eos=True))
    ref = []
    while core.has_work():
        ref += [o.token_id for o in core.step().outputs]
    stop = ref[2]
    core = make_core()
    core.add_request(greedy("a", list(range(10, 31)), 8, stop_token_ids=(stop,)))
    outs = []
    while core.has_work():
        outs += core.step().outputs
    assert [o.token_id for o in outs] == ref[:ref.index(stop) + 1]
    assert (outs[-1].finish_reason, outs[-1].completion_tokens) == ("stop", ref.index(stop) + 1)
    assert core.stats().kv_active_blocks == 0
    core.block_manager.check_integrity()


def test_abort_while_its_step_is_in_flight(make_core) -> None:  # type: ignore[no-untyped-def]
    items = [(0, greedy("a", list(range(10, 31)), 20, ignore_eos=True)),
             (0, greedy("b", [7, 3, 250, 11], 20, ignore_eos=True))]
    alone = drive(make_core(), items[1:])
    core = make_core()
    got = drive(core, items, abort_at={"a": 3})
    assert got["a"][1] == "abort" and 0 < len(got["a"][0]) < 20
    assert got["b"] == alone["b"]
    assert core.stats()[:4] == (0, 256, 0, 0)
