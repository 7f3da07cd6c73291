"""Sweeps checked on a MockerCore whose step time is known: with ``clock="reported"`` the profiler
must read back the very timing model the mocker runs (no torch, no wall clock)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from turbine import profiler
from turbine.mocker.core import MockerConfig, MockerCore
from turbine.mocker.timing import ProfileTiming
from turbine.profiler import CoreLimits, ProfileGrid, Profiler
from turbine.profiler.command import write_profile
from turbine.profiler.grid import fill_rows

# Linear in every axis, so bilinear lookup is exact anywhere inside the grid.
SOURCE = {
    "prefill": {"new_tokens": [1, 100_000], "cached_tokens": [0, 100_000],
                "ms": [[2.0, 2.0 + 100_000 * 0.001], [2.0 + 99_999 * 0.01, 2.0 + 99_999 * 0.01 + 100]]},
    "decode": {"batch_size": [1, 1001], "context_length": [0, 100_000],
               "ms": [[3.0, 3.0 + 100_000 * 0.002], [3.0 + 1000 * 0.05, 3.0 + 1000 * 0.05 + 200]]},
}
GRID = ProfileGrid(prefill_new_tokens=(16, 64, 256), prefill_cached_tokens=(0, 64, 250),
                   decode_batch_sizes=(1, 4, 16), decode_context_lengths=(64, 512),
                   mixed_new_tokens=(32, 128), mixed_batch_sizes=(1, 4), warmup=1, repeats=2,
                   decode_setup_tokens=100_000)


def _core(**kw: object) -> MockerCore:
    cfg = {"block_size": 16, "num_gpu_blocks": 4096, "max_num_seqs": 64, "max_num_batched_tokens": 1024,
           "context_length": 4096}
    cfg.update(kw)
    return MockerCore(MockerConfig(**cfg), vocab_size=1000, timing=ProfileTiming(SOURCE))  # type: ignore[arg-type]


def test_exports() -> None:
    assert set(profiler.__all__) == {"DEFAULT_GRID", "QUICK_GRID", "CoreLimits", "ProfileGrid", "Profiler",
                                     "profile_core"}


def test_sweeps_read_back_the_mockers_timing() -> None:
    core = _core()
    prof = Profiler(core, GRID, clock="reported", progress=False).run()
    src = ProfileTiming(SOURCE)
    pre, dec, meta = prof["prefill"], prof["decode"], prof["meta"]
    assert pre["new_tokens"] == [16, 64, 256] and pre["cached_tokens"] == [0, 64, 240]  # 250 -> whole blocks
    for i, n in enumerate(pre["new_tokens"]):
        for j, c in enumerate(pre["cached_tokens"]):
            assert pre["ms"][i][j] == pytest.approx(src.prefill_ms(n, c), abs=1e-3)
    assert dec["batch_size"] == [1, 4, 16] and dec["context_length"] == [64, 512]
    for i, b in enumerate(dec["batch_size"]):
        for j, L in enumerate(dec["context_length"]):
            ctx = meta["decode_mean_context"][i][j]
            assert abs(ctx - L) <= 0.25 * L  # the mean length stays near the nominal one
            # measured at the logged mean length (the mocker's decode context), moved onto L
            assert dec["ms"][i][j] == pytest.approx(src.decode_ms(b, L), rel=1e-3)
    assert meta["prefill_filled"] == [] and meta["decode_filled"] == []
    mixed = meta["mixed"]
    assert mixed["context_length"] == 512 and len(mixed["points"]) == 4
    for p in mixed["points"]:  # the mocker composes additively, so the additive model is exact
        assert p["additive_over_measured"] == pytest.approx(1.0, abs=1e-3)
    grid = prof["mixed"]  # the same points as the profile's mixed grid, which the mocker replays
    assert grid["new_tokens"] == [32, 128] and grid["batch_size"] == [1, 4]
    assert abs(grid["context_length"] - 512) < 0.25 * 512 and meta["async_scheduling"] is False
    cells = {(p["new_tokens"], p["batch_size"]): p["ms"] for p in mixed["points"]}
    assert grid["ms"] == [[pytest.approx(cells[n, b], abs=1e-4) for b in (1, 4)] for n in (32, 128)]
    assert not core.has_work() and core.block_manager.num_active_blocks == 0
    core.block_manager.check_integrity()


def test_a_pipelined_core_reads_back_the_same_tables() -> None:
    """Async scheduling: each call completes the step launched by the call before; the profiler
    matches results to their steps and times a mixed step as its two calls less one decode."""
    core = _core(async_scheduling=True)
    assert core.pipelined
    prof = Profiler(core, GRID, clock="reported", progress=False).run()
    src = ProfileTiming(SOURCE)
    pre, dec, meta = prof["prefill"], prof["decode"], prof["meta"]
    assert meta["async_scheduling"] is True
    for i, n in enumerate(pre["new_tokens"]):
        for j, c in enumerate(pre["cached_tokens"]):
            assert pre["ms"][i][j] == pytest.approx(src.prefill_ms(n, c), abs=1e-3)
    for i, b in enumerate(dec["batch_size"]):
        for j, L in enumerate(dec["context_length"]):
            assert dec["ms"][i][j] == pytest.approx(src.decode_ms(b, L), rel=2e-3)
    for p in meta["mixed"]["points"]:  # up to the decode step's drift of a token or two
        assert p["additive_over_measured"] == pytest.approx(1.0, abs=5e-3)
    assert not core.has_work() and core.block_manager.num_active_blocks == 0
    core.block_manager.check_integrity()
    assert MockerCore(MockerConfig(), vocab_size=100, timing=ProfileTiming(prof)).pipelined


def test_the_engines_padding_sizes_go_into_the_profile() -> None:
    assert "padding" not in Profiler(_core(), GRID, clock="reported", progress=False).run()["meta"]
    core = _core()
    core.padding = {"decode_batch": [1, 2, 4, 8, 16], "tokens": [16, 32, 64, 128, 256]}  # type: ignore[attr-defined]
    prof = Profiler(core, GRID, clock="reported", progress=False).run()
    assert prof["meta"]["padding"] == core.padding
    assert ProfileTiming(prof).decode_buckets == [1, 2, 4, 8, 16]  # the mocker reads them back


def test_profile_file_round_trips_through_profile_timing(tmp_path: Path) -> None:
    prof = Profiler(_core(), GRID, clock="reported", progress=False).run()
    prof["meta"]["model"] = "unit"
    path = write_profile(tmp_path / "p.json", prof)
    assert json.loads(path.read_text()) == prof
    timing = ProfileTiming.from_file(path)
    for sec, lookup in (("prefill", timing.prefill_ms), ("decode", timing.decode_ms)):
        xs, ys = prof[sec]["new_tokens" if sec == "prefill" else "batch_size"], \
            prof[sec]["cached_tokens" if sec == "prefill" else "context_length"]
        for i, x in enumerate(xs):
            for j, y in enumerate(ys):
                assert lookup(x, y) == pytest.approx(prof[sec]["ms"][i][j], abs=1e-9)
    assert MockerConfig(profile=str(path)).make_timing().decode_ms(1, 64) == prof["decode"]["ms"][0][0]


def test_points_the_engine_cannot_hold_are_dropped_or_filled() -> None:
    # 100 blocks of 16 tokens hold one or two 512-token sequences, not four
    core = _core(num_gpu_blocks=100, max_num_batched_tokens=200, max_num_seqs=8)
    prof = Profiler(core, GRID, clock="reported", progress=False).run()
    pre, dec, meta = prof["prefill"], prof["decode"], prof["meta"]
    assert pre["new_tokens"] == [16, 64]  # 256 > the step budget: never one step here
    assert dec["batch_size"] == [1, 4] and dec["context_length"] == [64, 512]  # max_num_seqs 8
    assert meta["decode_filled"] == [[1, 1]]
    ms = dec["ms"]  # one measured batch at 512: the column follows the shape of the first one
    assert ms[1][1] == pytest.approx(ms[0][1] * ms[1][0] / ms[0][0], rel=1e-3)
    assert ms[1][1] == pytest.approx(ProfileTiming(SOURCE).decode_ms(4, 512), rel=0.02)
    limits = CoreLimits.of(core)
    assert (limits.num_blocks, limits.max_num_batched_tokens, limits.max_num_seqs) == (100, 200, 8)
    # a 300-token context: 240 cached + 64 new cannot run, 512-token decodes neither
    prof = Profiler(_core(context_length=300), GRID, clock="reported", progress=False).run()
    assert prof["prefill"]["new_tokens"] == [16, 64, 256] and prof["decode"]["context_length"] == [64]
    assert sorted(prof["meta"]["prefill_filled"]) == [[1, 2], [2, 1], [2, 2]]
    assert all(v > 0 for row in prof["prefill"]["ms"] for v in row)


def test_fill_extrapolates_along_the_row_axis() -> None:
    ms = [[1.0, 10.0], [2.0, 20.0], [4.0, None], [8.0, None]]
    assert fill_rows(ms, [1, 2, 4, 8]) == [[2, 1], [3, 1]]
    assert ms[2][1] == pytest.approx(40.0) and ms[3][1] == pytest.approx(80.0)  # slope 10 per unit of axis
    ms = [[1.0, 5.0], [2.0, None], [3.0, None]]
    fill_rows(ms, [1, 2, 3])  # one measured row: follow the first column's shape
    assert ms[1][1] == pytest.approx(10.0) and ms[2][1] == pytest.approx(15.0)
    with pytest.raises(ValueError, match="no measured point"):
        fill_rows([[1.0, None]], [1])


def test_a_missing_cache_hit_is_an_error_not_a_number() -> None:
    core = MockerCore(MockerConfig(block_size=16, num_gpu_blocks=1024, enable_prefix_caching=False),
                      vocab_size=1000, timing=ProfileTiming(SOURCE))
    grid = ProfileGrid(prefill_new_tokens=(16,), prefill_cached_tokens=(0, 64), decode_batch_sizes=(1,),
                       decode_context_lengths=(64,), repeats=1)
    with pytest.raises(RuntimeError, match="cache hit"):
        Profiler(core, grid, clock="reported", progress=False).run()


@pytest.mark.parametrize("kw", [{"prefill_new_tokens": (64, 16)}, {"decode_batch_sizes": ()},
                                {"prefill_cached_tokens": (16,)}, {"repeats": 0}])
def test_bad_grids_are_refused(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ProfileGrid(**kw)  # type: ignore[arg-type]


def test_no_decode_context_fits() -> None:
    core = _core(context_length=40)
    grid = ProfileGrid(prefill_new_tokens=(16,), prefill_cached_tokens=(0,), decode_batch_sizes=(1,),
                       decode_context_lengths=(512,), repeats=1)
    with pytest.raises(ValueError, match="no decode context"):
        Profiler(core, grid, clock="reported", progress=False).run()
    with pytest.raises(ValueError, match="clock"):
        Profiler(core, grid, clock="cpu")
