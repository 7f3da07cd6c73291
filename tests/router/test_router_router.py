"""Router: the frontend's API for every policy, KV events, resync, approximate mode, metrics."""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from turbine.protocols.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from turbine.router.metrics import register_prometheus
from turbine.router.policies import POLICIES
from turbine.router.router import RouteDecision, Router

BS = 4
SHARED = list(range(100, 116))  # 4 blocks


def stored(hashes: list[int], parent: int | None, tokens: list[int], **kw: object) -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=BS, **kw)  # type: ignore[arg-type]


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("policy", ["round-robin", "random", "least-loaded", "power-of-two", "kv", "predicted"])
def test_frontend_api_for_every_policy(policy: str) -> None:
    r = Router(policy, block_size=BS, seed=3)
    cands = ["w1", "w2", "w3"]
    seen = set()
    for i in range(12):
        d = r.route(f"r{i}", cands, SHARED)
        assert isinstance(d, RouteDecision) and d.worker_id in cands
        seen.add(d.worker_id)
        r.first_token(f"r{i}")
    assert len(seen) >= 2  # nobody sends everything to one idle worker
    assert r.decisions == 12 and r.stats.decisions == {policy: 12}
    for i in range(12):
        r.finished(f"r{i}")
    assert all(ld.active_requests == 0 and ld.prefill_tokens == 0 and ld.decode_blocks == 0
               for ld in r.loads.workers.values())
    r.worker_removed("w1")
    assert "w1" not in r.loads.workers
    with pytest.raises(ValueError, match="no candidate"):
        r.route("x", [], SHARED)
    assert set(POLICIES) == {"kv", "predicted", "round-robin", "random", "least-loaded", "power-of-two"}


def test_kv_routes_to_the_cached_prefix_and_reserves_only_new_prefill() -> None:
    r = Router("kv", block_size=BS, seed=0)
    assert r.apply_kv_events("w2", [stored([1, 2, 3, 4], None, SHARED)])
    d = r.route("r1", ["w1", "w2", "w3"], SHARED + [7, 7, 7])
    assert d == RouteDecision("w2", 4)
    load = r.loads.workers["w2"]
    assert load.prefill_tokens == 3 and load.decode_blocks == 5
    # the whole prompt cached: the engine still computes the last token, so one block less is a hit
    assert r.route("r2", ["w2"], SHARED).overlap_blocks == 3
    r.first_token("r1")
    assert r.loads.workers["w2"].prefill_tokens == 0 + 4  # r2's last block is still to compute
    r.finished("r1")
    r.finished("r2")
    assert r.loads.workers["w2"].decode_blocks == 0


def test_kv_balances_load_when_nothing_is_cached() -> None:
    r = Router("kv", block_size=BS, seed=0)
    picks = [r.route(f"r{i}", ["w1", "w2"], list(range(i * 100, i * 100 + 32))).worker_id for i in range(4)]
    assert sorted(picks) == ["w1", "w1", "w2", "w2"]


def test_kv_prefers_a_lightly_loaded_worker_over_a_small_hit() -> None:
    r = Router("kv", block_size=BS, seed=0)
    r.apply_kv_events("w1", [stored([1], None, SHARED[:4])])
    for i in range(3):
        r.route(f"busy{i}", ["w1"], list(range(1000 + 40 * i, 1040 + 40 * i)))
    assert r.route("new", ["w1", "w2"], SHARED).worker_id == "w2"


def test_lora_requests_match_lora_blocks() -> None:
    r = Router("kv", block_size=BS, seed=0)
    r.apply_kv_events("w1", [stored([1, 2], None, SHARED[:8], lora_name="ad")])
    assert r.route("a", ["w1", "w2"], SHARED, lora_name="ad") == RouteDecision("w1", 2)
    r.finished("a")
    assert r.route("b", ["w1", "w2"], SHARED).overlap_blocks == 0


def test_unknown_parent_asks_for_resync_and_reset_worker_rebuilds() -> None:
    r = Router("kv", block_size=BS)
    assert r.apply_kv_events("w1", [stored([1, 2], None, SHARED[:8])])
    assert not r.apply_kv_events("w1", [stored([9], 404, SHARED[8:12]), stored([3], 2, SHARED[8:12])])
    assert r.stats.events_unplaced == 1 and r.stats.blocks_stored == 3  # the rest of the batch applied
    # a full-state dump, children before parents, plus an orphan whose parent was evicted
    r.reset_worker("w1", [stored([3], 2, SHARED[8:12]), stored([2], 1, SHARED[4:8]), stored([1], None, SHARED[:4]),
                          stored([8], 77, SHARED[12:16])])
    assert r.stats.resyncs == 1 and r.stats.events_unplaced == 2
    assert r.index.find_matches_for_tokens(SHARED) == {"w1": 3}
    assert r.index.worker_blocks("w1") == 3
    r.index.check_integrity()
    assert r.apply_kv_events("w1", [BlockRemoved(block_hashes=[3]), AllBlocksCleared()])
    assert r.index_blocks == 0 and r.stats.blocks_removed == 1
    assert r.stats.events_applied == {"BlockStored": 3, "BlockRemoved": 1, "AllBlocksCleared": 1}


