"""Small-M linear layers on one GPU: cuBLAS vs turbine/engine/models/gemv.py's Triton kernel.

Llama-3.1-8B's decode shapes (qkv, o_proj, gate_up, down, lm_head) at M = 1, 2, 4, 8, 16 rows, bf16.
Each candidate is timed twice: inside a CUDA graph of 20 back-to-back calls (launch gaps excluded,
the decode step's situation) and eagerly (20 calls from Python); the figure is the median over
replays of time / 20. Calls rotate over several weight copies (>= 4, >= 400 MB together), so every
call streams its weight from HBM, not from the 50 MB L2. GB/s = weight bytes / time. cuBLAS runs as
``F.linear(x, w)`` and as the transposed product ``torch.mm(w, x.t()).t()``; Triton runs a pruned
sweep of ``GemvConfig``s (tile shape, split-K, warps, stages, tensor-core or register path), each
checked against F.linear first (max abs err / max abs ref < 1e-2 in float32).

The winner per (shape, M) is timed twice more: with PDL off (what programmatic dependent launch
buys between back-to-back linears) and, like cuBLAS's best, each call following a small torch
kernel in the graph (as in a model, where the predecessor does not trigger early; the torch
kernel's own time subtracted). Eager figures are host-bound (Python + Triton's launcher, ~50 us a
call on the lent H100's CPU): use the kernel inside CUDA graphs.

Prints a table and a ready-to-paste ``TUNED = {...}`` for gemv.py; writes every measurement and the
best config per (shape, M) to gemv_bench.json under --out (default $OUT, else the working dir).

    python3 bench/gemv_bench.py                      # H100: ~90 s (compiles ~30 variants)
    python3 bench/gemv_bench.py --shapes o_proj --ms 1 16
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from dataclasses import replace
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from turbine.engine.models.gemv import GemvConfig, default_config, small_m_linear

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
MS = (1, 2, 4, 8, 16)
CALLS = 20  # calls per timed graph / eager burst
SMS = 132
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[gemv_bench {time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def ceilings() -> dict[str, float]:
    """HBM copy (bytes read + written) and a read-only sum over 2 GiB, for scale."""
    x = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    x.fill_(1.0)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    res = {}
    for name, fn, nbytes in (("hbm_copy_GBps", lambda: y.copy_(x), 4 * x.numel()),
                             ("hbm_read_sum_GBps", lambda: x.sum(dtype=torch.float32), 2 * x.numel())):
        for _ in range(3):
            fn()
        s.record()
        for _ in range(10):
            fn()
        e.record()
        torch.cuda.synchronize()
        res[name] = round(nbytes / (s.elapsed_time(e) / 10) / 1e6, 1)
    return res


def candidates(m: int, n: int, k: int) -> list[GemvConfig]:
    """A pruned sweep: tensor-core tiles x the K splits that fill 132 SMs, and register-path tiles
    that fit the register budget for this M (one row: big tiles; 8 rows: small ones)."""
    out: list[GemvConfig] = []

    def add(cfg: GemvConfig) -> None:
        if cfg not in out:
            out.append(cfg)

    for bn, bk, warps, stages in ((32, 256, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3), (16, 512, 4, 3), (32, 512, 8, 3)):
        tiles = -(-n // bn)
        for split in (1, 2, 4):
            if split == 1 and tiles < SMS // 2:
                continue
            if split > 1 and (tiles >= SMS or k // split < 4 * bk):
                continue
            add(GemvConfig(bn, bk, split, warps, stages, True))
    reg = ((4, 1024, 4), (8, 1024, 4), (16, 1024, 4), (16, 1024, 8), (32, 1024, 8), (8, 2048, 8), (16, 512, 2)) \
        if m == 1 else ((2, 1024, 4), (4, 1024, 4), (8, 1024, 4), (4, 512, 4))
    for bn, bk, warps in reg:
        stages = 1
        cfg = GemvConfig(bn, bk, 1, warps, stages, False)
        try:
            cfg.validate(m)
        except ValueError:
            continue
        add(cfg)
        if -(-n // bn) < SMS:
            add(replace(cfg, split_k=2))
    add(default_config(m, n, k))
    return out


def graph_us(fns: list[Callable[[], Any]], reps: int) -> float:
    """Median microseconds per call of ``fns`` captured back to back in one CUDA graph."""
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles) outside capture, as torch advises
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    timed = []
    for _ in range(reps):
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        timed.append(s.elapsed_time(e) * 1000 / len(fns))
    return statistics.median(timed)


def eager_us(fns: list[Callable[[], Any]], reps: int) -> float:
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    timed = []
    for _ in range(reps):
        s.record()
        for fn in fns:
            fn()
        e.record()
        e.synchronize()
        timed.append(s.elapsed_time(e) * 1000 / len(fns))
    return statistics.median(timed)


def bench_shape(name: str, n: int, k: int, ms: tuple[int, ...], records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Every candidate at every M on this shape; returns the best of each M (with extra_checks)."""
    summary: dict[int, dict[str, Any]] = {}
    wbytes = n * k * 2
    copies = max(4, math.ceil(400e6 / wbytes))
    gen = torch.Generator(device="cuda").manual_seed(0)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02 for _ in range(copies)]
    est_us = wbytes / 2.8e6
    reps = max(10, min(50, int(100e3 / (CALLS * est_us))))
    log(f"{name}: N={n} K={k} {wbytes / 1e6:.1f} MB x {copies} copies, {reps} reps")
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        ref = F.linear(x.float(), ws[0].float())
        impls: list[tuple[str, GemvConfig | None, Callable[[torch.Tensor], torch.Tensor]]] = [
            ("cublas_linear", None, lambda w: F.linear(x, w)),
            ("cublas_mm_t", None, lambda w: torch.mm(w, x.t()).t()),
        ]
        for cfg in candidates(m, n, k):
            impls.append(("triton", cfg, lambda w, cfg=cfg: small_m_linear(x, w, config=cfg)))
        for impl, cfg, fn in impls:
            rec: dict[str, Any] = {"shape": name, "n": n, "k": k, "m": m, "impl": impl,
                                   "config": None if cfg is None else cfg.__dict__.copy()}
            try:
                got = fn(ws[0]).float()
                rec["rel_err"] = float((got - ref).abs().max() / ref.abs().max())
                rec["ok"] = rec["rel_err"] < 1e-2
                if rec["ok"]:
                    calls = [lambda i=i: fn(ws[i % copies]) for i in range(CALLS)]
                    g_us, e_us = graph_us(calls, reps), eager_us(calls, reps)
                    rec.update(graph_us=round(g_us, 2), eager_us=round(e_us, 2),
                               graph_GBps=round(wbytes / g_us / 1e3, 1), eager_GBps=round(wbytes / e_us / 1e3, 1))
            except Exception as ex:  # noqa: BLE001 - a config the compiler refuses is a result, not a crash
                rec.update(ok=False, error=repr(ex)[-400:])
            records.append(rec)
        done = [r for r in records if r["shape"] == name and r["m"] == m]
        best = summarize(done)
        extra_checks(name, m, x, ws, best, done, reps, wbytes)
        summary[m] = best
        bad = [r for r in done if not r.get("ok")]
        log(f"{name} M={m}: {len(done)} runs, cuBLAS {best['cublas_us']} us, Triton {best['triton_us']} us "
            f"({best['triton_GBps']} GB/s; PDL off {best.get('triton_nopdl_us')} us; after a torch op "
            f"{best.get('triton_between_us')} vs cuBLAS {best.get('cublas_between_us')})"
            f"{'  FAILED: ' + str(len(bad)) if bad else ''}")
        for r in bad:
            log(f"  failed {r['config']}: {r.get('error') or r.get('rel_err')}")
    del ws
    torch.cuda.empty_cache()
    return summary


