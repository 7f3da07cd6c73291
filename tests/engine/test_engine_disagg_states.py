"""The scheduler's disaggregation states, shared by every engine: HELD on the prefill side,
PULLING on the decode side, with the block manager's integrity checked after every operation."""
from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turbine.engine.block_manager import KVBlockManager
from turbine.engine.scheduler import Scheduler, SchedulerConfig
from turbine.engine.sequence import Sequence, SequenceStatus
from turbine.protocols.generate import StopConditions
from turbine.protocols.kv_transfer import AgentInfo, KvTransferParams

BS = 4


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(num_blocks: int = 64, clock: Clock | None = None, **cfg: Any) -> Scheduler:
    return Scheduler(SchedulerConfig(**cfg), KVBlockManager(num_blocks, BS), clock=clock or Clock())


def seq(rid: str, prompt: list[int], max_tokens: int = 4, hold: float | None = None,
        source: KvTransferParams | None = None) -> Sequence:
    s = Sequence(rid, prompt, stop=StopConditions(max_tokens=max_tokens, ignore_eos=True))
    s.kv_hold_s = hold
    s.kv_source = source
    return s


def step(s: Scheduler) -> list:  # type: ignore[type-arg]
    out = s.schedule()
    sampled = {e.seq.request_id: 7 for e in out.scheduled if e.produces_token}
    results = s.postprocess(out, sampled)
    s.block_manager.check_integrity()
    return results


def drain(s: Scheduler, steps: int = 1000) -> None:
    for _ in range(steps):
        if not s.has_work():
            return
        step(s)
    raise AssertionError("did not drain")


def prefill(s: Scheduler, rid: str, prompt: list[int], hold: float = 10.0) -> KvTransferParams:
    """Run a prefill-only request to HELD and return the params its worker would publish."""
    s.add(seq(rid, prompt, max_tokens=1, hold=hold))
    drain(s)
    entry = s.held[rid][0]
    assert entry.status is SequenceStatus.HELD
    held = s.held_kv(entry)
    return KvTransferParams(transfer_id=rid, worker_address="inproc://p", agent=AgentInfo(backend="mock"),
                            block_ids=held.block_ids, block_hashes=held.block_hashes, num_tokens=held.num_tokens,
                            hold_s=hold)


PROMPT = list(range(100, 126))  # 26 tokens: 6 full blocks of 4 and a tail of 2


def test_a_prefill_holds_its_prompt_blocks_until_released() -> None:
    s = make()
    params = prefill(s, "p", PROMPT)
    assert len(params.block_ids) == 7 and len(params.block_hashes) == 6 and params.num_tokens == 26
    bm = s.block_manager
    assert bm.num_active_blocks == 7  # six full blocks and the partial one stay referenced
    assert s.held_blocks("p") == params.block_ids
    assert s.release("p") and not s.release("p")
    assert bm.num_active_blocks == 0 and bm.num_cached_blocks == 6  # the prompt stays cached
    bm.check_integrity()


def test_held_blocks_expire_at_the_deadline() -> None:
    clock = Clock()
    s = make(clock=clock)
    prefill(s, "p", PROMPT, hold=5.0)
    assert s.next_hold_deadline() == 5.0
    clock.t = 4.9
    assert s.expire_held() == []
    clock.t = 5.0
    assert s.expire_held() == ["p"] and s.num_holds_expired == 1
    assert s.block_manager.num_active_blocks == 0
    s.block_manager.check_integrity()


