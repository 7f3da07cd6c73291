"""A disaggregated fleet in the simulator: the timeline of one remote prefill checked by hand,
conditional decisions, and a loaded run where every request finishes and nothing stays held."""
from __future__ import annotations

from typing import Any

import pytest

from turbine.bench.trace import MOONCAKE_BLOCK_TOKENS as B
from turbine.bench.trace import TraceRequest
from turbine.mocker.core import MockerConfig
from turbine.sim import SimConfig, Simulator, simulate

PREFILL, DECODE = 0.010, 0.002


def _cfg(profile: str, **kw: Any) -> SimConfig:
    mocker = MockerConfig(profile=profile, num_gpu_blocks=2048, block_size=B, kv_bytes_per_token=1000,
                          transfer_bandwidth_gbps=1.0, transfer_latency_s=0.001)
    return SimConfig(prefill_workers=kw.pop("prefill_workers", 1), decode_workers=kw.pop("decode_workers", 1),
                     router="kv", mocker=mocker, min_remote_prefill_tokens=kw.pop("min_tokens", 0), **kw)


def _req(ms: float, n_in: int, n_out: int, ids: list[int]) -> TraceRequest:
    return TraceRequest(timestamp_ms=ms, input_length=n_in, output_length=n_out, hash_ids=tuple(ids))


def test_one_remote_prefill_timeline(flat_profile: str) -> None:
    # 4 full blocks of 512 tokens and a partial one: prefill 10 ms -> first token at 10 ms; the pull
    # of 5 blocks (5 * 512 * 1000 B at 1 GB/s + 1 ms) ends at 10 + 3.56 ms; the decode worker then
    # computes only the first token's KV (a 2 ms decode step) and decodes on.
    sim = Simulator([_req(0, 4 * B + 100, 4, [1, 2, 3, 4, 5])], _cfg(flat_profile))
    res = sim.run()
    (r,) = res.results
    assert r.ok and r.output_tokens == 4
    assert r.ttft_s == pytest.approx(PREFILL)
    transfer = 0.001 + 5 * B * 1000 / 1e9
    assert r.itl_s[0] == pytest.approx(transfer + DECODE)
    assert r.itl_s[1:] == pytest.approx([DECODE, DECODE])
    st = res.stats
    assert st.decisions["remote"] == 1 and st.pulled_blocks == 5
    assert st.ttft_split == pytest.approx({"queue": 0.0, "prefill": PREFILL * 1e3, "transfer": transfer * 1e3,
                                           "first_decode": DECODE * 1e3})
    for core in sim.cores:  # the prefill worker released its blocks, the decode worker finished
        assert core.block_manager.num_active_blocks == 0 and not core.scheduler.held


def test_short_prompts_and_a_decode_side_hit_stay_local(flat_profile: str) -> None:
    cfg = _cfg(flat_profile, min_tokens=B * 2)
    reqs = [_req(0, 100, 3, [7]),  # short: local
            _req(10, 5 * B, 3, [1, 2, 3, 4, 5]),  # long: remote
            _req(200, 5 * B + 10, 3, [1, 2, 3, 4, 5, 6])]  # its prefix sits on the decode worker: local
    res = simulate(reqs, cfg)
    assert all(r.ok for r in res.results)
    assert res.stats.decisions == {"remote": 1, "local_short": 2, "local_saturated": 0, "no_prefill_workers": 0}


def test_a_loaded_disaggregated_fleet_finishes_everything(flat_profile: str) -> None:
    import random

    rng = random.Random(0)
    reqs = [_req(i * 20.0, rng.randrange(2, 12) * B + rng.randrange(B), rng.randrange(5, 40),
                 [rng.randrange(50) for _ in range(12)]) for i in range(300)]
    sim = Simulator(reqs, _cfg(flat_profile, prefill_workers=2, decode_workers=3, min_tokens=B))
    res = sim.run()
    assert all(r.ok for r in res.results), [r.error for r in res.results if not r.ok][:3]
    assert all(r.output_tokens == q.output_length for r, q in zip(res.results, reqs, strict=True))
    assert res.stats.decisions["remote"] > 100 and res.stats.pulled_blocks > 0
    for core in sim.cores:
        assert core.block_manager.num_active_blocks == 0 and not core.scheduler.held and not core.scheduler.pulling
