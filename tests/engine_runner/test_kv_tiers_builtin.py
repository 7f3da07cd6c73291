"""The built-in engine's KV tiers with real bytes: greedy output identical whether a prefix is
computed, onboarded from host memory or from disk (also with concurrent requests sharing it), a
corrupted disk block recomputed instead of served, and a disk that cannot be written."""
from __future__ import annotations

import os
from pathlib import Path

from runner_toys import dense_greedy, greedy

from turbine.kvbm import DISK, HOST

BS = 4
BLOCK_BYTES = 2 * 2 * BS * 2 * 16 * 4  # layers x K/V x block x kv heads x head_dim x fp32


def gb(blocks: int) -> float:
    return blocks * BLOCK_BYTES / 1e9


def drive(core, max_steps: int = 2000) -> dict[str, list[int]]:  # type: ignore[no-untyped-def]
    """Step until idle, running every onboarding the scheduler orders (as the engine's thread does)."""
    out: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not core.has_work() and not core.scheduler.pulling:
            return out
        res = core.step()
        for order in res.pulls:
            try:
                core.onboard(order.source, order.local_blocks)
                core.finish_pull(order.request_id, True)
            except Exception as e:  # noqa: BLE001 - a corrupt block: recompute, forget the entry
                core.finish_pull(order.request_id, False)
                core.drop_tier_entry(e.tier, e.hash)  # type: ignore[attr-defined]
        for o in res.outputs:
            if o.token_id is not None:
                out.setdefault(o.request_id, []).append(o.token_id)
        core.block_manager.check_integrity()
        core.tiers.check_integrity()
    raise AssertionError("the core did not finish")


def prompt(k: int, n: int = 26) -> list[int]:
    return [(k * 37 + i * 11) % 300 + 5 for i in range(n)]


def _evict_with(core, ks: range) -> None:  # type: ignore[no-untyped-def]
    for k in ks:  # other prompts fill the small G1 cache, pushing earlier blocks down
        core.add_request(greedy(f"fill{k}", prompt(k), 2))
    drive(core)


def test_onboarded_from_host_equals_computed(make_core, toy_model) -> None:  # type: ignore[no-untyped-def]
    core = make_core(num_gpu_blocks=24, host_kv_gb=gb(64), async_scheduling=False)
    ref = dense_greedy(toy_model, prompt(1), 6)
    core.add_request(greedy("a", prompt(1), 6))
    assert drive(core)["a"] == ref
    _evict_with(core, range(10, 16))
    assert core.tiers.stats.offloaded > 0
    core.add_request(greedy("again", prompt(1), 6))
    assert drive(core)["again"] == ref
    assert core.tiers.stats.onboarded[HOST] >= 5  # the prompt came back from host memory
    seq_hits = core.tiers.stats.hits[HOST]
    # concurrent requests sharing the prefix, while it sits in the host tier
    _evict_with(core, range(20, 26))
    for i in range(3):
        core.add_request(greedy(f"c{i}", prompt(1) + [7 + i], 4))
    got = drive(core)
    for i in range(3):
        assert got[f"c{i}"] == dense_greedy(toy_model, prompt(1) + [7 + i], 4)
    assert core.tiers.stats.hits[HOST] > seq_hits
    assert core.block_manager.num_active_blocks == 0


def test_onboarded_from_disk_equals_computed_and_corruption_is_recomputed(make_core, toy_model,
                                                                          tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    core = make_core(num_gpu_blocks=24, host_kv_gb=gb(2), disk_kv_gb=gb(64), disk_kv_dir=str(tmp_path),
                     async_scheduling=False)
    ref = dense_greedy(toy_model, prompt(1), 6)
    for r in ("a", "b"):  # seen twice: its blocks may go to disk
        core.add_request(greedy(r, prompt(1), 6))
        assert drive(core)[r] == ref
    _evict_with(core, range(10, 22))
    core.tier_store.close()  # let the background writes land (a fresh writer is not needed below)
    assert core.tiers.stats.spilled > 0 and list(tmp_path.glob("*.kv"))
    core.add_request(greedy("disk", prompt(1), 6))
    assert drive(core)["disk"] == ref
    assert core.tiers.stats.onboarded[DISK] > 0

    # corrupt every block file: the next onboarding from disk must recompute, never serve them
    _evict_with(core, range(30, 42))
    for f in tmp_path.glob("*.kv"):
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
    dropped = core.tiers.stats.dropped
    core.add_request(greedy("corrupt", prompt(1), 6))
    assert drive(core)["corrupt"] == ref
    assert core.tiers.stats.dropped > dropped  # the corrupt blocks were read, refused and forgotten


def test_an_unwritable_disk_stops_the_disk_tier_and_serving_goes_on(make_core, toy_model, tmp_path: Path,
                                                                     caplog) -> None:  # type: ignore[no-untyped-def]
    d = tmp_path / "kv"
    core = make_core(num_gpu_blocks=24, host_kv_gb=gb(2), disk_kv_gb=gb(64), disk_kv_dir=str(d),
                     async_scheduling=False)
    os.rmdir(d)
    d.write_text("not a directory")  # every write fails
    for r in ("a", "b"):
        core.add_request(greedy(r, prompt(1), 6))
        drive(core)
    _evict_with(core, range(10, 22))
    core.tier_store.close()
    assert not core.tiers.disk_enabled and core.tiers.stats.spill_failures > 0
    assert "cannot write" in caplog.text
    core.add_request(greedy("after", prompt(2), 4))
    assert drive(core)["after"] == dense_greedy(toy_model, prompt(2), 4)
    assert not core.tiers.disk.busy
