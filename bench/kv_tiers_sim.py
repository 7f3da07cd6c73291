"""KV tiers in the simulator: a long multi-turn trace whose working set exceeds the fleet's GPU
cache, with and without host (and disk) tiers, on the H200 profile.

The trace: --users conversations of --turns turns; each turn's prompt is the previous one plus a
reply and a new message (hash ids extend the previous turn's, so its prefix repeats), users
arriving as a Poisson process and thinking --think seconds between turns. Reported per fleet:
TTFT p50/p99, the prefix hit rate, and where hits came from (GPU, host, disk).

    python bench/kv_tiers_sim.py          # prints a table, appends it to bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from turbine.bench.report import summarize_trace  # noqa: E402
from turbine.bench.trace import MOONCAKE_BLOCK_TOKENS as B  # noqa: E402
from turbine.bench.trace import TraceRequest  # noqa: E402
from turbine.mocker.core import MockerConfig  # noqa: E402
from turbine.sim import SimConfig, Simulator  # noqa: E402


def multi_turn(users: int, turns: int, start: int, grow: int, think: float, rate: float, out_len: int,
               seed: int) -> list[TraceRequest]:
    rng = random.Random(seed)
    reqs: list[TraceRequest] = []
    next_id = 0
    t_user = 0.0
    for _ in range(users):
        t_user += rng.expovariate(rate)
        t = t_user
        ids: list[int] = []
        length = start
        for _ in range(turns):
            need = -(-length // B)
            while len(ids) < need:
                ids.append(next_id)
                next_id += 1
            reqs.append(TraceRequest(timestamp_ms=t * 1e3, input_length=length, output_length=out_len,
                                     hash_ids=tuple(ids)))
            length += grow
            t += think * (0.5 + rng.random())
    reqs.sort(key=lambda r: r.timestamp_ms)
    return reqs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", default=str(REPO / "bench" / "profiles" / "h200_llama3-8b_bf16.json"))
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--start", type=int, default=2000)
    p.add_argument("--grow", type=int, default=800)
    p.add_argument("--think", type=float, default=20.0, help="seconds between a user's turns")
    p.add_argument("--rate", type=float, default=2.0, help="new users per second")
    p.add_argument("--out", type=int, default=100)
    p.add_argument("--gpu-blocks", type=int, default=6000, help="blocks of 16 per worker (the profile's: 51680)")
    p.add_argument("--host-gb", type=float, default=64.0)
    p.add_argument("--disk-gb", type=float, default=256.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args()
    reqs = multi_turn(a.users, a.turns, a.start, a.grow, a.think, a.rate, a.out, a.seed)
    working_set = sum(-(-r.input_length // 16) for r in reqs if r is reqs[-1]) or 0
    unique_blocks = len({h for r in reqs for h in r.hash_ids}) * (B // 16)
    fleets = [("no tier", 0.0, 0.0), (f"host {a.host_gb:g} GB", a.host_gb, 0.0),
              (f"host {a.host_gb / 4:g} GB + disk {a.disk_gb:g} GB", a.host_gb / 4, a.disk_gb)]
    rows = []
    t0 = time.perf_counter()
    for name, host, disk in fleets:
        mocker = MockerConfig(profile=a.profile, block_size=16, num_gpu_blocks=a.gpu_blocks, max_num_seqs=256,
                              max_num_batched_tokens=8192, context_length=32768, host_kv_gb=host, disk_kv_gb=disk)
        sim = Simulator(reqs, SimConfig(workers=a.workers, router="kv", mocker=mocker, seed=a.seed))
        res = sim.run()
        rep = summarize_trace(res.results, res.duration_s)
        hits = {"host": 0, "disk": 0}
        for core in sim.cores:
            if core.tiers is not None:
                for k in hits:
                    hits[k] += core.tiers.stats.hits[k]
        cached = sum(r.cached_tokens or 0 for r in res.results if r.ok)
        prompt = sum(r.prompt_tokens or 0 for r in res.results if r.ok)
        tier_tokens = (hits["host"] + hits["disk"]) * 16
        rows.append((name, rep, cached / prompt if prompt else 0.0, (cached - tier_tokens) / prompt if prompt else 0,
                     hits["host"] * 16 / prompt if prompt else 0, hits["disk"] * 16 / prompt if prompt else 0))
        print(f"[{name}] TTFT p50 {rep.ttft_ms.p50:.0f} ms, hit {cached / prompt:.1%}", flush=True)
    base = rows[0][1].ttft_ms.p50
    lines = ["| fleet | TTFT p50 ms | TTFT p99 ms | p50 vs no tier | hit rate | from GPU | from host | from disk |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rep, hit, g, h, d in rows:
        lines.append(f"| {name} | {rep.ttft_ms.p50:.0f} | {rep.ttft_ms.p99:.0f} | {base / rep.ttft_ms.p50:.2f}x | "
                     f"{hit:.1%} | {g:.1%} | {h:.1%} | {d:.1%} |")
    from _procs import machine

    text = (f"\n## kv_tiers_sim — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}\n\n"
            f"{a.workers} workers, profile {Path(a.profile).name}, {a.gpu_blocks} GPU blocks of 16 each "
            f"({a.workers * a.gpu_blocks:,} in the fleet, against {unique_blocks:,} distinct prompt blocks); "
            f"{a.users} users x {a.turns} turns, {a.start} tokens growing {a.grow} a turn, think ~{a.think:g} s, "
            f"{a.rate:g} new users/s, {a.out} tokens a reply; kv routing with tier weights. "
            f"{time.perf_counter() - t0:.0f} s of simulation.\n\n" + "\n".join(lines) + "\n")
    del working_set
    print(text)
    if not a.no_record:
        with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
