"""Timing models: Dynamo's polynomial figures and composition, and measured profiles."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from turbine.mocker.timing import PolynomialTiming, ProfileTiming


def test_polynomial_figures() -> None:
    t = PolynomialTiming()
    assert t.prefill_ms(1000) == pytest.approx(32.1058589)
    assert t.prefill_ms(0) == 0.0
    assert t.decode_ms(0.5) == pytest.approx(26.31)
    assert t.decode_ms(0.0) == pytest.approx(5.74)
    assert t.decode_ms(1.0) == pytest.approx(34.01)
    assert t.decode_ms(-3.0) == pytest.approx(5.74)  # usage is clamped to [0, 1]


def test_decode_floor_is_one_ms() -> None:
    assert PolynomialTiming(decode=(-10.0, 0.0, 0.0)).decode_ms(0.3) == 1.0


def test_step_is_prefill_plus_decode_divided_by_speedup() -> None:
    t = PolynomialTiming()
    assert t.step_seconds(1000, 0, 0.5) == pytest.approx(32.1058589e-3)  # no decode time
    assert t.step_seconds(0, 8, 0.5) == pytest.approx(26.31e-3)
    assert t.step_seconds(1000, 8, 0.5) == pytest.approx((32.1058589 + 26.31) * 1e-3)
    assert t.step_seconds(0, 0, 0.9) == 0.0
    fast = PolynomialTiming(speedup_ratio=10)
    assert fast.step_seconds(1000, 8, 0.5) == pytest.approx(t.step_seconds(1000, 8, 0.5) / 10)
    with pytest.raises(ValueError):
        PolynomialTiming(speedup_ratio=0)


PROFILE = {
    "version": 1,
    "meta": {"model": "tiny", "device": "test"},
    "prefill": {"new_tokens": [100, 1000], "cached_tokens": [0, 1000], "ms": [[10, 20], [100, 140]]},
    "decode": {"batch_size": [1, 9], "context_length": [100, 200], "ms": [[5, 7], [13, 19]]},
}


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    return path


def test_profile_interpolates_linearly(tmp_path: Path) -> None:
    t = ProfileTiming.from_file(write(tmp_path, PROFILE))
    assert t.prefill_ms(100) == 10 and t.prefill_ms(1000, 1000) == 140
    assert t.prefill_ms(550) == pytest.approx(55)
    assert t.prefill_ms(550, 500) == pytest.approx((15 + 120) / 2)
    assert t.decode_ms(5, 150) == pytest.approx((6 + 16) / 2)
    assert t.decode_ms(0, 150) == 0.0 and t.prefill_ms(0) == 0.0


def test_profile_clamps_outside_the_grid(tmp_path: Path) -> None:
    t = ProfileTiming.from_file(write(tmp_path, PROFILE))
    assert t.prefill_ms(5) == 10 and t.prefill_ms(10**6, 10**6) == 140
    assert t.decode_ms(100, 50) == 13 and t.decode_ms(100, 10**5) == 19


def test_profile_step_seconds(tmp_path: Path) -> None:
    t = ProfileTiming.from_file(write(tmp_path, PROFILE), speedup_ratio=2)
    got = t.step_seconds(550, 5, 0.3, mean_prefill_context=0, mean_decode_context=150)
    assert got == pytest.approx((55 + 11) / 2 * 1e-3)


def test_profile_without_second_axes(tmp_path: Path) -> None:
    data = {"prefill": {"new_tokens": [0, 100], "ms": [0, 50]}, "decode": {"batch_size": [1], "ms": [4]}}
    t = ProfileTiming.from_file(write(tmp_path, data))
    assert t.prefill_ms(30, 999) == pytest.approx(15) and t.decode_ms(64, 4096) == 4


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"prefill": {"new_tokens": [1], "ms": [1]}}, "'prefill' and 'decode'"),
        ({**PROFILE, "version": 2}, "version"),
        ({**PROFILE, "prefill": {"new_tokens": [2, 1], "ms": [1, 2]}}, "increasing"),
        ({**PROFILE, "prefill": {"new_tokens": [1, 2], "ms": [1]}}, "one entry per point"),
        ({**PROFILE, "decode": {"batch_size": [1], "context_length": [1, 2], "ms": [[1]]}}, "2 values"),
        ({**PROFILE, "decode": {"batch_size": [1], "ms": [-1]}}, "negative"),
        ({**PROFILE, "decode": {"batch_size": [], "ms": []}}, "empty"),
        ({**PROFILE, "decode": {"ms": [1]}}, "batch_size"),
    ],
)
def test_profile_rejects_malformed_files(tmp_path: Path, data: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ProfileTiming.from_file(write(tmp_path, data))


def test_profile_rejects_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ProfileTiming.from_file(path)


# Mixed steps (prefill tokens and decodes in one eager step). The mixed grid is narrower than
# the prefill and decode tables so the corrections beyond it read measured values.
MIXED = {
    "prefill": {
        "new_tokens": [100, 1000, 2000], "cached_tokens": [0, 1000], "ms": [[10, 20], [100, 140], [200, 260]]
    },
    "decode": {"batch_size": [1, 9, 17], "context_length": [100, 200], "ms": [[5, 7], [13, 19], [21, 31]]},
    "mixed": {
        "new_tokens": [100, 1000], "batch_size": [1, 9], "context_length": 100, "ms": [[12, 16], [104, 110]]
    },
}


def test_mixed_grid_points_reproduce_the_table() -> None:
    t = ProfileTiming(MIXED)
    assert t.has_mixed
    got = [[t.mixed_ms(n, 0, b, 100) for b in (1, 9)] for n in (100, 1000)]
    assert got == [[12, 16], [104, 110]]


def test_mixed_interpolates_inside_the_grid() -> None:
    t = ProfileTiming(MIXED)
    assert t.mixed_ms(550, 0, 5, 100) == pytest.approx(((12 + 16) / 2 + (104 + 110) / 2) / 2)
    assert t.mixed_ms(100, 0, 3, 100) == pytest.approx(13)


def test_mixed_beyond_the_token_range_adds_the_prefill_slope() -> None:
    t = ProfileTiming(MIXED)
    assert t.mixed_ms(1500, 0, 1, 100) == pytest.approx(104 + (150 - 100))
    assert t.mixed_ms(2000, 0, 9, 100) == pytest.approx(110 + (200 - 100))
    assert t.mixed_ms(50, 0, 1, 100) == 12  # below the grid: the prefill table is flat there too


def test_mixed_beyond_the_batch_range_adds_the_decode_difference() -> None:
    t = ProfileTiming(MIXED)
    assert t.mixed_ms(100, 0, 13, 100) == pytest.approx(16 + (17 - 13))
    assert t.mixed_ms(100, 0, 9, 200) == pytest.approx(16 + (19 - 13))  # longer decodes, in the grid's batch
    assert t.mixed_ms(100, 0, 13, 200) == pytest.approx(16 + ((19 + 31) / 2 - 13))


def test_mixed_cache_context_adds_the_prefill_difference() -> None:
    t = ProfileTiming(MIXED)
    assert t.mixed_ms(1000, 1000, 1, 100) == pytest.approx(104 + (140 - 100))
    assert t.mixed_ms(100, 500, 9, 100) == pytest.approx(16 + (15 - 10))


def test_mixed_step_is_never_faster_than_either_part() -> None:
    t = ProfileTiming({**MIXED, "mixed": {**MIXED["mixed"], "ms": [[1, 1], [1, 1]]}})
    assert t.mixed_ms(1000, 0, 9, 100) == 100  # the prefill alone
    assert t.mixed_ms(100, 0, 9, 100) == 13  # the decode alone
    assert t.mixed_ms(1000, 1000, 9, 200) == 140


def test_mixed_leaves_pure_steps_alone_and_divides_by_speedup() -> None:
    t = ProfileTiming(MIXED, speedup_ratio=4)
    assert t.step_seconds(550, 0, 0.3, mean_prefill_context=500) == pytest.approx((15 + 120) / 2 / 4e3)
    assert t.step_seconds(0, 5, 0.3, mean_decode_context=150) == pytest.approx((9 + 13) / 2 / 4e3)
    assert t.step_seconds(0, 0, 0.3) == 0.0
    got = t.step_seconds(1500, 13, 0.3, mean_prefill_context=0, mean_decode_context=100)
    assert got == pytest.approx((110 + 50 + 4) / 4e3)
    assert got == pytest.approx(ProfileTiming(MIXED).mixed_ms(1500, 0, 13, 100) / 4e3)


def test_profile_without_mixed_is_additive() -> None:
    data = {k: v for k, v in MIXED.items() if k != "mixed"}
    t = ProfileTiming(data)
    assert not t.has_mixed
    assert t.mixed_ms(100, 0, 9, 100) == 10 + 13
    assert t.step_seconds(100, 9, 0.3, mean_decode_context=100) == pytest.approx(23e-3)


@pytest.mark.parametrize(
    ("mixed", "match"),
    [
        ([1, 2], "'mixed' section must be an object"),
        ({k: v for k, v in MIXED["mixed"].items() if k != "context_length"}, "needs 'context_length'"),
        ({"ms": []}, "needs 'new_tokens', 'batch_size', 'context_length'"),
        ({**MIXED["mixed"], "context_length": 0}, "mixed.context_length must be a positive"),
        ({**MIXED["mixed"], "context_length": float("inf")}, "mixed.context_length"),
        ({**MIXED["mixed"], "context_length": float("nan")}, "mixed.context_length"),
        ({**MIXED["mixed"], "context_length": True}, "mixed.context_length"),
        ({**MIXED["mixed"], "context_length": [100]}, "mixed.context_length"),
        ({**MIXED["mixed"], "new_tokens": []}, "mixed.new_tokens is empty"),
        ({**MIXED["mixed"], "batch_size": [9, 1]}, "mixed.batch_size must be strictly increasing"),
        ({**MIXED["mixed"], "batch_size": [1, float("nan")]}, "mixed.batch_size must be a list of finite"),
        ({**MIXED["mixed"], "ms": [[12, 16]]}, "mixed.ms must have one entry per point of mixed.new_tokens"),
        ({**MIXED["mixed"], "ms": [12, 16]}, r"mixed.ms\[0\] must be a list"),
        ({**MIXED["mixed"], "ms": [[12, 16], [104]]}, r"mixed.ms\[1\] must have 2 values"),
        ({**MIXED["mixed"], "ms": [[12, -1], [104, 110]]}, r"mixed.ms\[0\] holds a negative time"),
        ({**MIXED["mixed"], "ms": [[12, 16], [104, float("inf")]]}, r"mixed.ms\[1\] must be a list of"),
    ],
)
def test_profile_rejects_malformed_mixed_sections(mixed: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ProfileTiming({**MIXED, "mixed": mixed})


def test_mixed_profile_loads_from_file(tmp_path: Path) -> None:
    t = ProfileTiming.from_file(write(tmp_path, MIXED), speedup_ratio=2)
    assert t.has_mixed and t.step_seconds(1000, 9, 0.3, mean_decode_context=100) == pytest.approx(55e-3)
    with pytest.raises(ValueError, match=r"profile\.json: mixed\.context_length"):
        ProfileTiming.from_file(write(tmp_path, {**MIXED, "mixed": {**MIXED["mixed"], "context_length": -5}}))


# Padding (meta.padding): the engine runs a step at its CUDA graph's size.
PADDED = {**MIXED, "meta": {"padding": {"decode_batch": [1, 9, 17], "tokens": [100, 600, 1000, 2000]}}}


def test_decode_bucket_costs_its_rows_and_the_real_rows_attention() -> None:
    t, plain = ProfileTiming(PADDED), ProfileTiming(MIXED)
    assert t.decode_ms(9, 200) == plain.decode_ms(9, 200) == 19  # a bucket size: the table itself
    # 5 decodes run as 9: 9 rows at the shortest context (13), plus 5/9 of 9 rows' attention (19 - 13)
    assert t.decode_ms(5, 200) == pytest.approx(13 + 5 / 9 * 6)
    assert t.decode_ms(5, 200) > plain.decode_ms(5, 200)  # the unpadded line from batch 1 undercounts
    assert t.decode_ms(5, 100) == 13
    assert t.decode_ms(40, 200) == plain.decode_ms(40, 200)  # beyond the largest bucket: unpadded


def test_prefill_reads_its_padded_token_count() -> None:
    t = ProfileTiming(PADDED)
    assert t.prefill_ms(101, 0) == t.prefill_ms(600, 0) == pytest.approx(10 + 500 / 900 * 90)
    assert t.prefill_ms(2500, 0) == ProfileTiming(MIXED).prefill_ms(2500, 0)  # beyond: no padding


def test_mixed_step_follows_the_padding_staircase_between_grid_points() -> None:
    # prefill: 0.1 ms a token; the mixed grid sits well above it (the floor stays out of the way)
    prof = {**MIXED, "mixed": {**MIXED["mixed"], "ms": [[50, 52], [150, 152]]},
            "meta": {"padding": {"tokens": [128, 512, 1024]}}}
    t, plain = ProfileTiming(prof), ProfileTiming({k: v for k, v in prof.items() if k != "meta"})
    assert t.mixed_ms(100, 0, 1, 100) == plain.mixed_ms(100, 0, 1, 100) == 50  # grid points unchanged
    # 400 + 1 tokens run as 512; the grid's line from 100 to 1000 assumes the prefill table's line
    # between 101 -> 128 and 1001 -> 1024, which the padded 512 replaces
    line = 12.8 + (400 - 100) / 900 * (102.4 - 12.8)
    assert t.mixed_ms(400, 0, 1, 100) == pytest.approx(plain.mixed_ms(400, 0, 1, 100) + 51.2 - line)


@pytest.mark.parametrize("padding, match", [
    ("x", "meta.padding must be an object"),
    ({"decode_batch": []}, "decode_batch must be a non-empty increasing"),
    ({"tokens": [16, 16]}, "tokens must be a non-empty increasing"),
    ({"tokens": [0, 16]}, "tokens must be a non-empty increasing"),
])
def test_profile_rejects_malformed_padding(padding: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ProfileTiming({**MIXED, "meta": {"padding": padding}})