def test_worker_removed_drops_its_blocks() -> None:
    r = Router("kv", block_size=BS)
    r.apply_kv_events("w1", [stored([1], None, SHARED[:4])])
    r.apply_kv_events("w2", [stored([1], None, SHARED[:4])])
    r.worker_removed("w1")
    assert r.index.find_matches_for_tokens(SHARED) == {"w2": 1} and r.index_blocks == 1


def test_events_of_another_block_size_are_rejected_not_raised() -> None:
    r = Router("kv", block_size=BS)
    bad = BlockStored(block_hashes=[1], parent_block_hash=None, token_ids=[1] * 8, block_size=8)
    assert r.apply_kv_events("w1", [bad, bad])
    assert r.stats.events_rejected == 2 and r.index_blocks == 0


def test_event_lag_uses_the_wall_clock() -> None:
    wall = Clock(1000.0)
    r = Router("kv", block_size=BS, wall_clock=wall)
    r.apply_kv_events("w1", [stored([1], None, SHARED[:4])], ts=999.75)
    r.apply_kv_events("w1", [], ts=1000.5)  # a publisher clock ahead of ours counts as no lag
    snap = r.stats.snapshot()
    assert snap["event_lag_count"] == 2 and snap["event_lag_max_s"] == 0.25


def test_approx_mode_learns_from_its_own_decisions_until_the_ttl() -> None:
    clock = Clock()
    r = Router("kv", block_size=BS, approx=True, approx_ttl_s=30.0, seed=0, clock=clock)
    first = r.route("r1", ["w1", "w2", "w3"], SHARED + [1])
    assert first.overlap_blocks == 0
    r.finished("r1")
    again = r.route("r2", ["w1", "w2", "w3"], SHARED + [2])
    assert again == RouteDecision(first.worker_id, 4)
    r.finished("r2")
    assert r.apply_kv_events("w1", [stored([1], None, SHARED[:4])]) and r.stats.events_ignored == 1
    clock.t += 31
    assert r.route("r3", ["w1", "w2", "w3"], SHARED + [3]).overlap_blocks == 0
    assert r.index_blocks == 4  # r3's own blocks, recorded just now
    r.worker_removed(r.route("r4", ["w9"], SHARED + [3]).worker_id)
    assert r.approx is not None and r.approx.index.worker_blocks("w9") == 0
    r.approx.check_integrity()


def test_predicted_vs_actual_and_prometheus_export() -> None:
    r = Router("kv", block_size=BS, seed=0)
    r.apply_kv_events("w1", [stored([1, 2], None, SHARED[:8])], ts=None)
    d = r.route("r1", ["w1"], SHARED)
    r.observe_actual("r1", d.overlap_blocks, actual_cached_tokens=4)
    s = r.stats.snapshot()
    assert (s["observed"], s["predicted_blocks"], s["actual_cached_blocks"], s["overlap_abs_error_blocks"]) == (1, 2, 1, 1)
    reg = CollectorRegistry(auto_describe=False)
    register_prometheus(reg, r, "tiny")
    text = generate_latest(reg).decode()
    for line in ('turbine_router_decisions_total{model="tiny",policy="kv"} 1.0',
                 'turbine_router_index_blocks{model="tiny"} 2.0',
                 'turbine_router_predicted_overlap_blocks_total{model="tiny"} 2.0',
                 'turbine_router_actual_cached_blocks_total{model="tiny"} 1.0',
                 'turbine_router_kv_events_total{model="tiny",type="BlockStored"} 1.0',
                 'turbine_router_kv_event_lag_seconds_count{model="tiny"} 0.0'):
        assert line in text, line


@pytest.mark.parametrize("kw", [{"policy": "fastest"}, {"block_size": 0}, {"temperature": -1.0},
                                {"overlap_weight": -1.0}, {"policy": "round-robin", "approx": True},
                                {"policy": "kv", "approx": True, "approx_ttl_s": 0.0}])
def test_bad_configuration_is_a_value_error(kw: dict) -> None:
    with pytest.raises(ValueError):
        Router(**kw)


@pytest.mark.parametrize("approx", [False, True])
def test_callers_local_hashes_route_like_the_tokens(approx: bool) -> None:
    from turbine.router.indexer import hash_blocks

    a, b = (Router("kv", block_size=BS, seed=1, approx=approx) for _ in range(2))
    for r in (a, b):
        r.apply_kv_events("w2", [stored([1, 2, 3], None, SHARED[:12])])
    prompts = [SHARED + [7, 7], SHARED[:8] + [1] * 9, [5] * 3, SHARED]
    for i, p in enumerate(prompts * 2):
        assert a.route(f"r{i}", ["w1", "w2", "w3"], p) == b.route(f"r{i}", ["w1", "w2", "w3"], p,
                                                                 local_hashes=hash_blocks(p, BS))
    assert a.loads.workers == b.loads.workers
