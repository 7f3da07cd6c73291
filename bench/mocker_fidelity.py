"""Mocker fidelity, end to end in one command (issue 6): does the mocker, loaded with the built-in
engine's measured profile, reproduce the engine's TTFT and ITL?

1. Model: --model DIR, or a random-weight checkpoint of --preset (default llama3-8b, bf16, made
   on the device by Turbine's model maker; --reuse keeps one already in --dir).
2. Profile: the engine's step times through BuiltinCore (turbine.profiler), written to
   OUT/profile.json with OUT/prefill.png and OUT/decode.png. The grid (GPU; --quick: QUICK_GRID):
     prefill  new tokens 16..8192 (10 points) x cached 0 / 512 / 2048 (cached + new must stay
              under the context length: llama3-8b's 8192 cuts the top corner, extrapolated)
     decode   batch 1..256 (9 points) x context 128 / 512 / 1024 / 2048 / 4096, at most 200k
              prompt tokens prefilled per context (larger batches extrapolated, listed in meta)
     mixed    36 points of 16 / 64 / 256 / 512 / 768 / 1024 / 1536 / 2048 / 4096 new tokens with
              1 / 8 / 32 / 128 decodes at context ~1k (the profile's "mixed" grid)
     2 untimed + 5 timed steps per point, median.
3. Fidelity: one deterministic open-loop workload (208 requests in phases of target concurrency
   1, 4, 16, 64 with 8, 24, 48, 128 requests; prompts 64-2048 tokens log-uniform, half of them
   behind one of 4 shared 512-token prefixes; 16-128 output tokens) on BuiltinEngine in-process,
   then on the mocker with the same block size, KV blocks, max_num_seqs and
   max_num_batched_tokens: "profile" (MockEngine in real time with the file as `--profile`
   loads it: the number that counts), "profile@virtual" (the same timing on a virtual clock: no
   asyncio jitter, no wall time) and "additive@virtual" (the baseline: the profile without its
   mixed grid, mixed steps = prefill + decode, scheduled step by step). Both mocks of the profile
   schedule one step ahead when the engine did (meta.async_scheduling). Every real step is also
   checked against both timing models, and the real engine's time between steps is measured.
4. Diagnosis of the real run (turbine/profiler/diagnosis.py, "diagnosis" in fidelity.json): each
   request's TTFT split into queue (send -> first step carrying it), prefill (-> end of the step
   giving its first token) and delivery (-> the client sees it); the 10 slowest first tokens with
   the steps that ran while they waited; the 10 steps furthest above the profile's prediction
   (host time, GC, CUDA allocator retries / device allocs / frees); gaps between steps; GC pauses.
5. Prints the tables; writes OUT/fidelity.json, OUT/fidelity_cdf.png, OUT/fidelity_steps.png and
   OUT/mocker_fidelity.md, and appends that snippet to bench/RESULTS.md (--no-results: not; on a
   lent device machine the append is lost: copy OUT/mocker_fidelity.md over by hand).

    python3 bench/mocker_fidelity.py --no-progress                      # H100: llama3-8b, ~5 min
    python3 bench/mocker_fidelity.py --preset tiny --device cpu --quick   # CPU functional run
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from turbine.profiler.command import builtin_meta, builtin_sync, load_builtin_core, write_profile
from turbine.profiler.diagnosis import format_diagnosis
from turbine.profiler.fidelity import StepRecorder, format_fidelity, run_fidelity
from turbine.profiler.plots import plot_fidelity, plot_profile
from turbine.profiler.profile import QUICK_GRID, ProfileGrid, Profiler
from turbine.profiler.workload import WorkloadConfig

GPU_GRID = ProfileGrid(prefill_new_tokens=(16, 64, 256, 512, 768, 1024, 1536, 2048, 4096, 8192),
                       prefill_cached_tokens=(0, 512, 2048),
                       decode_batch_sizes=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                       decode_context_lengths=(128, 512, 1024, 2048, 4096),
                       mixed_new_tokens=(16, 64, 256, 512, 768, 1024, 1536, 2048, 4096),
                       mixed_batch_sizes=(1, 8, 32, 128),
                       warmup=2, repeats=5, decode_setup_tokens=200_000)
GPU_WORKLOAD = WorkloadConfig(phases=((1, 8), (4, 24), (16, 48), (64, 128)), prompt_tokens=(64, 2048),
                              output_tokens=(16, 128), prefix_groups=4, prefix_tokens=512, prefix_share=0.5,
                              warmup_requests=8)
QUICK_WORKLOAD = WorkloadConfig(phases=((1, 4), (4, 12), (16, 24)), prompt_tokens=(16, 256), output_tokens=(4, 16),
                                prefix_groups=2, prefix_tokens=64, prefix_share=0.5, warmup_requests=2)


def log(msg: str) -> None:
    print(f"[mocker_fidelity {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_checkpoint(args: argparse.Namespace) -> Path:
    if args.model is not None:
        return Path(args.model)
    import torch

    from turbine.model_maker.make_model import make_model
    from turbine.model_maker.presets import get_preset
    from turbine.model_maker.weights import write_random_weights

    preset = get_preset(args.preset)
    if args.layers:
        preset = dataclasses.replace(preset, name=f"{preset.name}-{args.layers}l", num_hidden_layers=args.layers)
    path = Path(args.dir or f"/tmp/turbine-fidelity/{preset.name}")
    if args.reuse and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        log(f"reusing the checkpoint in {path}")
        return path
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    make_model(path, preset, overwrite=True, write_weights=lambda d, c: write_random_weights(d, c, device=device))
    return path


def machine(meta: dict[str, Any]) -> str:
    if meta.get("device_type") == "cuda":
        return f"{meta['device']}, torch {meta['torch']}, {meta['dtype']}"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, torch {meta['torch']}, {meta['dtype']} (CPU)"


def markdown(report: dict[str, Any], table: str) -> str:
    m, cmp, prof = report["meta"], report["fidelity"], report["profile_meta"]
    w = cmp["workload"]
    model = (f"- model: {m['model']} ({m['layers']} layers{', REDUCED' if m['reduced'] else ''}); engine: block "
             f"size {prof['block_size']}, {prof['num_kv_blocks']} KV blocks, max_num_seqs {prof['max_num_seqs']}, "
             f"max_num_batched_tokens {prof['max_num_batched_tokens']}; mocker: the same")
    grid = (f"- profile: {m['grid']} grid measured in {prof['profile_s']} s ({len(prof['decode_filled'])} decode "
            f"and {len(prof['prefill_filled'])} prefill cells extrapolated)")
    work = (f"- workload: {w['requests']} requests in phases (target concurrency, requests) {w['phases']}, "
            f"prompts {w['prompt_tokens']} (mean {w['prompt_tokens_mean']}), outputs {w['output_tokens']} (mean "
            f"{w['output_tokens_mean']}), {w['prefix_share']:.0%} behind {w['prefix_groups']} shared "
            f"{w['prefix_tokens']}-token prefixes; open loop over {w['arrival_span_s']} s")
    mock_phases = cmp["mocks"].get("profile", {}).get("phases", {})
    conc = ", ".join(f"{v['concurrency']} / {mock_phases.get(k, {}).get('concurrency', '-')}"
                     for k, v in cmp["real"]["phases"].items())
    lines = [f"## mocker_fidelity — {m['date']}", "", f"- machine: {machine(prof)}", model, grid, work,
             f"- measured concurrency per phase (real / mock profile): {conc}",
             "", table, ""]
    gcs = cmp.get("gc")
    if gcs:
        lines.append("Python GC during each wall-clock run (the heap before it frozen): " + "; ".join(
            f"{k}: {v['pauses']} pauses, {v['total_ms']} ms, longest {v['longest_ms']} ms, {v['full']} full"
            for k, v in gcs.items()))
        lines.append("")
    lines.append("Real steps against the timing models (predicted / device time; median, p10-p90):")
    lines.append("")
    lines.append("| step kind | steps | profile | additive |")
    lines.append("|---|---:|---:|---:|")
    cad = cmp["steps"]["cadence"]
    for kind, a in cmp["steps"]["profile"].items():
        b = cmp["steps"]["additive"].get(kind, {})
        lines.append(f"| {kind} | {a['steps']} | {a['median']} ({a['p10']}-{a['p90']}) | "
                     f"{b.get('median', '-')} ({b.get('p10', '-')}-{b.get('p90', '-')}) |")
    lines.append(f"\nReal engine cadence: {cad['steps']} steps, step p50 {cad['step_ms_p50']} ms, time between one "
                 f"step's end and the next one's start p50 {cad['between_ms_p50']} ms, p90 {cad['between_ms_p90']} ms")
    mixed = prof.get("mixed")
    if mixed:
        lines += ["", f"Profiler's mixed steps at context ~{mixed['context_length']} (new tokens x decodes: "
                  "measured ms, additive / measured): " + "; ".join(
                      f"{p['new_tokens']}x{p['batch_size']}: {p['ms']:.1f}, {p['additive_over_measured']}"
                      for p in mixed["points"])]
    diag = cmp.get("diagnosis")
    if diag:
        lines += ["", "Where the real engine's time went (turbine/profiler/diagnosis.py):", "",
                  format_diagnosis(diag, markdown=True)]
    lines.append(f"\nStages (s): {report['stages_s']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="an HF-format model directory (default: make --preset)")
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=0, help="REDUCED depth (0 = the preset's); stated in the output")
    ap.add_argument("--dir", default=None, help="checkpoint directory (default /tmp/turbine-fidelity/<preset>)")
    ap.add_argument("--reuse", action="store_true", help="reuse a checkpoint already in --dir")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-gpu-blocks", type=int, default=None)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="default 8192 (GPU), 2048 (--quick)")
    ap.add_argument("--profile", default=None, help="use this profile instead of measuring one")
    ap.add_argument("--variants", default="profile,profile@virtual,additive@virtual",
                    help="mock runs: profile | additive timing, on a MockEngine in real time or @virtual clock")
    ap.add_argument("--quick", action="store_true", help="small grid and workload (CPU tests)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "mocker_fidelity_out")
    ap.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--switch-interval", type=float, default=0.0,
                    help="sys.setswitchinterval for the run (s; 0 = unchanged): how long the GIL stays with "
                    "the step thread while the event loop waits to deliver tokens")
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch.set_num_threads (CPU: 1 keeps a busy small machine from thrashing; 0 = unchanged)")
    args = ap.parse_args(argv)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    t = time.perf_counter()
    path = build_checkpoint(args)
    stages["checkpoint"] = round(time.perf_counter() - t, 1)
    log(f"checkpoint {path} ({stages['checkpoint']} s)")

    t = time.perf_counter()
    budget = args.max_num_batched_tokens or (2048 if args.quick else 8192)
    core = load_builtin_core(path, device=args.device, dtype=args.dtype, block_size=args.block_size,
                             num_gpu_blocks=args.num_gpu_blocks, gpu_memory_utilization=args.gpu_memory_utilization,
                             max_num_seqs=args.max_num_seqs, max_num_batched_tokens=budget)
    meta = builtin_meta(core, path)
    stages["load"] = round(time.perf_counter() - t, 1)
    log(f"engine on {meta['device']} ({meta['dtype']}): {core.num_kv_blocks} KV blocks of {core.config.block_size}, "
        f"loaded in {stages['load']} s")

    t = time.perf_counter()
    if args.profile:
        profile_path = Path(args.profile)
        profile = json.loads(profile_path.read_text())
    else:
        grid = QUICK_GRID if args.quick else GPU_GRID
        profile = Profiler(core, grid, sync=builtin_sync(core), progress=not args.no_progress).run()
        profile["meta"] = {**meta, "grid": "quick" if args.quick else "bench", **profile["meta"]}
        profile_path = write_profile(out / "profile.json", profile)
        for line in plot_profile(profile, out):
            log(line)
    stages["profile"] = round(time.perf_counter() - t, 1)
    log(f"profile {profile_path} ({stages['profile']} s)")

    t = time.perf_counter()
    from turbine.engine.builtin_engine import BuiltinEngine

    recorder = StepRecorder(core)
    try:
        res = asyncio.run(run_fidelity(BuiltinEngine.from_core(core), str(profile_path), vocab_size=core.vocab_size,
                                       max_num_batched_tokens=core.config.max_num_batched_tokens,
                                       workload=QUICK_WORKLOAD if args.quick else GPU_WORKLOAD,
                                       variants=tuple(v for v in args.variants.split(",") if v), recorder=recorder))
    finally:
        recorder.close()
    stages["fidelity"] = round(time.perf_counter() - t, 1)
    for line in plot_fidelity(res.samples, res.steps, out, title=f"{meta['model']} on {meta['device']}"):
        log(line)
    n_layers = json.loads((path / "config.json").read_text()).get("num_hidden_layers")
    report = {"meta": {**meta, "layers": n_layers, "reduced": bool(args.layers) and args.model is None,
                       "grid": "quick" if args.quick else "bench"},
              "profile_meta": profile.get("meta", {}), "fidelity": res.comparison, "stages_s": stages,
              # every real step, for offline analysis: start (ms from the first), ms, host ms, shape
              "real_steps": {"columns": ["start_ms", "ms", "host_ms", "prefill_tokens", "prefill_context",
                                         "decode_seqs", "decode_context", "device_ms"],
                             "rows": [[round((r.start_s - recorder.records[0].start_s) * 1e3, 3), round(r.ms, 3),
                                       None if r.host_s is None else round(r.host_s * 1e3, 3), r.prefill_tokens,
                                       round(r.prefill_context, 1), r.decode_seqs, round(r.decode_context, 1),
                                       None if r.device_ms is None else round(r.device_ms, 3)]
                                      for r in recorder.records]}}
    (out / "fidelity.json").write_text(json.dumps(report, indent=1) + "\n")
    print(format_fidelity(res.comparison))
    if "diagnosis" in res.comparison:
        print("\n" + format_diagnosis(res.comparison["diagnosis"], top=5))
    snippet = markdown(report, format_fidelity(res.comparison, markdown=True))
    (out / "mocker_fidelity.md").write_text(snippet)
    if not args.no_results:
        results = Path(__file__).resolve().parent / "RESULTS.md"
        with results.open("a", encoding="utf-8") as f:
            f.write("\n" + snippet)
        log(f"appended to {results}")
    met = all(res.comparison["mocks"].get("profile", {}).get("met", {}).values())
    log(f"wrote {out}/fidelity.json and mocker_fidelity.md; stages {stages}; targets met (profile): {met}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
