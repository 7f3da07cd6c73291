"""Where the batch-256 decode step's last milliseconds could come from (H200, Llama-3-8B shapes).

Three questions, each timed on the device in one process:

1. Read ceiling: how fast can a kernel only *read* HBM (the limit in gpu_perf counts the copy
   bandwidth, bytes read + written)? A streaming Triton reduction over 2 GiB, several launches,
   against torch's copy; then the paged-decode kernel on one layer's KV at batch 256 and a kernel
   that reads the same paged tiles and does no math, to split "access pattern" from "math".
2. Overlap inside the attention block: with the heads cut in two halves, the second half's qkv
   projection and the first half's o projection have no dependency on the other half's attention,
   so they can run on a second stream while it reads KV. Captured in CUDA graphs over 4 layers
   (distinct weights and caches, so nothing stays in L2): qkv -> attention -> o as one stream
   against the two-stream pipeline, with the GEMM stream at high and at normal priority.
3. Concurrency at all: one layer's full attention and an independent gate_up GEMM on two streams,
   against the two one after the other.
4. ``layouts``: the same KV bytes through other access patterns (all heads of a token per program,
   block tables in order, head-major pages, 32-token pages), read-only and through the kernel.
5. ``stream_read``: the paged read cut into equal shares per program (no tail wave) at 2-32
   programs per SM, and the decode kernel with its context split 1-8 ways.

    python3 bench/decode_overlap_probe.py --out $OUT [--sections a,b]   # H200: ~20 s a section
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCH, CTX, BS, HKV, H, D, HIDDEN = 256, 1088, 16, 8, 32, 128, 4096


def bench_ms(fn: Callable[[], Any], rep: int = 100) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=20, rep=rep, return_mode="median"))


def graph_ms(fn: Callable[[], Any], reps: int = 30) -> float:
    """Median replay time of ``fn`` captured in one CUDA graph (how the engine runs a step)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def read_ceiling(dev: torch.device) -> dict[str, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def read_once(x_ptr, out_ptr, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        x = tl.load(x_ptr + pid * BLOCK + tl.arange(0, BLOCK))
        tl.store(out_ptr + pid, tl.sum(x.to(tl.float32)))

    @triton.jit
    def read_loop(x_ptr, out_ptr, PER: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        acc = tl.zeros([BLOCK], tl.float32)
        for i in range(0, PER, BLOCK):
            acc += tl.load(x_ptr + pid * PER + i + tl.arange(0, BLOCK)).to(tl.float32)
        tl.store(out_ptr + pid, tl.sum(acc))

    n = 1 << 30  # bf16 elements: 2 GiB
    x = torch.randn(n, device=dev, dtype=torch.bfloat16)
    res: dict[str, Any] = {"bytes": 2 * n}
    res["copy_GBps"] = round(2 * 2 * n / bench_ms(lambda dst=torch.empty_like(x): dst.copy_(x)) / 1e6, 1)
    res["torch_sum_GBps"] = round(2 * n / bench_ms(lambda: x.sum()) / 1e6, 1)
    out = torch.empty(n // 1024, device=dev, dtype=torch.float32)
    rows = []
    for block, warps in ((2048, 4), (4096, 4), (4096, 8), (8192, 8), (16384, 16)):
        ms = bench_ms(lambda b=block, w=warps: read_once[(n // b,)](x, out, BLOCK=b, num_warps=w))
        rows.append({"kernel": "once", "block": block, "warps": warps, "GBps": round(2 * n / ms / 1e6, 1)})
    for per, block, warps, stages in ((1 << 18, 4096, 8, 3), (1 << 18, 8192, 8, 4), (1 << 20, 4096, 8, 4),
                                      (1 << 16, 2048, 4, 4), (1 << 17, 4096, 4, 3)):
        ms = bench_ms(lambda p=per, b=block, w=warps, s=stages: read_loop[(n // p,)](x, out, PER=p, BLOCK=b,
                                                                                  num_warps=w, num_stages=s))
        rows.append({"kernel": "loop", "per_program": per, "block": block, "warps": warps, "stages": stages,
                     "GBps": round(2 * n / ms / 1e6, 1)})
    res["triton_read"] = rows
    res["best_read_GBps"] = max(r["GBps"] for r in rows + [{"GBps": res["torch_sum_GBps"]}])
    return res


def kv_setup(dev: torch.device, layers: int, gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
    nb = -(-CTX // BS)
    out = []
    for _ in range(layers):
        cache = torch.randn(2, BATCH * nb + 1, BS, HKV, D, device=dev, dtype=torch.bfloat16)
        tables = torch.randperm(BATCH * nb, generator=gen).to(dev).view(BATCH, nb)
        out.append({"k": cache[0], "v": cache[1], "tables": tables})
    return out


@functools.cache
def read_split_kernel():  # type: ignore[no-untyped-def]
    """A kernel that only reads paged K and V (and sums them): program (head group, sequence,
    split) reads split ``split`` of ``per`` tokens of its sequence's context, ``HEADS`` KV heads at
    a time in tiles of ``TILE`` tokens, with any cache strides. The access pattern without the math."""
    import triton
    import triton.language as tl

    @triton.jit
    def read_split(k_ptr, v_ptr, bt_ptr, out_ptr, ctx, per, sk_blk, sk_tok, sk_head, sbt, HKV: tl.constexpr,
                   HEADS: tl.constexpr, TILE: tl.constexpr, BLOCK_SIZE: tl.constexpr, D: tl.constexpr,
                   SPLITS: tl.constexpr):
        g = tl.program_id(0)
        seq = tl.program_id(1).to(tl.int64)
        sp = tl.program_id(2)
        r = tl.arange(0, TILE * HEADS)
        tok_r, head_r = r // HEADS, r % HEADS
        d = tl.arange(0, D)
        acc = tl.zeros([TILE * HEADS, D], tl.float32)
        if SPLITS == 1:  # whole contexts from token 0 (the loop's alignment known at compile time)
            lo = 0
            hi = ctx
        else:
            lo = sp * per
            hi = tl.minimum(lo + per, ctx)
        for start in range(lo, hi, TILE):
            tok = start + tok_r
            ok = tok < hi
            blk = tl.load(bt_ptr + seq * sbt + tok // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
            row = blk * sk_blk + (tok % BLOCK_SIZE) * sk_tok + (g * HEADS + head_r) * sk_head
            acc += tl.load(k_ptr + row[:, None] + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            acc += tl.load(v_ptr + row[:, None] + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        tl.store(out_ptr + (seq * HKV // HEADS + g) * SPLITS + sp, tl.sum(tl.sum(acc, 1), 0))

    return read_split


def paged_read(dev: torch.device, kv: dict[str, torch.Tensor]) -> dict[str, Any]:
    from turbine.engine.decode_kernel import paged_decode_triton

    k, v, tables = kv["k"], kv["v"], kv["tables"]
    kv_bytes = 2 * BATCH * CTX * HKV * D * 2
    lens = torch.full((BATCH,), CTX, device=dev, dtype=torch.int32)
    q = torch.randn(BATCH, H, D, device=dev, dtype=torch.bfloat16)
    res: dict[str, Any] = {"kv_bytes": kv_bytes, "decode": [], "read_only": []}
    for warps, stages, block_n, hpp in ((4, 3, None, 2), (4, 4, None, 2), (4, 5, None, 2), (8, 3, 128, 2),
                                        (4, 3, 128, 2), (8, 4, 128, 4), (4, 3, None, 1)):
        ms = bench_ms(lambda w=warps, s=stages, b=block_n, h=hpp: paged_decode_triton(
            q, k, v, tables, lens, D ** -0.5, num_warps=w, num_stages=s, block_n=b, kv_heads_per_program=h,
            heads_fastest=True))
        res["decode"].append({"warps": warps, "stages": stages, "block_n": block_n, "kv_heads": hpp,
                              "us": round(ms * 1e3, 1), "GBps": round(kv_bytes / ms / 1e6, 1)})
    out = torch.empty(BATCH * HKV, device=dev, dtype=torch.float32)
    for heads, tile, warps, stages in ((2, 32, 4, 3), (2, 32, 4, 4), (8, 16, 8, 3), (8, 16, 8, 4), (4, 32, 8, 3),
                                       (1, 64, 4, 3)):
        ms = bench_ms(lambda h=heads, t=tile, w=warps, s=stages: read_split_kernel()[(HKV // h, BATCH, 1)](
            k, v, tables, out, CTX, CTX, k.stride(0), k.stride(1), k.stride(2), tables.stride(0), HKV=HKV, HEADS=h,
            TILE=t, BLOCK_SIZE=BS, D=D, SPLITS=1, num_warps=w, num_stages=s))
        res["read_only"].append({"heads": heads, "tile_tokens": tile, "warps": warps, "stages": stages,
                                 "us": round(ms * 1e3, 1), "GBps": round(kv_bytes / ms / 1e6, 1)})
    return res


def layouts(dev: torch.device) -> dict[str, Any]:
    """The same KV bytes read through other access patterns: all KV heads of a token per program
    (contexts split to keep enough programs), block tables in order instead of shuffled, a
    head-major page ([block, head, token, dim]: a head's page is one contiguous run) and bigger
    pages; read-only kernels and the decode kernel itself (which takes any cache strides)."""
    from turbine.engine.decode_kernel import paged_decode_triton

    kv_bytes = 2 * BATCH * CTX * HKV * D * 2
    lens = torch.full((BATCH,), CTX, device=dev, dtype=torch.int32)
    q = torch.randn(BATCH, H, D, device=dev, dtype=torch.bfloat16)
    out = torch.empty(BATCH * HKV * 16, device=dev, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    res: dict[str, Any] = {"read": [], "decode": []}
    for bs in (16, 32):
        nb = -(-CTX // bs)
        shuffled = torch.randperm(BATCH * nb, generator=gen).to(dev).view(BATCH, nb).contiguous()
        ordered = torch.arange(BATCH * nb, device=dev).view(BATCH, nb)
        for layout in ("token_major", "head_major"):
            shape = (2, BATCH * nb + 1, bs, HKV, D) if layout == "token_major" else (2, BATCH * nb + 1, HKV, bs, D)
            cache = torch.randn(shape, device=dev, dtype=torch.bfloat16)
            k, v = (cache[0], cache[1]) if layout == "token_major" else \
                (cache[0].permute(0, 2, 1, 3), cache[1].permute(0, 2, 1, 3))  # [block, token, head, dim] views
            for tname, tables in (("shuffled", shuffled), ("ordered", ordered)):
                if tname == "ordered" and (bs != 16 or layout != "token_major"):
                    continue
                for heads, tile, warps, stages, splits in ((2, 32, 4, 3, 1), (1, 64, 4, 3, 1), (8, 16, 8, 3, 4),
                                                           (8, 32, 8, 3, 4), (8, 16, 4, 4, 2), (4, 32, 8, 3, 2),
                                                           (2, 64, 8, 3, 1)):
                    per = -(-CTX // splits)
                    try:
                        ms = bench_ms(lambda h=heads, t=tile, w=warps, s=stages, sp=splits, p=per, kk=k, vv=v,
                                      tb=tables: read_split_kernel()[(HKV // h, BATCH, sp)](
                            kk, vv, tb, out, CTX, p, kk.stride(0), kk.stride(1), kk.stride(2), tb.stride(0),
                            HKV=HKV, HEADS=h, TILE=t, BLOCK_SIZE=bs, D=D, SPLITS=sp, num_warps=w, num_stages=s))
                        res["read"].append({"bs": bs, "layout": layout, "tables": tname, "heads": heads, "tile": tile,
                                            "warps": warps, "stages": stages, "splits": splits,
                                            "GBps": round(kv_bytes / ms / 1e6, 1)})
                    except Exception as ex:  # noqa: BLE001
                        res["read"].append({"bs": bs, "layout": layout, "heads": heads, "error": str(ex)[:200]})
                ref = None
                for warps, stages, block_n, hpp in ((4, 3, None, 2), (4, 3, None, 1), (4, 3, 64, 1), (4, 4, 128, 2),
                                                    (8, 3, 128, 2), (4, 3, 32, 1)):
                    try:
                        o = paged_decode_triton(q, k, v, tables, lens, D ** -0.5, num_warps=warps, num_stages=stages,
                                                block_n=block_n, kv_heads_per_program=hpp, heads_fastest=True)
                        if ref is None:
                            ref = o.float()
                        err = float((o.float() - ref).abs().max())
                        ms = bench_ms(lambda w=warps, s=stages, b=block_n, h=hpp, kk=k, vv=v, tb=tables:
                                      paged_decode_triton(q, kk, vv, tb, lens, D ** -0.5, num_warps=w, num_stages=s,
                                                          block_n=b, kv_heads_per_program=h, heads_fastest=True))
                        res["decode"].append({"bs": bs, "layout": layout, "tables": tname, "warps": warps,
                                              "stages": stages, "block_n": block_n, "kv_heads": hpp, "max_diff": err,
                                              "us": round(ms * 1e3, 1), "GBps": round(kv_bytes / ms / 1e6, 1)})
                    except Exception as ex:  # noqa: BLE001
                        res["decode"].append({"bs": bs, "layout": layout, "kv_heads": hpp, "error": str(ex)[:200]})
            del cache, k, v
            torch.cuda.empty_cache()
    return res


def stream_read(dev: torch.device) -> dict[str, Any]:
    """Work granularity: the paged KV read cut into equal shares of (sequence, head group, tile)
    items, one share per program (stream-K style, no tail wave), against one program per
    (sequence, head group, split). The contiguous read kernels showed the effect: 1024 programs of
    2 MB read at 3.9 TB/s, 16384 of 128 KB at 4.53."""
    import triton
    import triton.language as tl

    @triton.jit
    def read_stream(k_ptr, v_ptr, bt_ptr, out_ptr, ctx, per_prog, total, sk_blk, sk_tok, sk_head, sbt,
                    GROUPS: tl.constexpr, TPS: tl.constexpr, HEADS: tl.constexpr, TILE: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, D: tl.constexpr):
        p = tl.program_id(0)
        r = tl.arange(0, TILE * HEADS)
        tok_r, head_r = r // HEADS, r % HEADS
        d = tl.arange(0, D)
        acc = tl.zeros([TILE * HEADS, D], tl.float32)
        lo = p * per_prog
        hi = tl.minimum(lo + per_prog, total)
        for t in range(lo, hi):
            seq = (t // (GROUPS * TPS)).to(tl.int64)
            g = (t // TPS) % GROUPS
            tok = (t % TPS) * TILE + tok_r
            ok = tok < ctx
            blk = tl.load(bt_ptr + seq * sbt + tok // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
            row = blk * sk_blk + (tok % BLOCK_SIZE) * sk_tok + (g * HEADS + head_r) * sk_head
            acc += tl.load(k_ptr + row[:, None] + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            acc += tl.load(v_ptr + row[:, None] + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        tl.store(out_ptr + p, tl.sum(tl.sum(acc, 1), 0))

    from turbine.engine.decode_kernel import paged_decode_triton

    kv_bytes = 2 * BATCH * CTX * HKV * D * 2
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    gen = torch.Generator().manual_seed(5)
    nb = -(-CTX // BS)
    cache = torch.randn(2, BATCH * nb + 1, BS, HKV, D, device=dev, dtype=torch.bfloat16)
    k, v = cache[0], cache[1]
    tables = torch.randperm(BATCH * nb, generator=gen).to(dev).view(BATCH, nb).contiguous()
    out = torch.empty(sms * 64, device=dev, dtype=torch.float32)
    res: dict[str, Any] = {"sms": sms, "stream": [], "decode_splits": []}
    for heads, tile in ((2, 32), (1, 64), (2, 64), (4, 16)):
        groups, tps = HKV // heads, -(-CTX // tile)
        total = BATCH * groups * tps
        for per_sm in (2, 3, 4, 8, 16, 32):
            progs = sms * per_sm
            per = -(-total // progs)
            for warps, stages in ((4, 3), (4, 4), (8, 3)):
                ms = bench_ms(lambda w=warps, s=stages, pp=progs, pr=per, h=heads, t=tile, gr=groups, tp=tps, tot=total:
                              read_stream[(pp,)](k, v, tables, out, CTX, pr, tot, k.stride(0), k.stride(1),
                                                 k.stride(2), tables.stride(0), GROUPS=gr, TPS=tp, HEADS=h, TILE=t,
                                                 BLOCK_SIZE=BS, D=D, num_warps=w, num_stages=s))
                res["stream"].append({"heads": heads, "tile": tile, "programs_per_sm": per_sm, "warps": warps,
                                      "stages": stages, "GBps": round(kv_bytes / ms / 1e6, 1)})
    lens = torch.full((BATCH,), CTX, device=dev, dtype=torch.int32)
    q = torch.randn(BATCH, H, D, device=dev, dtype=torch.bfloat16)
    for splits in (1, 2, 4, 8):
        for hpp in (1, 2):
            ms = bench_ms(lambda sp=splits, h=hpp: paged_decode_triton(q, k, v, tables, lens, D ** -0.5, num_splits=sp,
                                                                       split_tokens=-(-CTX // sp), kv_heads_per_program=h))
            res["decode_splits"].append({"splits": splits, "kv_heads": hpp, "us": round(ms * 1e3, 1),
                                         "GBps": round(kv_bytes / ms / 1e6, 1)})
    return res


def attention_overlap(dev: torch.device, layers: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """qkv -> attention -> o over len(layers) layers: one stream vs heads in two halves on two streams."""
    from turbine.engine.decode_kernel import paged_decode_triton

    g = torch.Generator(device="cpu").manual_seed(1)
    lens = torch.full((BATCH,), CTX, device=dev, dtype=torch.int32)
    x = torch.randn(BATCH, HIDDEN, device=dev, dtype=torch.bfloat16)
    q_rows, kv_rows = H * D, HKV * D
    ws = []
    for _ in layers:
        wqkv = (torch.randn(q_rows + 2 * kv_rows, HIDDEN, generator=g) * 0.02).to(dev, torch.bfloat16)
        wo = (torch.randn(HIDDEN, q_rows, generator=g) * 0.02).to(dev, torch.bfloat16)
        # the half-heads layout: rows of q, k, v of heads 0..15 / KV heads 0..3, then the rest
        half_q, half_kv = q_rows // 2, kv_rows // 2
        idx = []
        for part in range(2):
            idx += list(range(part * half_q, (part + 1) * half_q))
            idx += list(range(q_rows + part * half_kv, q_rows + (part + 1) * half_kv))
            idx += list(range(q_rows + kv_rows + part * half_kv, q_rows + kv_rows + (part + 1) * half_kv))
        wqkv_halves = wqkv[torch.tensor(idx, device=dev)].contiguous()
        wo_halves = (wo[:, :q_rows // 2].contiguous(), wo[:, q_rows // 2:].contiguous())
        ws.append((wqkv, wo, wqkv_halves, wo_halves))
    attn_out = torch.empty(BATCH, H, D, device=dev, dtype=torch.bfloat16)
    y = torch.empty(BATCH, HIDDEN, device=dev, dtype=torch.bfloat16)
    scale = D ** -0.5

    def one_stream() -> None:
        for kv, (wqkv, wo, _, _) in zip(layers, ws):
            qkv = F.linear(x, wqkv)
            q = qkv[:, :q_rows].view(BATCH, H, D)
            paged_decode_triton(q, kv["k"], kv["v"], kv["tables"], lens, scale, out=attn_out)
            torch.mm(attn_out.view(BATCH, q_rows), wo.t(), out=y)

    def halves_one_stream() -> None:
        for kv, (_, wo, wh, _) in zip(layers, ws):
            n = wh.shape[0] // 2
            for part in range(2):
                qkv = F.linear(x, wh[part * n:(part + 1) * n])
                q = qkv[:, :q_rows // 2].view(BATCH, H // 2, D)
                sl = slice(part * HKV // 2, (part + 1) * HKV // 2)
                paged_decode_triton(q, kv["k"][:, :, sl], kv["v"][:, :, sl], kv["tables"], lens, scale,
                                    out=attn_out[:, part * H // 2:(part + 1) * H // 2])
            torch.mm(attn_out.view(BATCH, q_rows), wo.t(), out=y)

    def make_two_streams(priority: int) -> Callable[[], None]:
        side = torch.cuda.Stream(priority=priority)
        y1 = torch.empty_like(y)
        flat = attn_out.view(BATCH, q_rows)  # a head half: columns of it, no copy

        def run() -> None:
            main = torch.cuda.current_stream()
            for kv, (_, _, wh, (wo0, wo1)) in zip(layers, ws):
                n = wh.shape[0] // 2
                qkv0 = F.linear(x, wh[:n])
                ev = torch.cuda.Event()
                ev.record(main)
                # half 0's attention on the main stream; half 1's qkv and half 0's o on the side
                paged_decode_triton(qkv0[:, :q_rows // 2].view(BATCH, H // 2, D), kv["k"][:, :, :HKV // 2],
                                    kv["v"][:, :, :HKV // 2], kv["tables"], lens, scale, out=attn_out[:, :H // 2])
                a0 = torch.cuda.Event()
                a0.record(main)
                side.wait_event(ev)
                with torch.cuda.stream(side):
                    qkv1 = F.linear(x, wh[n:])
                q1_ready = torch.cuda.Event()
                q1_ready.record(side)
                main.wait_event(q1_ready)
                paged_decode_triton(qkv1[:, :q_rows // 2].view(BATCH, H // 2, D), kv["k"][:, :, HKV // 2:],
                                    kv["v"][:, :, HKV // 2:], kv["tables"], lens, scale, out=attn_out[:, H // 2:])
                side.wait_event(a0)
                with torch.cuda.stream(side):
                    torch.mm(flat[:, :q_rows // 2], wo0.t(), out=y1)
                o0 = torch.cuda.Event()
                o0.record(side)
                main.wait_event(o0)
                torch.addmm(y1, flat[:, q_rows // 2:], wo1.t(), out=y)
        return run

    res: dict[str, Any] = {"layers": len(layers)}
    res["one_stream_ms"] = round(graph_ms(one_stream), 4)
    res["halves_one_stream_ms"] = round(graph_ms(halves_one_stream), 4)
    lo, hi = torch.cuda.Stream.priority_range()
    res["two_streams_high_prio_ms"] = round(graph_ms(make_two_streams(hi)), 4)
    res["two_streams_same_prio_ms"] = round(graph_ms(make_two_streams(0)), 4)
    # parts alone (one layer), eager
    kv, (wqkv, wo, wh, (wo0, _)) = layers[0], ws[0]
    qkv = F.linear(x, wqkv)
    q = qkv[:, :q_rows].view(BATCH, H, D)
    res["parts_us"] = {
        "qkv": round(bench_ms(lambda: F.linear(x, wqkv)) * 1e3, 1),
        "qkv_half": round(bench_ms(lambda: F.linear(x, wh[:wh.shape[0] // 2])) * 1e3, 1),
        "attn": round(bench_ms(lambda: paged_decode_triton(q, kv["k"], kv["v"], kv["tables"], lens, scale,
                                                            out=attn_out)) * 1e3, 1),
        "attn_half": round(bench_ms(lambda: paged_decode_triton(
            q[:, :H // 2], kv["k"][:, :, :HKV // 2], kv["v"][:, :, :HKV // 2], kv["tables"], lens, scale,
            out=attn_out[:, :H // 2])) * 1e3, 1),
        "o": round(bench_ms(lambda: torch.mm(attn_out.view(BATCH, q_rows), wo.t(), out=y)) * 1e3, 1),
        "o_half": round(bench_ms(lambda: torch.mm(attn_out.view(BATCH, q_rows)[:, :q_rows // 2], wo0.t())) * 1e3,
                        1),
    }
    # correctness of the pipeline against the one-stream block (same inputs)
    one_stream()
    ref = y.clone()
    make_two_streams(hi)()
    torch.cuda.synchronize()
    res["pipeline_rel_err"] = float((y.float() - ref.float()).norm() / ref.float().norm())
    return res


def independent_concurrency(dev: torch.device, kv: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One layer's attention and an unrelated gate_up GEMM: one after the other vs two streams."""
    from turbine.engine.decode_kernel import paged_decode_triton

    lens = torch.full((BATCH,), CTX, device=dev, dtype=torch.int32)
    q = torch.randn(BATCH, H, D, device=dev, dtype=torch.bfloat16)
    x = torch.randn(BATCH, HIDDEN, device=dev, dtype=torch.bfloat16)
    ws = [torch.randn(28672, HIDDEN, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(2)]
    side = torch.cuda.Stream(priority=torch.cuda.Stream.priority_range()[1])

    def attn() -> None:
        paged_decode_triton(q, kv["k"], kv["v"], kv["tables"], lens, D ** -0.5)

    def gemms() -> None:
        for w in ws:
            F.linear(x, w)

    def both() -> None:
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            gemms()
        attn()
        main.wait_stream(side)

    def serial() -> None:
        attn()
        gemms()

    return {"attn_ms": round(graph_ms(attn), 4), "two_gate_up_ms": round(graph_ms(gemms), 4),
            "serial_ms": round(graph_ms(serial), 4), "concurrent_ms": round(graph_ms(both), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "decode_overlap_out")
    ap.add_argument("--sections", default="read_ceiling,paged,concurrency,attention_overlap,layouts")
    args = ap.parse_args(argv)
    wanted = set(args.sections.split(","))
    dev = torch.device("cuda")
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__}
    layers: list[dict[str, torch.Tensor]] = []
    sections = (("read_ceiling", lambda: read_ceiling(dev)), ("paged", lambda: paged_read(dev, layers[0])),
                ("concurrency", lambda: independent_concurrency(dev, layers[0])),
                ("attention_overlap", lambda: attention_overlap(dev, layers)), ("layouts", lambda: layouts(dev)),
                ("stream_read", lambda: stream_read(dev)))
    for name, fn in sections:
        if name not in wanted:
            continue
        if name in ("layouts", "stream_read"):
            layers.clear()
            torch.cuda.empty_cache()
        if name in ("paged", "concurrency", "attention_overlap") and not layers:
            torch.cuda.empty_cache()
            layers.extend(kv_setup(dev, 4, torch.Generator().manual_seed(0)))
        try:
            res[name] = fn()
        except Exception:  # noqa: BLE001 - a probe: report the section and go on
            res[name] = {"error": traceback.format_exc()[-2000:]}
        print(name, json.dumps(res[name], indent=1), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_overlap_probe.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
