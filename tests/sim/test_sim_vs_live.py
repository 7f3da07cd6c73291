"""The simulator against the real thing: the same synthetic trace through an in-process
Turbine (frontend + router + 2 mocker workers, real sockets and clocks) and through
`turbine.sim` with the same mocker config. They must agree on the prefix hit rate within 2
points and on TTFT p50 within 15%, once the live path's own fixed cost is taken out.

That cost (HTTP, tokenizer-free prompt handling, routing, the client, frontend and workers
sharing one event loop here) is not the engine's and the simulator does not model it; it grows
on a slower or busier machine. It is measured in the same run: isolated requests (no queue, no
prefix hit) through both, the median difference of their TTFTs, bounded on its own."""
from __future__ import annotations

import random
from pathlib import Path

from turbine.bench.replay import ReplayConfig, replay
from turbine.bench.trace import MOONCAKE_BLOCK_TOKENS as B
from turbine.bench.trace import TraceRequest
from turbine.mocker.core import MockerConfig
from turbine.sim import SimConfig, simulate

MOCKER = MockerConfig(block_size=64, num_gpu_blocks=4096, max_num_seqs=256, max_num_batched_tokens=8192,
                      speedup_ratio=1.0, context_length=8192)


def synthetic_trace(n: int = 150, rate: float = 10.0, seed: int = 7) -> list[TraceRequest]:
    """Requests sharing one of 8 three-block "documents" as a prefix, plus 1-2 blocks of their
    own; Poisson arrivals at ``rate`` per second. Prompts of ~1.8-2.5k tokens keep it quick."""
    rng = random.Random(seed)
    docs = [tuple(range(3 * d, 3 * d + 3)) for d in range(8)]
    out, t, fresh = [], 0.0, 1000
    for _ in range(n):
        own = tuple(range(fresh, fresh + rng.choice((1, 2))))
        fresh += len(own)
        ids = docs[rng.randrange(len(docs))] + own
        out.append(TraceRequest(timestamp_ms=round(t * 1e3, 3), input_length=len(ids) * B - rng.randrange(256),
                                output_length=rng.randrange(12, 24), hash_ids=ids))
        t += rng.expovariate(rate)
    return out


def probe_trace(n: int = 8) -> list[TraceRequest]:
    """Isolated requests, 300 ms apart, fresh ~2k-token prompts: TTFT = path cost + one prefill."""
    return [TraceRequest(timestamp_ms=300.0 * i, input_length=4 * B - 100, output_length=2,
                         hash_ids=tuple(range(100_000 + 4 * i, 100_004 + 4 * i))) for i in range(n)]


async def test_simulator_agrees_with_live_replay(model_dir: Path) -> None:
    from turbine.frontend.service import FrontendConfig, RouterConfig
    from turbine.launch import WorkerOptions, start_all_in_one

    trace = synthetic_trace()
    policy = "kv"
    sim = simulate(trace, SimConfig(workers=2, router=policy, mocker=MOCKER))
    assert all(r.ok for r in sim.results)
    sim_probe = simulate(probe_trace(), SimConfig(workers=2, router=policy, mocker=MOCKER))

    opts = WorkerOptions(model_dir=model_dir, model_name="tiny", mocker=MOCKER, context_length=MOCKER.context_length)
    dep = await start_all_in_one(opts, workers=2, frontend=FrontendConfig(port=0, router=RouterConfig(policy=policy, seed=0)))
    try:
        assert dep.frontend is not None
        live_probe = await replay(probe_trace(), ReplayConfig(url=dep.frontend.url, progress=False))
        live = await replay(trace, ReplayConfig(url=dep.frontend.url, progress=False))
    finally:
        await dep.stop(grace_s=0)

    from turbine.bench.report import summarize_trace

    s = summarize_trace(sim.results, sim.duration_s)
    l_ = live.report
    assert l_.errors == 0, l_.first_errors
    assert s.hit_rate is not None and l_.hit_rate is not None
    assert s.hit_rate > 0.3  # the trace has reuse the fleet must find
    assert abs(s.hit_rate - l_.hit_rate) <= 0.02, (policy, s.hit_rate, l_.hit_rate)
    assert s.ttft_ms.p50 is not None and l_.ttft_ms.p50 is not None
    path_ms = live_probe.report.ttft_ms.p50 - summarize_trace(sim_probe.results, sim_probe.duration_s).ttft_ms.p50
    assert -2.0 <= path_ms <= 10.0, ("the live path's own cost", path_ms)  # a few ms; more is a slow path
    assert abs(l_.ttft_ms.p50 - path_ms - s.ttft_ms.p50) <= 0.15 * s.ttft_ms.p50, (policy, path_ms, s.ttft_ms,
                                                                                    l_.ttft_ms)