def extra_checks(name: str, m: int, x: torch.Tensor, ws: list[torch.Tensor], best: dict[str, Any],
                 done: list[dict[str, Any]], reps: int, wbytes: int) -> None:
    """The winner without PDL, and winner and cuBLAS each following a small torch kernel (as in a
    model, where the predecessor is no PDL-aware gemv): per call, the torch kernel's time subtracted."""
    if best["config"] is None:
        return
    copies = len(ws)
    cfg = GemvConfig(**best["config"])
    nopdl = replace(cfg, pdl=False)
    best["triton_nopdl_us"] = round(graph_us([lambda i=i: small_m_linear(x, ws[i % copies], config=nopdl)
                                              for i in range(CALLS)], reps), 2)
    bump = torch.zeros(4096, device="cuda", dtype=torch.bfloat16)
    alone = graph_us([lambda: bump.add_(1.0)] * CALLS, reps)
    cub = F.linear if best["cublas_impl"] == "cublas_linear" else (lambda x_, w_: torch.mm(w_, x_.t()).t())
    for key, fn in (("triton_between_us", lambda w: small_m_linear(x, w, config=cfg)),
                    ("cublas_between_us", lambda w: cub(x, w))):
        fns = [f for i in range(CALLS) for f in (lambda i=i: fn(ws[i % copies]), lambda: bump.add_(1.0))]
        best[key] = round(2 * graph_us(fns, reps) - alone, 2)
    best["triton_between_GBps"] = round(wbytes / best["triton_between_us"] / 1e3, 1)


