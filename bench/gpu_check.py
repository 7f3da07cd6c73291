"""GPU check of the built-in engine, in one device call (issue 4).

1. Build a random-weight checkpoint with Turbine's own model maker (default preset llama3-8b:
   config, tokenizer trained locally, bf16 safetensors generated on the GPU, ~16 GB).
2. Load it through Turbine's loader and compare its logits with HF transformers' on the same
   checkpoint, in the serving dtype, on a few random prompts:
       rel_err = ||logits_turbine - logits_hf||_F / ||logits_hf||_F   (all positions)
   bounds: bf16/fp16 rel_err <= 5e-2, and Turbine's error against HF run in float32 at most
   2x HF's own bf16 error (+1e-3); float32 rel_err <= 1e-4. HF's model is freed afterwards.
3. On CUDA with triton: the Triton paged-decode kernel against the portable SDPA path (bf16),
   elementwise |triton - sdpa| <= 1e-2 * (1 + |sdpa|).
4. Serve a short batch through BuiltinEngine (default 8 requests, 128 in / 64 out, all at
   once, after a warm-up request): output tokens/s, TTFT, inter-token latency, KV blocks.

Writes gpu_check.json and gpu_check.md (a snippet for bench/RESULTS.md) under --out (default
$OUT, else ./gpu_check_out) and exits 1 if a check fails.

    python3 bench/gpu_check.py                               # H100: llama3-8b, bf16
    python3 bench/gpu_check.py --layers 8                    # REDUCED depth, reported as such
    python3 bench/gpu_check.py --preset tiny --device cpu    # the CPU path (tests run this)
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from turbine.engine.builtin_core import BuiltinConfig, BuiltinCore, resolve_device
from turbine.engine.builtin_engine import BuiltinEngine
from turbine.engine.loader import load_model
from turbine.engine.paged_attention import CausalAttention
from turbine.model_maker.make_model import make_model
from turbine.model_maker.presets import get_preset
from turbine.model_maker.weights import write_random_weights
from turbine.protocols.generate import GenerateRequest, SamplingOptions, StopConditions

REL_BOUND = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}
KERNEL_BOUND = 1e-2  # |triton - sdpa| <= KERNEL_BOUND * (1 + |sdpa|), elementwise


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_checkpoint(args: argparse.Namespace, device: torch.device) -> tuple[Path, dict[str, Any]]:
    preset = get_preset(args.preset)
    if args.layers:
        preset = dataclasses.replace(preset, name=f"{preset.name}-{args.layers}l", num_hidden_layers=args.layers)
    path = Path(args.dir or f"/tmp/turbine-gpu-check/{preset.name}")
    info: dict[str, Any] = {"preset": args.preset, "num_hidden_layers": preset.num_hidden_layers,
                            "reduced_layers": bool(args.layers), "dir": str(path)}
    if args.reuse and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        info["make_s"] = 0.0
        log(f"reusing the checkpoint in {path}")
    else:
        t = time.perf_counter()
        make_model(path, preset, overwrite=True,
                   write_weights=lambda d, c: write_random_weights(d, c, device=device))
        info["make_s"] = round(time.perf_counter() - t, 1)
    info["weights_GB"] = round(sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e9, 3)
    log(f"checkpoint {path}: {info['weights_GB']} GB, {preset.num_hidden_layers} layers, made in {info['make_s']} s")
    return path, info


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@torch.inference_mode()
def check_logits(model: Any, path: Path, dtype: torch.dtype, device: torch.device,
                 args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (args.prompt_len,), generator=g) for _ in range(args.prompts)]
    ours = []
    for p in prompts:
        ids = p.to(device)
        hidden = model.forward(ids, torch.arange(len(p), device=device), CausalAttention([len(p)]))
        ours.append(model.compute_logits(hidden).float().cpu())
    t = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    log(f"transformers loaded in {time.perf_counter() - t:.1f} s")
    theirs = [hf(p[None].to(device)).logits[0].float().cpu() for p in prompts]
    errs = [rel_err(a, b) for a, b in zip(ours, theirs, strict=True)]
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ours, theirs, strict=True))
    bound = REL_BOUND[dtype]
    res: dict[str, Any] = {"prompts": len(prompts), "prompt_len": args.prompt_len, "dtype": str(dtype),
                           "rel_err_max": max(errs), "rel_err_mean": statistics.fmean(errs), "rel_bound": bound,
                           "argmax_agreement": round(agree / (len(prompts) * args.prompt_len), 4)}
    ok = max(errs) <= bound
    if dtype != torch.float32:  # both against HF in float32: is Turbine's rounding like HF's?
        hf.float()
        ref = [hf(p[None].to(device)).logits[0].float().cpu() for p in prompts]
        ours_err = max(rel_err(a, r) for a, r in zip(ours, ref, strict=True))
        hf_err = max(rel_err(b, r) for b, r in zip(theirs, ref, strict=True))
        res.update(turbine_vs_fp32=ours_err, hf_vs_fp32=hf_err, fp32_bound=2 * hf_err + 1e-3)
        ok = ok and ours_err <= 2 * hf_err + 1e-3
    res["ok"] = ok
    del hf
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log(f"logits: rel_err max {res['rel_err_max']:.2e} (bound {bound:.0e}), argmax agreement "
        f"{res['argmax_agreement']:.2%}, ok={ok}")
    return res


def check_triton_kernel(device: torch.device) -> dict[str, Any]:
    """Paged decode on random bf16 blocks: Triton kernel vs the SDPA gather path."""
    from turbine.engine.decode_kernel import paged_decode_triton
    from turbine.engine.kv_cache import KVCache, KVCacheSpec
    from turbine.engine.paged_attention import AttentionMetadata, PagedAttention

    h, hkv, d, bs = 32, 8, 128, 16
    cache = KVCache(KVCacheSpec(num_layers=1, num_kv_heads=hkv, head_dim=d, block_size=bs, dtype=torch.bfloat16),
                    4096, device)
    g = torch.Generator(device=device).manual_seed(0)
    cache.data.normal_(generator=g)
    lens = [1, 15, 16, 17, 300, 1024, 2049, 77]
    perm = torch.randperm(4096, device=device, generator=g)
    width = max(-(-n // bs) for n in lens)
    tables = perm[: len(lens) * width].view(len(lens), width)
    q = torch.randn(len(lens), h, d, device=device, dtype=torch.bfloat16, generator=g)
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.int64, device=device),
                             query_start_loc=torch.arange(len(lens) + 1, device=device),
                             context_lens=torch.tensor(lens, device=device), block_tables=tables,
                             num_decodes=len(lens), query_lens_host=(1,) * len(lens), context_lens_host=tuple(lens))
    ref = PagedAttention(cache, h, decode_kernel="torch")._decode_torch(q, cache.key(0), cache.value(0), meta)
    out = paged_decode_triton(q, cache.key(0), cache.value(0), tables, meta.context_lens, d ** -0.5)
    diff = (out.float() - ref.float()).abs()
    err = float(diff.max())
    ok = bool((diff <= KERNEL_BOUND * (1 + ref.float().abs())).all())  # |d| <= 1e-2 + 1e-2 |ref|
    log(f"triton decode kernel vs SDPA: max abs diff {err:.2e} (bound {KERNEL_BOUND} x (1 + |ref|)), ok={ok}")
    return {"max_abs_diff": err, "max_abs_ref": float(ref.float().abs().max()), "bound": KERNEL_BOUND, "ok": ok}


@torch.inference_mode()
def dense_greedy(model: Any, prompt: list[int], n: int, device: torch.device) -> list[int]:
    toks = list(prompt)
    for _ in range(n):
        hidden = model.forward(torch.tensor(toks, device=device), torch.arange(len(toks), device=device),
                               CausalAttention([len(toks)]))
        toks.append(int(model.compute_logits(hidden[-1:]).argmax(-1)))
    return toks[len(prompt):]


async def serve(engine: BuiltinEngine, prompts: list[list[int]], out_len: int) -> dict[str, Any]:
    def req(i: int, p: list[int], n: int) -> GenerateRequest:
        return GenerateRequest(request_id=f"r{i}", token_ids=p, sampling=SamplingOptions(temperature=0.0),
                               stop=StopConditions(max_tokens=n, min_tokens=n, ignore_eos=True))

    async def one(r: GenerateRequest, t0: float) -> tuple[float, float, list[int]]:
        first = None
        toks: list[int] = []
        async for d in engine.generate(r):
            if first is None and d.token_ids:
                first = time.perf_counter() - t0
            toks.extend(d.token_ids)
        return first or 0.0, time.perf_counter() - t0, toks

    await engine.start()
    try:
        await one(req(-1, list(range(1, 18)), 4), time.perf_counter())  # warm-up: kernels compile
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(req(i, p, out_len), t0) for i, p in enumerate(prompts)))
        wall = time.perf_counter() - t0
    finally:
        await engine.stop()
    ttft = [r[0] * 1000 for r in results]
    itl = [(r[1] - r[0]) * 1000 / max(1, len(r[2]) - 1) for r in results]
    n_out = sum(len(r[2]) for r in results)
    return {"requests": len(prompts), "input_len": len(prompts[0]), "output_len": out_len, "wall_s": round(wall, 3),
            "output_tokens": n_out, "output_tok_s": round(n_out / wall, 1),
            "total_tok_s": round((n_out + sum(map(len, prompts))) / wall, 1),
            "ttft_ms_p50": round(statistics.median(ttft), 1), "ttft_ms_max": round(max(ttft), 1),
            "itl_ms_mean": round(statistics.fmean(itl), 2), "tokens": [r[2] for r in results]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=0, help="REDUCED depth (0 = the preset's); stated in the output")
    ap.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--dir", default=None, help="checkpoint directory (default /tmp/turbine-gpu-check/<preset>)")
    ap.add_argument("--reuse", action="store_true", help="reuse a checkpoint already in --dir")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out")
    ap.add_argument("--prompts", type=int, default=4, help="prompts of the logits check")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--num-gpu-blocks", type=int, default=None)
    ap.add_argument("--skip-hf", action="store_true", help="no transformers comparison")
    args = ap.parse_args(argv)

    device, dtype = resolve_device(args.device, args.dtype)
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
                              "python": platform.python_version(), "device": str(device), "dtype": str(dtype)}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    log(f"device {report.get('gpu', device)}, dtype {dtype}, torch {torch.__version__}")
    ok = True
    path, report["checkpoint"] = build_checkpoint(args, device)

    t = time.perf_counter()
    model, cfg = load_model(path, dtype=dtype, device=device)
    report["load_s"] = round(time.perf_counter() - t, 1)
    log(f"Turbine loader: {report['load_s']} s")
    if not args.skip_hf:
        report["logits"] = check_logits(model, path, dtype, device, args, cfg.vocab_size)
        ok &= report["logits"]["ok"]
    from turbine.engine.paged_attention import triton_available

    if device.type == "cuda" and triton_available():
        report["triton_decode"] = check_triton_kernel(device)
        ok &= report["triton_decode"]["ok"]

    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, cfg.vocab_size, (args.input_len,), generator=g).tolist() for _ in range(args.requests)]
    config = BuiltinConfig(device=str(device), dtype=str(dtype).removeprefix("torch."),
                           gpu_memory_utilization=args.gpu_memory_utilization, num_gpu_blocks=args.num_gpu_blocks,
                           max_num_batched_tokens=8192 if device.type == "cuda" else 512)
    t = time.perf_counter()
    core = BuiltinCore(model, cfg, config)
    engine = BuiltinEngine.from_core(core)
    kv = core.kv_cache
    report["engine"] = {"init_s": round(time.perf_counter() - t, 1), "num_kv_blocks": engine.num_kv_blocks,
                        "block_size": engine.block_size, "kv_cache_GB": round(kv.nbytes / 1e9, 2),
                        "kv_tokens": engine.num_kv_blocks * engine.block_size,
                        "decode_kernel": "triton" if core.runner.attn.use_triton else "torch"}
    log(f"engine: {report['engine']}")
    serving = asyncio.run(serve(engine, prompts, args.output_len))
    n_check = min(16, args.output_len)
    ref = dense_greedy(model, prompts[0], n_check, device)
    got = serving.pop("tokens")[0][:n_check]
    same = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), n_check)
    serving["greedy_prefix_match_vs_dense"] = f"{same}/{n_check}"
    report["serving"] = serving
    log(f"serving: {serving}")
    if device.type == "cuda":
        report["peak_allocated_GB"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    report["ok"] = bool(ok)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    log(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}; ok={ok}")
    return 0 if ok else 1


def markdown(r: dict[str, Any]) -> str:
    ck, eng, s = r["checkpoint"], r["engine"], r["serving"]
    depth = (f"**REDUCED to {ck['num_hidden_layers']} layers**" if ck["reduced_layers"]
             else f"{ck['num_hidden_layers']} layers")
    lines = [f"## gpu_check (built-in engine) — {r['date']}", "",
             f"- device: {r.get('gpu', r['device'])}, torch {r['torch']}, {r['dtype']}",
             (f"- checkpoint: preset {ck['preset']} ({depth}), {ck['weights_GB']} GB random weights made by "
              f"`turbine.model_maker` in {ck['make_s']} s; Turbine loader {r['load_s']} s")]
    if "logits" in r:
        lg = r["logits"]
        line = (f"- logits vs transformers ({lg['prompts']} prompts x {lg['prompt_len']} tokens, all positions): "
                f"rel. error max {lg['rel_err_max']:.2e} (bound {lg['rel_bound']:.0e}), argmax agreement "
                f"{lg['argmax_agreement']:.2%}")
        if "turbine_vs_fp32" in lg:
            line += (f"; against HF in float32: Turbine {lg['turbine_vs_fp32']:.2e}, HF's own {lg['dtype']} "
                     f"{lg['hf_vs_fp32']:.2e} (bound {lg['fp32_bound']:.2e})")
        lines.append(line + f" — {'ok' if lg['ok'] else 'FAILED'}")
    if "triton_decode" in r:
        tk = r["triton_decode"]
        lines.append(f"- Triton paged-decode kernel vs SDPA (bf16, 8 sequences, contexts 1-2049): max abs diff "
                     f"{tk['max_abs_diff']:.2e} (bound {tk['bound']} x (1 + |ref|)) — {'ok' if tk['ok'] else 'FAILED'}")
    lines.append(f"- KV cache: {eng['num_kv_blocks']} blocks x {eng['block_size']} tokens = {eng['kv_tokens']} tokens, "
                 f"{eng['kv_cache_GB']} GB; decode kernel {eng['decode_kernel']}")
    lines += ["", ("| requests | in | out | wall s | output tok/s | total tok/s | TTFT p50 ms | TTFT max ms | "
                   "ITL mean ms | greedy vs dense |"),
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
              (f"| {s['requests']} | {s['input_len']} | {s['output_len']} | {s['wall_s']} | {s['output_tok_s']} | "
               f"{s['total_tok_s']} | {s['ttft_ms_p50']} | {s['ttft_ms_max']} | {s['itl_ms_mean']} | "
               f"{s['greedy_prefix_match_vs_dense']} |"), ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
