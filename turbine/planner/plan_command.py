"""`turbine plan`: the deployment for a workload and an SLA, before buying GPUs.

    turbine plan --profile bench/profiles/h100_llama3-8b_bf16.json --gpus 8 \\
        --isl 4000 --osl 500 --ttft-ms 600 --itl-ms 20 --out plan/
    turbine plan --model deepseek-v3 --gpu h200 --calibration bench/profiles/h200_llama3-8b_bf16.json \\
        --gpus 16 --trace trace.jsonl --ttft-ms 2000 --itl-ms 50
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from turbine.bench.stats import render_table
from turbine.bench.trace import TraceRequest, ideal_hit_rate, load_trace
from turbine.planner.commands import deployment_commands
from turbine.planner.model_shape import get_shape
from turbine.planner.perf_model import PerfModel
from turbine.planner.plan import Candidate, PlanInputs, PlanResult, plan, summary
from turbine.planner.steady_state import Sla, Workload
from turbine.planner.workloads import LengthDist, synthetic_requests


def add_model_args(g: argparse._ActionsContainer) -> None:
    """The performance model's inputs (shared by `plan` and `planner`)."""
    g.add_argument("--profile", default=None,
                   help="a measured TP=1 step-time profile of this model on this GPU (`turbine profile`): "
                   "predictions are anchored to it")
    g.add_argument("--model", default=None,
                   help="model shape: a name (llama3.1-8b, llama3.1-70b, qwen3-30b-a3b, qwen3-235b-a22b, deepseek-v3) "
                   "or an HF model directory / config.json (default: the profile's model)")
    g.add_argument("--gpu", default=None, help="h100, h200 or b200 (default: the profile's device)")
    g.add_argument("--calibration", default=None,
                   help="without a profile of this model: a dense model's profile on the same GPU, to fit the "
                   "step overheads and matmul efficiency")


def add_plan_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and hardware")
    add_model_args(g)
    g.add_argument("--gpus", type=int, required=True, help="GPU budget")
    g.add_argument("--max-gpus-per-worker", type=int, default=8, help="largest layout (TP x PP, or EP) of one worker")
    g.add_argument("--max-num-batched-tokens", type=int, default=8192, help="token budget of one engine step")
    g.add_argument("--mode", default="agg,disagg", help="configurations to consider: agg, disagg or both")
    g.add_argument("--transfer-gbps", type=float, default=25.0, help="disaggregated: KV link GB/s per decode worker")
    g = p.add_argument_group("SLA")
    g.add_argument("--ttft-ms", type=float, required=True, help="time to first token target")
    g.add_argument("--itl-ms", type=float, required=True, help="inter-token latency target (per-request mean)")
    g.add_argument("--percentile", type=float, default=90.0, help="share of requests the targets hold for (simulated)")
    g = p.add_argument_group("workload (a trace, or length distributions)")
    g.add_argument("--trace", default=None, help="Mooncake-format JSONL trace (lengths, prefixes, arrivals)")
    g.add_argument("--isl", default=None, help="prompt tokens: mean[:cv], e.g. 4000 or 4000:0.3")
    g.add_argument("--osl", default=None, help="output tokens: mean[:cv]")
    g.add_argument("--shared-prefix-tokens", type=int, default=0, help="with --isl: tokens every prompt shares")
    g.add_argument("--rate", type=float, default=None,
                   help="requests/s to serve (default: a trace's own rate; with --isl/--osl, as many as the "
                   "budget allows)")
    g = p.add_argument_group("checking and output")
    g.add_argument("--no-simulate", action="store_true", help="steady-state model only; no simulator check")
    g.add_argument("--checks", type=int, default=4, help="deployments to replay through the simulator")
    g.add_argument("--sim-requests", type=int, default=1000, help="requests per simulation (distributions)")
    g.add_argument("--model-path", default="MODEL_DIR", help="checkpoint path written into the printed commands")
    g.add_argument("--out", type=Path, default=None, help="write plan.json, frontier.png and the layouts' profiles here")
    g.add_argument("--top", type=int, default=8, help="front points printed per mode")


