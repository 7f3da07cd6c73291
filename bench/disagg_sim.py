"""When does disaggregation win? The fleet simulator, agg vs every P:D split of the same GPUs.

Workloads (Poisson arrivals swept over load, unique prompts, seeded):
    long     ISL 3000-8000, OSL 100-500   (issue 12's: where prefills stall aggregated decodes)
    short    ISL 200-1000,  OSL 100-500   (where a transfer buys little)
    mixed    ISL 100-8000,  OSL 50-500    (for the conditional thresholds)

Each request counts toward goodput when it finished, its TTFT <= --slo-ttft and the p99 of its own
inter-token gaps <= --slo-itl (a tight ITL SLA: a 250 ms prefill chunk in a decode batch breaks it).
The mocker runs the measured H200 profile of the built-in engine on the Llama-3.1-8B shape
(bench/profiles/h200_llama3-8b_bf16.json); KV pulls between GPUs of one node at --transfer-bandwidth.

    python bench/disagg_sim.py                 # prints tables, appends to bench/RESULTS.md
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

from turbine.bench.trace import MOONCAKE_BLOCK_TOKENS, TraceRequest  # noqa: E402
from turbine.mocker.core import MockerConfig  # noqa: E402
from turbine.sim import SimConfig, simulate  # noqa: E402

WORKLOADS = {"long": ((3000, 8000), (100, 500)), "short": ((200, 1000), (100, 500)),
             "mixed": ((100, 8000), (50, 500))}


def trace(workload: str, rate: float, n: int, seed: int) -> list[TraceRequest]:
    (i0, i1), (o0, o1) = WORKLOADS[workload]
    rng = random.Random(seed)
    t, out, next_id = 0.0, [], 0
    for _ in range(n):
        isl = rng.randint(i0, i1)
        blocks = -(-isl // MOONCAKE_BLOCK_TOKENS)
        out.append(TraceRequest(timestamp_ms=t * 1e3, input_length=isl, output_length=rng.randint(o0, o1),
                                hash_ids=tuple(range(next_id, next_id + blocks))))  # unique prompts
        next_id += blocks
        t += rng.expovariate(rate)
    return out


def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.99 * len(xs)))] if xs else 0.0


def run(a: argparse.Namespace, reqs: list[TraceRequest], prefill: int, decode: int, **kw: object) -> dict:
    mocker = MockerConfig(profile=a.profile, block_size=16, num_gpu_blocks=a.num_gpu_blocks, max_num_seqs=256,
                          max_num_batched_tokens=a.max_num_batched_tokens, context_length=16384,
                          kv_bytes_per_token=131072, transfer_bandwidth_gbps=a.transfer_bandwidth,
                          transfer_latency_s=a.transfer_latency)
    cfg = SimConfig(workers=a.gpus, router="kv", mocker=mocker, prefill_workers=prefill, decode_workers=decode,
                    seed=a.seed, **kw)  # type: ignore[arg-type]
    res = simulate(reqs, cfg)
    ok = [r for r in res.results if r.ok]
    good = [r for r in ok if r.ttft_s is not None and r.ttft_s * 1e3 <= a.slo_ttft
            and p99(r.itl_s) * 1e3 <= a.slo_itl]
    ttfts = sorted(r.ttft_s * 1e3 for r in ok if r.ttft_s is not None)
    itl99 = sorted(p99(r.itl_s) * 1e3 for r in ok)
    return {"goodput": len(good) / res.duration_s, "frac": len(good) / len(reqs),
            "ttft_p50": ttfts[len(ttfts) // 2] if ttfts else 0.0,
            "itl99_p50": itl99[len(itl99) // 2] if itl99 else 0.0,
            "split": res.stats.ttft_split, "decisions": res.stats.decisions}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", default=str(REPO / "bench" / "profiles" / "h200_llama3-8b_bf16.json"))
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--rates", default="8,16,24,32,40", help="requests/s over the whole fleet")
    p.add_argument("--workloads", default="long,short")
    p.add_argument("--slo-ttft", type=float, default=2000.0, help="ms")
    p.add_argument("--slo-itl", type=float, default=25.0, help="ms, p99 of each request's gaps")
    p.add_argument("--num-gpu-blocks", type=int, default=51680, help="KV blocks of 16 tokens per GPU (the profile's)")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--transfer-bandwidth", type=float, default=100.0,
                   help="GB/s a decode GPU pulls KV at (CUDA IPC over NVLink within a node)")
    p.add_argument("--transfer-latency", type=float, default=0.001, help="s per pull (measured fixed cost)")
    p.add_argument("--thresholds", default="0,256,512,1024,2048",
                   help="mixed workload: min_remote_prefill_tokens values compared")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args()
    t_start = time.perf_counter()
    rates = [float(x) for x in a.rates.split(",")]
    splits = [(k, a.gpus - k) for k in range(1, a.gpus)]
    sections = []
    verdicts = []
    for wl in a.workloads.split(","):
        rows = []
        for rate in rates:
            reqs = trace(wl, rate, a.requests, a.seed)
            agg = run(a, reqs, 0, 0)
            dis = {f"{pp}P:{d}D": run(a, reqs, pp, d) for pp, d in splits}
            best = max(dis, key=lambda k: dis[k]["goodput"])
            b = dis[best]
            ratio = b["goodput"] / agg["goodput"] if agg["goodput"] else float("inf")
            rows.append((rate, agg, best, b, ratio, dis))
            print(f"[{wl} @{rate:g}/s] agg {agg['goodput']:.2f} good req/s, best {best} {b['goodput']:.2f} "
                  f"(x{ratio:.2f})", flush=True)
        head = ("| rate req/s | agg goodput | agg good % | agg TTFT p50 | agg ITL p99 (median req) | best split | "
                "its goodput | good % | TTFT p50 | ITL p99 | disagg / agg | "
                + " | ".join(f"{pp}P:{d}D" for pp, d in splits) + " |")
        lines = [head, "|" + "---|" * (11 + len(splits))]
        for rate, agg, best, b, ratio, dis in rows:
            lines.append(f"| {rate:g} | {agg['goodput']:.2f} | {agg['frac'] * 100:.0f} | {agg['ttft_p50']:.0f} | "
                         f"{agg['itl99_p50']:.1f} | {best} | {b['goodput']:.2f} | {b['frac'] * 100:.0f} | "
                         f"{b['ttft_p50']:.0f} | {b['itl99_p50']:.1f} | {ratio:.2f} | "
                         + " | ".join(f"{dis[k]['goodput']:.2f}" for k in dis) + " |")
        top = max(rows, key=lambda r: r[1]["goodput"])  # agg's best load point
        peak_agg = max(r[1]["goodput"] for r in rows)
        peak_dis = max(r[3]["goodput"] for r in rows)
        verdicts.append(f"{wl}: peak goodput agg {peak_agg:.2f} vs disaggregated {peak_dis:.2f} req/s "
                        f"(x{peak_dis / peak_agg if peak_agg else float('inf'):.2f})")
        split_note = rows[-1][3]["split"]
        sections.append(f"**{wl}** (ISL {WORKLOADS[wl][0]}, OSL {WORKLOADS[wl][1]}):\n\n" + "\n".join(lines)
                        + f"\n\nTTFT parts of the best split at {rows[-1][0]:g} req/s (p50 ms): {split_note}; "
                        f"agg's best load point {top[0]:g} req/s.\n")
    # conditional disaggregation: the min_remote_prefill_tokens threshold on a mixed workload
    thr_rows = []
    if a.thresholds:
        rate = rates[len(rates) // 2]
        reqs = trace("mixed", rate, a.requests, a.seed)
        pp = max(1, a.gpus // 4)
        for thr in (int(x) for x in a.thresholds.split(",")):
            r = run(a, reqs, pp, a.gpus - pp, min_remote_prefill_tokens=thr)
            thr_rows.append(f"| {thr} | {r['goodput']:.2f} | {r['frac'] * 100:.0f} | {r['ttft_p50']:.0f} | "
                            f"{r['itl99_p50']:.1f} | {r['decisions'].get('remote', 0)} / "
                            f"{r['decisions'].get('local_short', 0)} |")
        sections.append(f"**conditional threshold** (mixed workload, {pp}P:{a.gpus - pp}D at {rate:g} req/s): "
                        "`--disagg-min-prefill-tokens`\n\n| threshold | goodput | good % | TTFT p50 | ITL p99 | "
                        "remote / local |\n|---|---|---|---|---|---|\n" + "\n".join(thr_rows) + "\n")
    from _procs import machine

    text = (f"\n## disagg_sim — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}\n\n"
            f"{a.gpus} GPUs: aggregated workers vs every P:D split; profile {Path(a.profile).name}; KV blocks of 16, "
            f"{a.num_gpu_blocks} per GPU, {a.max_num_batched_tokens} tokens per step; pulls at "
            f"{a.transfer_bandwidth:g} GB/s + {a.transfer_latency * 1e3:g} ms; {a.requests} requests per point; "
            f"goodput = finished with TTFT <= {a.slo_ttft:g} ms and its own ITL p99 <= {a.slo_itl:g} ms "
            f"(req/s). {time.perf_counter() - t_start:.0f} s of simulation.\n\n" + "\n".join(sections)
            + "\nVerdict: " + "; ".join(verdicts) + ".\n")
    print(text)
    if not a.no_record:
        with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