def summarize(done: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in done if r.get("ok") and "graph_us" in r]
    cub = [r for r in ok if r["impl"] != "triton"]
    tri = [r for r in ok if r["impl"] == "triton"]
    bc = min(cub, key=lambda r: r["graph_us"]) if cub else None
    bt = min(tri, key=lambda r: r["graph_us"]) if tri else None
    return {
        "cublas_us": bc and bc["graph_us"], "cublas_GBps": bc and bc["graph_GBps"], "cublas_impl": bc and bc["impl"],
        "cublas_eager_us": min((r["eager_us"] for r in cub), default=None),
        "triton_us": bt and bt["graph_us"], "triton_GBps": bt and bt["graph_GBps"], "config": bt and bt["config"],
        "triton_eager_us": bt and bt["eager_us"],
        "speedup": round(bc["graph_us"] / bt["graph_us"], 3) if bc and bt else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--ms", nargs="*", type=int, default=list(MS))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gemv_bench needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    import triton

    meta = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, **ceilings()}
    log(f"{meta}")
    records: list[dict[str, Any]] = []
    best: dict[str, dict[int, dict[str, Any]]] = {}
    for name in args.shapes:
        n, k = SHAPES[name]
        best[name] = bench_shape(name, n, k, tuple(args.ms), records)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemv_bench.json").write_text(json.dumps({"meta": meta, "best": best, "records": records}, indent=1))

    print(f"\n{'shape':8} {'M':>2} | {'cuBLAS us':>9} {'GB/s':>6} | {'Triton us':>9} {'GB/s':>6} {'speedup':>7} | "
          f"{'no PDL':>6} | {'after op: cuBLAS':>16} {'Triton':>6} | {'eager: cuBLAS':>13} {'Triton':>6} | config")
    for name, per_m in best.items():
        for m, b in per_m.items():
            c = b["config"]
            cfg = (f"bn={c['block_n']} bk={c['block_k']} split={c['split_k']} w={c['num_warps']} "
                   f"s={c['num_stages']} {'dot' if c['dot'] else 'reg'}") if c else "-"
            print(f"{name:8} {m:>2} | {b['cublas_us']!s:>9} {b['cublas_GBps']!s:>6} | "
                  f"{b['triton_us']!s:>9} {b['triton_GBps']!s:>6} {b['speedup']!s:>7} | {b.get('triton_nopdl_us')!s:>6} | "
                  f"{b.get('cublas_between_us')!s:>16} {b.get('triton_between_us')!s:>6} | "
                  f"{b['cublas_eager_us']!s:>13} {b['triton_eager_us']!s:>6} | {cfg}")
    print("\nTUNED: dict[tuple[int, int], dict[int, GemvConfig]] = {")
    for name, per_m in best.items():
        n, k = SHAPES[name]
        entries = ", ".join(f"{m}: {GemvConfig(**b['config'])!r}" for m, b in per_m.items() if b["config"])
        print(f"    ({n}, {k}): {{{entries}}},  # {name}")
    print("}")
    log(f"wrote {out / 'gemv_bench.json'}")


if __name__ == "__main__":
    main()