def model_from_args(a: argparse.Namespace) -> PerfModel:
    profile = _read_json(a.profile) if a.profile else None
    meta = (profile or {}).get("meta") or {}
    name = a.model or meta.get("model")
    if not name:
        raise ValueError("name the model (--model) or give a profile whose meta names it")
    gpu = a.gpu or meta.get("device")
    if not gpu:
        raise ValueError("name the GPU (--gpu h100|h200|b200) or give a profile whose meta names it")
    calibration = _read_json(a.calibration) if a.calibration else None
    return PerfModel(get_shape(str(name)), str(gpu), profile=profile, calibration=calibration)


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def _trace_rate(reqs: list[TraceRequest]) -> float:
    span = (reqs[-1].timestamp_ms - reqs[0].timestamp_ms) / 1e3
    return (len(reqs) - 1) / span if span > 0 else float(len(reqs))


def _workload(a: argparse.Namespace) -> tuple[Workload, Any, float | None]:
    """The mean shape, a request source for the simulator (rate -> requests), and the rate asked."""
    if a.trace:
        if a.isl or a.osl:
            raise ValueError("give --trace or --isl/--osl, not both")
        reqs = load_trace(a.trace)
        wl = Workload(isl=sum(r.input_length for r in reqs) / len(reqs),
                      osl=sum(r.output_length for r in reqs) / len(reqs), prefix_hit=min(0.95, ideal_hit_rate(reqs)))
        own = _trace_rate(reqs)

        def scaled(rate: float) -> list[TraceRequest]:
            f = rate / own
            return [msgspec.structs.replace(r, timestamp_ms=r.timestamp_ms / f) for r in reqs]

        return wl, scaled, a.rate or own
    if not (a.isl and a.osl):
        raise ValueError("give a workload: --trace FILE, or --isl and --osl")
    isl, osl = LengthDist.parse(a.isl), LengthDist.parse(a.osl)
    if a.shared_prefix_tokens < 0:
        raise ValueError("--shared-prefix-tokens must be >= 0")
    hit = min(a.shared_prefix_tokens // 512 * 512, isl.mean) / isl.mean
    wl = Workload(isl=isl.mean, osl=osl.mean, prefix_hit=min(0.95, hit))
    n = a.sim_requests
    return wl, (lambda rate: synthetic_requests(n, isl, osl, rate, shared_prefix_tokens=a.shared_prefix_tokens)), a.rate


def main_from_args(a: argparse.Namespace) -> int:
    try:
        model = model_from_args(a)
        wl, source, rate = _workload(a)
        modes = tuple(m.strip() for m in a.mode.split(",") if m.strip())
        if a.checks < 1 or a.sim_requests < 50 or a.max_num_batched_tokens < 1 or a.max_gpus_per_worker < 1:
            raise ValueError("--checks >= 1, --sim-requests >= 50, --max-num-batched-tokens and "
                             "--max-gpus-per-worker >= 1")
        inp = PlanInputs(model=model, sla=Sla(a.ttft_ms, a.itl_ms), workload=wl, gpu_budget=a.gpus, rate=rate,
                         percentile=a.percentile, max_gpus_per_worker=a.max_gpus_per_worker,
                         token_budget=a.max_num_batched_tokens, transfer_gbps=a.transfer_gbps, modes=modes)
    except ValueError as e:
        print(f"turbine plan: {e}", file=sys.stderr)
        return 2
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
    res = plan(inp, None if a.no_simulate else source, max_checks=a.checks,
               profile_dir=a.out / "profiles" if a.out is not None else None,
               progress=lambda msg: print(f"  {msg}", file=sys.stderr))
    print(render_report(res, model_path=a.model_path, top=a.top))
    if a.out is not None:
        (a.out / "plan.json").write_text(json.dumps(summary(res), indent=2, default=_jsonable) + "\n")
        from turbine.bench.report import try_plot
        from turbine.planner.frontier_plot import plot_frontier

        why = try_plot(plot_frontier, res, str(a.out / "frontier.png"))
        print(f"\nwrote {a.out / 'plan.json'}" + (f" ({why})" if why else f", {a.out / 'frontier.png'}"))
    if not res.ranked:
        return 1
    return 0 if (a.no_simulate or res.recommended is not None) else 1


def _jsonable(v: Any) -> Any:
    return vars(v) if hasattr(v, "__dict__") else str(v)


def _f(v: float | None, d: int = 1) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def render_report(res: PlanResult, *, model_path: str = "MODEL_DIR", top: int = 8) -> str:
    inp = res.inputs
    wl = inp.workload
    out = [f"{inp.model.shape.name} on up to {inp.gpu_budget}x {inp.model.gpu.name}; ISL {wl.isl:.0f}, OSL {wl.osl:.0f}, "
           f"prefix hit {wl.prefix_hit:.0%}; SLA TTFT <= {inp.sla.ttft_ms:g} ms, ITL <= {inp.sla.itl_ms:g} ms "
           f"(p{inp.percentile:g}); rate {'as high as the budget allows' if not inp.rate else f'{inp.rate:.2f} req/s'}",
           f"{len(res.points)} configurations scored; step overheads {inp.model.overhead_ms:.2f} ms (decode) / "
           f"{inp.model.prefill_overhead_ms:.2f} ms (prefill), matmul efficiency {inp.model.gpu.mma_efficiency:.2f}"]
    for mode, front in res.front.items():
        out.append(f"\nPareto front, {mode} (within the SLA by the steady-state model):")
        rows = [[p.label, _f(p.tokens_per_s_user), _f(p.tokens_per_s_gpu, 0), _f(p.ttft_ms), _f(p.itl_ms, 2)]
                for p in _spread(front, top)]
        out.append(render_table(["configuration", "tok/s/user", "tok/s/GPU", "TTFT ms", "ITL ms"], rows) if rows
                   else "  (no configuration meets the SLA)")
    if res.checked:
        q = f"p{inp.percentile:g}"
        out.append("\nChecked in the simulator (predicted = steady-state model; simulated = trace replay):")
        rows = [_cand_row(c, c is res.recommended) for c in res.checked]
        out.append(render_table(["deployment", "GPUs", "pred cap req/s", "pred TTFT/ITL ms", "rate req/s",
                                 f"sim TTFT {q}", f"sim ITL {q}", "in SLA", "sim max req/s"], rows))
    rec = res.recommended
    if rec is not None:
        d = rec.deployment
        out.append(f"\nRecommended: {d.label}")
        out.append(f"  predicted: {d.point.tokens_per_s_gpu:.0f} tok/s/GPU at {d.point.tokens_per_s_user:.1f} tok/s/user, "
                   f"TTFT {d.point.ttft_ms:.0f} ms, ITL {d.point.itl_ms:.1f} ms, {d.capacity_rps:.2f} req/s")
        if rec.max_rate:
            out.append(f"  simulated: holds the SLA up to {rec.max_rate:.2f} req/s ({rec.max_rate / d.gpus:.3f} per GPU)")
        out.append("  start it with:")
        out += [f"    {line}" for line in deployment_commands(d, model=model_path, token_budget=inp.token_budget,
                                                             gpus_per_node=inp.model.gpu.gpus_per_node)]
    elif res.checked:
        out.append("\nNo simulated deployment met the SLA; see the table (more GPUs, a looser SLA, or shorter prompts).")
    elif not res.ranked:
        out.append("\nNo configuration meets the SLA within the budget, even by the steady-state model.")
    return "\n".join(out)


def _spread(front: list, n: int) -> list:
    if len(front) <= n:
        return front
    step = (len(front) - 1) / (n - 1)
    return [front[round(i * step)] for i in range(n)]


def _cand_row(c: Candidate, chosen: bool) -> list[str]:
    d, s = c.deployment, c.at_rate
    return [("* " if chosen else "  ") + d.label, str(d.gpus), _f(d.capacity_rps, 2),
            f"{d.point.ttft_ms:.0f} / {d.point.itl_ms:.1f}", _f(s.rate, 2), _f(s.ttft_ms, 0), _f(s.itl_ms, 1),
            f"{s.attainment:.0%}", _f(c.max_rate, 2)]


__all__ = ["add_model_args", "add_plan_args", "main_from_args", "model_from_args", "render_report"]
