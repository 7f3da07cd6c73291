"""The selector: cost formula, ties, temperature sampling."""
from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from turbine.router.load_tracker import LoadEstimate
from turbine.router.selector import Selection, select_worker, softmax_pick, worker_costs


def test_cost_formula_by_hand() -> None:
    loads = {"a": LoadEstimate(prefill_tokens=32, decode_blocks=5), "b": LoadEstimate()}
    costs = worker_costs(["a", "b", "c"], {"a": 3, "c": 1}, loads, 10, block_size=16, overlap_weight=2.0)
    # a: 2 * (10 - 3 + 32/16) + 5 = 23;  b: 2 * 10 + 0 = 20;  c (no load known): 2 * (10 - 1) = 18
    assert costs == [23.0, 20.0, 18.0]


def test_lowest_cost_wins_and_reports_its_overlap() -> None:
    rng = random.Random(0)
    loads = {"a": LoadEstimate(), "b": LoadEstimate()}
    assert select_worker(["a", "b"], {"b": 4}, loads, 8, block_size=16, rng=rng) == Selection("b", 4, 4.0)
    busy = {"a": LoadEstimate(), "b": LoadEstimate(decode_blocks=100)}
    assert select_worker(["a", "b"], {"b": 4}, busy, 8, block_size=16, rng=rng).worker_id == "a"
    # the overlap weight trades cache hits against load
    mid = {"a": LoadEstimate(), "b": LoadEstimate(decode_blocks=6)}
    assert select_worker(["a", "b"], {"b": 4}, mid, 8, block_size=16, rng=rng).worker_id == "a"  # 8 vs 10
    assert select_worker(["a", "b"], {"b": 4}, mid, 8, block_size=16, rng=rng,
                         overlap_weight=2.0).worker_id == "b"  # 16 vs 14
    # only candidates are considered, whatever the overlaps say
    assert select_worker(["a"], {"b": 8}, loads, 8, block_size=16, rng=rng) == Selection("a", 0, 8.0)


def test_ties_are_broken_at_random_but_reproducibly() -> None:
    cands = ["a", "b", "c", "d"]
    picks = Counter(select_worker(cands, {}, {}, 4, block_size=16, rng=random.Random(s)).worker_id
                    for s in range(400))
    assert set(picks) == set(cands) and min(picks.values()) > 60
    run = [select_worker(cands, {}, {}, 4, block_size=16, rng=random.Random(7)).worker_id for _ in range(3)]
    assert len(set(run)) == 1


def test_temperature_samples_from_softmax_of_normalised_costs() -> None:
    rng = random.Random(1)
    costs = [0.0, 5.0, 10.0]  # normalised: 0, 0.5, 1
    t = 0.5
    want = [math.exp(-x / t) for x in (0.0, 0.5, 1.0)]
    want = [w / sum(want) for w in want]
    n = 20000
    got = Counter(softmax_pick(costs, t, rng) for _ in range(n))
    for i in range(3):
        assert abs(got[i] / n - want[i]) < 0.02
    # scale-free: the same choice probabilities for costs ten times larger
    rng_a, rng_b = random.Random(3), random.Random(3)
    assert [softmax_pick(costs, t, rng_a) for _ in range(50)] == \
        [softmax_pick([10 * c for c in costs], t, rng_b) for _ in range(50)]
    assert Counter(softmax_pick([2.0, 2.0], 1.0, rng) for _ in range(1000))[0] > 400  # equal: uniform


def test_temperature_through_select_worker() -> None:
    loads = {"a": LoadEstimate(), "b": LoadEstimate(decode_blocks=8)}
    cold = Counter(select_worker(["a", "b"], {}, loads, 8, block_size=16, rng=random.Random(s),
                                 temperature=0.01).worker_id for s in range(200))
    hot = Counter(select_worker(["a", "b"], {}, loads, 8, block_size=16, rng=random.Random(s),
                                temperature=100.0).worker_id for s in range(200))
    assert cold["a"] == 200
    assert 60 < hot["b"] < 140


def test_bad_arguments_are_value_errors() -> None:
    rng = random.Random(0)
    with pytest.raises(ValueError, match="no candidate"):
        select_worker([], {}, {}, 1, block_size=16, rng=rng)
    with pytest.raises(ValueError, match="temperature"):
        select_worker(["a"], {}, {}, 1, block_size=16, rng=rng, temperature=-1)
    with pytest.raises(ValueError, match="block_size"):
        select_worker(["a"], {}, {}, 1, block_size=0, rng=rng)


def test_one_pass_choice_is_an_argmin_of_worker_costs() -> None:
    rng = random.Random(5)
    for _ in range(300):
        cands = [f"w{i}" for i in range(rng.randint(1, 8))]
        loads = {w: LoadEstimate(prefill_tokens=rng.choice([0, 16, 40]), decode_blocks=rng.randint(0, 3))
                 for w in cands if rng.random() < 0.8}
        overlaps = {w: rng.randint(0, 4) for w in cands if rng.random() < 0.5}
        costs = worker_costs(cands, overlaps, loads, 6, block_size=16, overlap_weight=1.5)
        sel = select_worker(cands, overlaps, loads, 6, block_size=16, rng=rng, overlap_weight=1.5)
        assert sel.cost == min(costs) == costs[cands.index(sel.worker_id)]
        assert sel.overlap_blocks == overlaps.get(sel.worker_id, 0)