def test_decode_pulls_what_it_lacks_then_computes_only_the_tail() -> None:
    src = make()
    params = prefill(src, "p", PROMPT)
    dst = make()
    d = seq("d", PROMPT + [7], max_tokens=3, source=params)  # the prompt plus the prefill's first token
    dst.add(d)
    assert step(dst) == []  # admitted to PULLING: nothing to compute yet
    (order,) = dst.take_pulls()
    assert d.status is SequenceStatus.PULLING and order.remote_blocks == params.block_ids
    assert len(order.local_blocks) == 7 and order.local_blocks == d.block_table[:7]
    assert not dst.has_work()  # a pull is not a step's work
    assert dst.finish_pull("d", ok=True)
    assert d.num_computed_tokens == 26 and dst.block_manager.num_cached_blocks == 6
    events = dst.block_manager.take_events()
    assert sum(len(e.block_hashes) for e in events) == 6  # the pulled blocks announce themselves like computed ones
    out = dst.schedule()
    (entry,) = out.scheduled
    assert entry.num_new_tokens == 1 and not entry.is_prefill  # only the first token's KV: a decode
    dst.postprocess(out, {"d": 9})
    drain(dst)
    assert d.finish_reason == "length" and d.num_pulled_blocks == 7
    assert dst.block_manager.num_active_blocks == 0


def test_a_local_prefix_hit_shrinks_the_pull() -> None:
    src = make()
    params = prefill(src, "p", PROMPT)
    dst = make()
    dst.add(seq("warm", PROMPT[:12] + [1, 2, 3], max_tokens=1))  # caches the first 3 blocks
    drain(dst)
    dst.add(seq("d", PROMPT + [7], source=params))
    step(dst)
    (order,) = dst.take_pulls()
    assert order.remote_blocks == params.block_ids[3:] and len(order.local_blocks) == 4  # 3 full, the partial


def test_a_full_local_hit_pulls_only_the_partial_block() -> None:
    src = make()
    params = prefill(src, "p", PROMPT)
    dst = make()
    dst.add(seq("warm", PROMPT + [7, 8], max_tokens=1))
    drain(dst)
    d = seq("d", PROMPT + [7], source=params)
    dst.add(d)
    step(dst)
    (order,) = dst.take_pulls()
    assert order.remote_blocks == params.block_ids[6:] and len(order.local_blocks) == 1


def test_a_full_local_hit_pulls_nothing_but_still_releases() -> None:
    aligned = PROMPT[:24]  # whole blocks only
    src = make()
    params = prefill(src, "p", aligned)
    dst = make()
    dst.add(seq("warm", aligned + [7, 8], max_tokens=1))
    drain(dst)
    d = seq("d", aligned + [7], source=params)
    dst.add(d)
    step(dst)
    (order,) = dst.take_pulls()
    assert order.local_blocks == [] and order.source is params  # release only
    assert d.status is SequenceStatus.RUNNING and d.num_pulled_blocks == 0


def test_a_failed_pull_prefills_locally() -> None:
    src = make()
    params = prefill(src, "p", PROMPT)
    dst = make()
    d = seq("d", PROMPT + [7], max_tokens=2, source=params)
    dst.add(d)
    step(dst)
    dst.take_pulls()
    assert dst.finish_pull("d", ok=False) and dst.num_pull_failures == 1
    assert d.block_table == [] and d.num_computed_tokens == 0
    out = dst.schedule()
    assert out.scheduled[0].num_new_tokens == len(PROMPT) + 1  # the whole prompt, here
    dst.postprocess(out, {"d": 9})
    drain(dst)
    assert d.finish_reason == "length" and dst.block_manager.num_active_blocks == 0


def test_abort_while_pulling_frees_the_blocks_only_when_the_copy_ends() -> None:
    src = make()
    params = prefill(src, "p", PROMPT)
    dst = make()
    dst.add(seq("d", PROMPT + [7], source=params))
    step(dst)
    dst.take_pulls()
    assert dst.abort("d")
    assert dst.block_manager.num_active_blocks == 7  # the copy may still be writing them
    assert dst.finish_pull("d", ok=True)
    assert dst.block_manager.num_active_blocks == 0 and dst.block_manager.num_cached_blocks == 0
    dst.block_manager.check_integrity()


