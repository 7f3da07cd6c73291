"""`turbine simulate`: a trace through a simulated fleet, reported like a live replay.

    turbine simulate --trace trace.jsonl --workers 8 --router kv --speed 2 --json out.json
"""
from __future__ import annotations

import argparse
import gc
import sys

from turbine.bench.replay import add_trace_args, check_plots, write_outputs
from turbine.bench.report import PlotUnavailable, summarize_trace
from turbine.bench.trace import TokenSynth, ideal_hit_rate, load_trace
from turbine.mocker.core import ASYNC_SCHEDULING_FLAGS, MockerConfig
from turbine.router.cli_args import add_routing_args
from turbine.sim.simulator import SimConfig, simulate


def add_simulate_args(p: argparse.ArgumentParser) -> None:
    """Options beyond the mocker's (the caller adds those: same flags as `turbine serve`)."""
    add_trace_args(p, trace_required=True)
    p.add_argument("--workers", type=int, default=8, help="simulated aggregated workers")
    p.add_argument("--prefill-workers", type=int, default=0,
                   help="a disaggregated fleet: this many prefill workers (with --decode-workers, instead of --workers)")
    p.add_argument("--decode-workers", type=int, default=0, help="a disaggregated fleet: this many decode workers")
    p.add_argument("--disagg-min-prefill-tokens", type=int, default=512,
                   help="disaggregated: prompts with fewer uncached tokens are prefilled on the decode worker")
    p.add_argument("--disagg-max-prefill-queue", type=int, default=32768,
                   help="disaggregated: prefill on the decode worker when every prefill worker has this many "
                   "prompt tokens queued")
    add_routing_args(p)
    p.add_argument("--frontends", type=int, default=1,
                   help="frontends in front of the fleet, each with its own router; requests alternate between "
                   "them and each learns of the others' only from the workers' load reports (aggregated fleets)")
    p.add_argument("--load-report-ms", type=float, default=10.0,
                   help="with several frontends: how often every worker's load reaches them (a live worker "
                   "publishes at most every 10 ms)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the summary as JSON")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="write PNGs into DIR: TTFT and ITL CDFs, latency vs load over the trace's windows, TTFT "
                   "over time; needs matplotlib")
    p.add_argument("--seed", type=int, default=0, help="seeds routing ties, sampling and prompt tokens")
    p.add_argument("--label", default="", help="row label in the printed table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main_from_args(a: argparse.Namespace) -> int:
    """Run one simulation from parsed args; 0 if every request finished, 1 if not, 2 on bad input."""
    try:
        requests = load_trace(a.trace, a.max_requests)
        ctx = a.context_length or max(r.input_length + r.output_length for r in requests)
        mocker = MockerConfig(block_size=a.block_size, num_gpu_blocks=a.num_gpu_blocks, max_num_seqs=a.max_num_seqs,
                              max_num_batched_tokens=a.max_num_batched_tokens, speedup_ratio=a.speedup_ratio,
                              context_length=max(ctx, 2), profile=a.profile,
                              async_scheduling=ASYNC_SCHEDULING_FLAGS[a.mock_async_scheduling],
                              kv_bytes_per_token=a.kv_bytes_per_token, transfer_bandwidth_gbps=a.transfer_bandwidth,
                              transfer_latency_s=a.transfer_latency, host_kv_gb=a.host_kv_gb,
                              disk_kv_gb=a.disk_kv_gb, host_kv_bandwidth_gbps=a.host_kv_bandwidth,
                              disk_kv_bandwidth_gbps=a.disk_kv_bandwidth)
        cfg = SimConfig(workers=a.workers, router=a.router, router_approx=a.router_approx,
                        router_temperature=a.router_temperature, speed=a.speed, vocab_size=a.vocab_size,
                        router_max_itl_ms=a.router_max_itl_ms, router_max_queued=a.router_max_queued,
                        seed=a.seed, mocker=mocker, prefill_workers=a.prefill_workers,
                        decode_workers=a.decode_workers, min_remote_prefill_tokens=a.disagg_min_prefill_tokens,
                        max_prefill_queue_tokens=a.disagg_max_prefill_queue, frontends=a.frontends,
                        load_report_ms=a.load_report_ms, router_own_load_only=a.router_own_load_only)
        TokenSynth(cfg.vocab_size)
        check_plots(a.plots)  # before the run: a missing matplotlib fails now, not after it
    except (ValueError, OSError, PlotUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    with tqdm(total=len(requests), unit="req", desc="simulate", disable=a.no_progress, dynamic_ncols=True,
              mininterval=0.5) as bar:
        try:
            res = simulate(requests, cfg, on_finish=lambda: bar.update(1))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    # The fleet's objects are garbage now (a reference cycle: the router's and cores' clock) and the
    # process ends in a moment: park them where the cyclic GC never looks instead of spending a
    # full collection (~0.3 s on the Mooncake trace) on memory the exit hands back anyway.
    gc.freeze()
    meta = {"mode": "sim", "trace": str(a.trace), "router": cfg.label(), "workers": cfg.num_workers, "speed": cfg.speed,
            "mocker": {"block_size": mocker.block_size, "num_gpu_blocks": mocker.num_gpu_blocks,
                       "max_num_seqs": mocker.max_num_seqs, "max_num_batched_tokens": mocker.max_num_batched_tokens,
                       "speedup_ratio": mocker.speedup_ratio, "profile": mocker.profile,
                       "async_scheduling": mocker.async_scheduling},
            "sim": res.stats.to_dict()}
    report = summarize_trace(res.results, res.duration_s, slo_ttft_ms=a.slo_ttft, slo_itl_ms=a.slo_itl,
                             ideal_hit_rate=ideal_hit_rate(requests), meta=meta)
    label = a.label or f"sim {cfg.label()} x{cfg.num_workers} @{cfg.speed:g}x"
    write_outputs(report, label, a.json, a.plot, res.results, res.arrivals_s, a.plots)
    print(f"simulated {report.duration_s:.1f} s of fleet time in {res.stats.wall_s:.2f} s "
          f"({res.stats.steps} engine steps)", file=sys.stderr)
    if res.stats.onboarded_blocks:
        print(f"KV tiers: {res.stats.onboarded_blocks} blocks onboarded from host/disk", file=sys.stderr)
    if cfg.disaggregated:
        split = ", ".join(f"{k} {v:.1f}" for k, v in res.stats.ttft_split.items())
        print(f"disaggregated: decisions {res.stats.decisions}, {res.stats.pulled_blocks} blocks pulled; "
              f"TTFT parts p50 (ms): {split}", file=sys.stderr)
    return 0 if report.errors == 0 else 1


__all__ = ["add_simulate_args", "main_from_args"]
