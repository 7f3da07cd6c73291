"""The router's decision log (the dashboard's routing panel): off by default, bounded, completed by
first tokens and usage, alternatives under a rate budget, for every policy."""
from __future__ import annotations

import pytest

from turbine.protocols.kv_events import BlockStored
from turbine.router.decision_log import Alternative, DecisionLog
from turbine.protocols.block_hashing import chain_hash, local_block_hash
from turbine.router.router import Router

BS = 4
P = list(range(100, 132))  # 8 blocks


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def stored(tokens: list[int], n_blocks: int) -> BlockStored:
    hs, parent = [], None
    for i in range(n_blocks):
        parent = chain_hash(parent, local_block_hash(tokens[i * BS:(i + 1) * BS]))
        hs.append(parent)
    return BlockStored(hs, None, tokens[: n_blocks * BS], BS)


def test_no_log_by_default_and_routing_unchanged() -> None:
    a, b = Router("kv", block_size=BS, seed=1), Router("kv", block_size=BS, seed=1)
    b.decision_log = DecisionLog()
    assert a.decision_log is None
    for r in (a, b):
        r.apply_kv_events("w1", [stored(P, 6)])
    picks_a = [a.route(f"r{i}", ["w0", "w1", "w2"], P + [i]) for i in range(20)]
    picks_b = [b.route(f"r{i}", ["w0", "w1", "w2"], P + [i]) for i in range(20)]
    assert picks_a == picks_b  # the log only watches
    assert len(b.decision_log) == 20


def test_kv_decision_has_costs_of_every_candidate_and_completes() -> None:
    clock = Clock()
    r = Router("kv", block_size=BS, seed=0, clock=clock)
    r.decision_log = log = DecisionLog(clock=clock, wall_clock=lambda: 1e9)
    r.apply_kv_events("hot", [stored(P, 6)])
    d = r.route("req", ["cold", "hot"], P + [1])
    assert d.worker_id == "hot"
    (e,) = log.since(0)
    assert (e.request_id, e.worker_id, e.policy, e.overlap_blocks, e.prompt_tokens) == ("req", "hot", "kv", 6, 33)
    assert e.at == 1e9 and e.actual_ttft_s is None and e.actual_cached_blocks is None
    alts = {a.worker_id: a for a in e.alternatives}
    assert alts["hot"].overlap_blocks == 6 and alts["cold"].overlap_blocks == 0
    assert alts["hot"].cost < alts["cold"].cost  # the selector's cost: 9 - 6 vs 9 blocks
    assert [a.worker_id for a in e.alternatives] == ["hot", "cold"]  # cheapest first
    seq = log.seq
    clock.t += 0.25
    r.first_token("req")
    r.observe_actual("req", 6, 20)  # 20 tokens = 5 blocks
    (e2,) = log.since(seq)
    assert e2 is e and e.actual_ttft_s == pytest.approx(0.25) and e.actual_cached_blocks == 5
    assert log.since(log.seq) == []


def test_predicted_decision_carries_predicted_ttft_of_alternatives() -> None:
    r = Router("predicted", block_size=BS, seed=0)
    r.decision_log = log = DecisionLog()
    for w in ("a", "b"):
        r.worker_added(w, 1000)
    r.apply_kv_events("a", [stored(P, 8)])
    d = r.route("x", ["a", "b"], P + [7] * 200)
    (e,) = log
    assert e.predicted_ttft_s == d.predicted_ttft_s is not None
    alts = {a.worker_id: a for a in e.alternatives}
    assert alts["a"].ttft_s < alts["b"].ttft_s and alts["a"].cost is None and alts["b"].itl_s is not None
    assert alts[d.worker_id].ttft_s == pytest.approx(d.predicted_ttft_s)


@pytest.mark.parametrize("policy", ["round-robin", "random", "least-loaded", "power-of-two"])
def test_load_policies_log_load_costs(policy: str) -> None:
    r = Router(policy, block_size=BS, seed=0)
    r.decision_log = log = DecisionLog()
    r.route("busy", ["a"], [1] * 40)
    r.route("next", ["a", "b"], [2] * 8)
    e = log.since(0)[-1]
    costs = {a.worker_id: a.cost for a in e.alternatives}
    assert costs == {"a": 40 + 10, "b": 0.0}  # a's queued prompt tokens + blocks, before "next"


def test_bounded_ring_and_id_map() -> None:
    log = DecisionLog(capacity=5)
    for i in range(12):
        log.record(f"r{i}", "w", "kv", prompt_tokens=1, overlap_blocks=0)
    assert [d.request_id for d in log] == [f"r{i}" for i in range(7, 12)]
    assert len(log._by_id) == 5
    log.first_token("r0")  # gone: nothing happens
    assert all(d.actual_ttft_s is None for d in log)
    log.record("r11", "w2", "kv", prompt_tokens=1, overlap_blocks=0)  # routed again (a migration)
    log.observe("r11", 3)
    assert [d.actual_cached_blocks for d in log if d.request_id == "r11"] == [None, 3]


def test_detail_budget_limits_alternatives() -> None:
    clock = Clock()
    log = DecisionLog(detail_per_s=10, detail_burst=3, clock=clock)
    got = [log.wants_detail() for _ in range(6)]
    assert got == [True, True, True, False, False, False]
    clock.t += 0.15  # one more token
    assert log.wants_detail() and not log.wants_detail()
    clock.t += 100  # refills to the burst, no more
    assert sum(log.wants_detail() for _ in range(10)) == 3


def test_router_over_budget_logs_without_alternatives() -> None:
    clock = Clock()
    r = Router("kv", block_size=BS, seed=0, clock=clock)
    r.decision_log = log = DecisionLog(detail_per_s=1, detail_burst=2, clock=clock)
    for i in range(5):
        r.route(f"r{i}", ["a", "b"], [i] * 8)
    assert [d.alternatives is not None for d in log] == [True, True, False, False, False]
    assert log.recorded == 5 and log.without_detail == 3


def test_alternatives_trimmed_keep_the_chosen() -> None:
    log = DecisionLog(max_alternatives=3)
    alts = [Alternative(f"w{i}", 0, float(i), None, None) for i in range(10)]
    d = log.record("r", "w9", "kv", prompt_tokens=1, overlap_blocks=0, alternatives=alts)
    assert [a.worker_id for a in d.alternatives] == ["w0", "w1", "w9"]
    d = log.record("s", "w1", "kv", prompt_tokens=1, overlap_blocks=0, alternatives=alts)
    assert [a.worker_id for a in d.alternatives] == ["w0", "w1", "w2"]


def test_bad_options() -> None:
    with pytest.raises(ValueError):
        DecisionLog(capacity=0)
    with pytest.raises(ValueError):
        DecisionLog(detail_per_s=-1)
