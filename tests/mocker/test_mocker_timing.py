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
