"""The decode step's matmuls on their own (Llama-3-8B shapes at a batch of M rows): where the
non-attention time of a batch-256 decode step goes and what other GEMM back ends would make of it.

For each projection (qkv, o, gate_up, down, lm_head) at M = 64 and 256: cuBLAS through
``F.linear`` (torch's default heuristic), the cuBLASLt path (``preferred_blas_library``), and
Inductor's max-autotune (cuBLAS against its Triton templates, the winner reported); TFLOP/s
against the measured bf16 matmul rate. Also greedy sampling's cast of the logits to float32
against an argmax of the bf16 logits (exact: bf16 -> fp32 is lossless, so the index is the same).

    python3 bench/gemm_probe.py --out $OUT     # H200: ~2-3 min (Inductor compiles)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}


def bench_ms(fn, reps: int = 50) -> float:  # type: ignore[no-untyped-def]
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median"))


def peak_tflops(dev: torch.device) -> float:
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ a)
    return 2 * 8192 ** 3 / ms / 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "gemm_probe_out")
    ap.add_argument("--rows", default="64,256")
    ap.add_argument("--no-inductor", action="store_true")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    peak = peak_tflops(dev)
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                           "peak_TFLOPs": round(peak, 1), "rows": []}
    print(f"{res['gpu']}, bf16 matmul {peak:.1f} TFLOP/s", flush=True)
    for m in (int(x) for x in args.rows.split(",")):
        x = torch.randn(m, 4096, device=dev, dtype=torch.bfloat16)
        for name, (n, k) in SHAPES.items():
            xx = x if k == 4096 else torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
            flops = 2 * m * n * k
            row: dict[str, Any] = {"m": m, "proj": name, "n": n, "k": k}
            ref = F.linear(xx, w)
            row["cublas_us"] = round(bench_ms(lambda: F.linear(xx, w)) * 1e3, 1)
            try:
                torch.backends.cuda.preferred_blas_library("cublaslt")
                row["cublaslt_us"] = round(bench_ms(lambda: F.linear(xx, w)) * 1e3, 1)
            finally:
                torch.backends.cuda.preferred_blas_library("cublas")
            if not args.no_inductor:
                try:
                    import torch._inductor.config as icfg

                    icfg.max_autotune_gemm_backends = "ATEN,TRITON"
                    fn = torch.compile(lambda a, b: F.linear(a, b), mode="max-autotune-no-cudagraphs", dynamic=False)
                    got = fn(xx, w)
                    row["inductor_us"] = round(bench_ms(lambda: fn(xx, w)) * 1e3, 1)
                    row["inductor_rel_err"] = float((got.float() - ref.float()).norm() / ref.float().norm())
                except Exception as ex:  # noqa: BLE001 - a probe: report and go on
                    row["inductor_error"] = str(ex)[:200]
                torch._dynamo.reset()
            for key in [k for k in row if k.endswith("_us")]:
                row[key.replace("_us", "_TFLOPs")] = round(flops / (row[key] * 1e-6) / 1e12, 1)
            res["rows"].append(row)
            print(row, flush=True)
    logits = torch.randn(256, 128256, device=dev, dtype=torch.bfloat16)
    res["greedy"] = {"float_then_argmax_us": round(bench_ms(lambda: logits.float().argmax(-1)) * 1e3, 1),
                     "bf16_argmax_us": round(bench_ms(lambda: logits.argmax(-1)) * 1e3, 1),
                     "same": bool((logits.float().argmax(-1) == logits.argmax(-1)).all())}
    print(res["greedy"], flush=True)
    print("| M | proj | cuBLAS us (TFLOP/s) | cuBLASLt us (TFLOP/s) | Inductor us (TFLOP/s) |")
    print("|---:|---|---:|---:|---:|")
    for r in res["rows"]:
        print(f"| {r['m']} | {r['proj']} | {r['cublas_us']} ({r['cublas_TFLOPs']}) | {r['cublaslt_us']} "
              f"({r['cublaslt_TFLOPs']}) | {r.get('inductor_us', '-')} ({r.get('inductor_TFLOPs', '-')}) |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemm_probe.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