def test_a_source_for_another_prompt_is_refused() -> None:
    src = make()
    params = prefill(src, "p", PROMPT)
    dst = make()
    with pytest.raises(ValueError, match="block hashes differ"):
        dst.add(seq("d", [1] + PROMPT[1:] + [7], source=params))
    bad = KvTransferParams(transfer_id="x", worker_address="a", agent=AgentInfo(backend="mock"), block_ids=[1, 2],
                           block_hashes=[1], num_tokens=9, hold_s=1.0)
    with pytest.raises(ValueError, match="malformed"):
        dst.add(seq("e", PROMPT + [7], source=bad))
    assert dst.block_manager.num_active_blocks == 0


def test_pulls_wait_for_room_and_count_as_seats() -> None:
    src = make()
    params = prefill(src, "p", PROMPT)
    dst = make(num_blocks=8, max_num_seqs=1)
    dst.add(seq("d1", PROMPT + [7], source=params))
    dst.add(seq("d2", PROMPT + [7], source=params))
    step(dst)
    assert len(dst.take_pulls()) == 1 and len(dst.waiting) == 1  # one seat, one pull
    dst.finish_pull("d1", ok=True)
    drain(dst)
    step(dst)
    assert len(dst.take_pulls()) == 1  # the second one's turn; its prefix is now cached locally: empty pull


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["prefill", "decode", "agg", "release", "expire", "finish_ok",
                                           "finish_fail", "abort", "step"]),
                          st.integers(0, 5)), min_size=1, max_size=60))
def test_random_disaggregation_keeps_the_block_manager_consistent(ops: list[tuple[str, int]]) -> None:
    clock = Clock()
    s = make(num_blocks=24, clock=clock, max_num_seqs=4, max_num_batched_tokens=16)
    prompts = [list(range(10 * i, 10 * i + 9 + i)) for i in range(6)]
    offered: dict[int, KvTransferParams] = {}
    n = 0
    for op, k in ops:
        n += 1
        rid = f"r{n}"
        if op == "prefill":
            try:
                s.add(seq(rid, prompts[k], max_tokens=1, hold=1.0 + k))
            except ValueError:
                pass
        elif op == "decode" and offered:
            p = offered[sorted(offered)[k % len(offered)]]
            try:
                s.add(seq(rid, prompts[int(p.transfer_id.split(":")[1])] + [7], max_tokens=2, source=p))
            except ValueError:
                pass
        elif op == "agg":
            try:
                s.add(seq(rid, prompts[k], max_tokens=3))
            except ValueError:
                pass
        elif op == "release" and s.held:
            s.release(sorted(s.held)[k % len(s.held)])
        elif op == "expire":
            clock.t += k
            s.expire_held()
        elif op in ("finish_ok", "finish_fail") and s.pulling:
            s.finish_pull(sorted(s.pulling)[k % len(s.pulling)], op == "finish_ok")
        elif op == "abort":
            live = [r for r in (*s._seqs, *s.pulling)]
            if live:
                s.abort(sorted(live)[k % len(live)])
        else:
            step(s)
        s.take_pulls()
        for hid, (hseq, _) in s.held.items():  # what a prefill worker would offer for this prompt
            idx = next(i for i, p in enumerate(prompts) if list(hseq.token_ids[:len(p)]) == p)
            held = s.held_kv(hseq)
            offered[n] = KvTransferParams(transfer_id=f"{hid}:{idx}", worker_address="a",
                                          agent=AgentInfo(backend="mock"), block_ids=held.block_ids,
                                          block_hashes=held.block_hashes, num_tokens=held.num_tokens, hold_s=1.0)
        s.block_manager.check_integrity()
    # Everything ends: pulls finish, holds are released, work drains; no block stays referenced.
    for _ in range(1000):
        for rid in list(s.pulling):
            s.finish_pull(rid, True)
        if not (s.has_work() or s.pulling):
            break
        step(s)
    for rid in list(s.held):
        s.release(rid)
    assert s.block_manager.num_active_blocks == 0
    s.block_manager.check_integrity()
