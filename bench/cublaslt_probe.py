"""Do cuBLASLt's other algorithms beat its first choice on the decode step's matmuls?

For each Llama-3-8B projection at M rows (the decode batch), ask cuBLASLt's heuristic for up to
32 algorithms (through ctypes: torch exposes only the first) and time each against ``F.linear``
(triton's do_bench: L2 flushed before each call, as a step's products find it).

H200, 2026-12-02: the best alternatives sum to 2-5% less matmul time per forward than torch's
choice (bench/RESULTS.md). Built into the decode graphs (each shape timed at capture, the faster
kept), they gained 1-2% at batch 64-128 and nothing at 256, where the in-graph kernel took as long
as torch's: too little for a ctypes binding in the engine, so it stays here, as the evidence.

    python3 bench/cublaslt_probe.py --out $OUT      # H200: ~1 min
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}


_COMPUTE_32F = 68
_R_32F, _R_16F, _R_16BF = 0, 2, 14
_OP_N, _OP_T = 0, 1
_DESC_TRANSA, _DESC_TRANSB = 3, 4
_PREF_MAX_WORKSPACE_BYTES = 1
_CONFIG = {"tile": 1, "splitk": 2, "reduction": 3, "swizzle": 4, "custom": 5, "stages": 6, "cluster": 8}
_WORKSPACE_BYTES = 32 << 20


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", _Algo), ("workspaceSize", ctypes.c_size_t), ("state", ctypes.c_int),
                ("wavesCount", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


@dataclass(frozen=True)
class LtAlgo:
    """One of the heuristic's algorithms for a shape: its opaque bytes and the workspace it needs."""

    rank: int
    data: bytes
    workspace: int
    waves: float


def _load() -> ctypes.CDLL | None:
    names = ["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"]
    try:  # the pip wheels torch depends on (nvidia-cublas-*)
        import nvidia.cublas as nv  # type: ignore[import-not-found]

        for root in nv.__path__:
            names += sorted(glob.glob(os.path.join(root, "lib", "libcublasLt.so*")), reverse=True)
    except ImportError:
        pass
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


_LIB: ctypes.CDLL | None = None


def cublaslt_available() -> bool:
    global _LIB
    if not torch.cuda.is_available():
        return False
    if _LIB is None:
        _LIB = _load()
    return _LIB is not None


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLASLt {what} failed with status {status}")


_DTYPES = {torch.bfloat16: _R_16BF, torch.float16: _R_16F}


class CublasLt:
    """A cuBLASLt handle and workspace on one device, with descriptors cached per shape."""

    def __init__(self, device: torch.device) -> None:
        if not cublaslt_available():
            raise RuntimeError("cuBLASLt is not available (no CUDA, or libcublasLt not found)")
        self.lib = _LIB
        self.device = device
        self.handle = ctypes.c_void_p()
        _check(self.lib.cublasLtCreate(ctypes.byref(self.handle)), "create")
        self.workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._plans: dict[tuple[int, int, int, int, torch.dtype], tuple[ctypes.c_void_p, ...]] = {}
        self._alpha = ctypes.c_float(1.0)
        self._beta = ctypes.c_float(0.0)

    def _plan(self, m: int, n: int, k: int, ldx: int, dtype: torch.dtype) -> tuple[ctypes.c_void_p, ...]:
        key = (m, n, k, ldx, dtype)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        if dtype not in _DTYPES:
            raise ValueError(f"cuBLASLt path takes bf16 or fp16, not {dtype}")
        lib, t = self.lib, _DTYPES[dtype]
        desc = ctypes.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), _COMPUTE_32F, _R_32F), "desc")
        for attr, op in ((_DESC_TRANSA, _OP_T), (_DESC_TRANSB, _OP_N)):
            v = ctypes.c_int32(op)
            _check(lib.cublasLtMatmulDescSetAttribute(desc, attr, ctypes.byref(v), ctypes.c_size_t(4)), "desc attr")
        # column-major view of the row-major product: out^T [N, M] = (w [N, K]) . x^T [K, M]
        layouts = []
        for rows, cols, ld in ((k, n, k), (k, m, ldx), (n, m, n)):
            lay = ctypes.c_void_p()
            _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(lay), t, ctypes.c_uint64(rows), ctypes.c_uint64(cols),
                                                  ctypes.c_int64(ld)), "layout")
            layouts.append(lay)
        plan = (desc, *layouts)
        self._plans[key] = plan
        return plan

    def algorithms(self, m: int, n: int, k: int, dtype: torch.dtype, count: int = 16,
                   ldx: int | None = None) -> list[LtAlgo]:
        """The heuristic's ranked algorithms for ``[m, k] @ [n, k]^T`` (best guess first)."""
        desc, a, b, c = self._plan(m, n, k, ldx or k, dtype)
        lib = self.lib
        pref = ctypes.c_void_p()
        _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference")
        try:
            ws = ctypes.c_uint64(_WORKSPACE_BYTES)
            _check(lib.cublasLtMatmulPreferenceSetAttribute(pref, _PREF_MAX_WORKSPACE_BYTES, ctypes.byref(ws),
                                                            ctypes.c_size_t(8)), "preference attr")
            results = (_Heuristic * count)()
            found = ctypes.c_int(0)
            _check(lib.cublasLtMatmulAlgoGetHeuristic(self.handle, desc, a, b, c, c, pref, count, results,
                                                      ctypes.byref(found)), "heuristic")
        finally:
            lib.cublasLtMatmulPreferenceDestroy(pref)
        return [LtAlgo(i, bytes(results[i].algo), int(results[i].workspaceSize), float(results[i].wavesCount))
                for i in range(found.value) if results[i].state == 0]

    def matmul(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, algo: LtAlgo) -> torch.Tensor:
        """``out = x @ w.T`` with ``algo`` on the current stream (capturable in a CUDA graph)."""
        m, k = x.shape
        n = w.shape[0]
        if x.stride(1) != 1 or not w.is_contiguous() or not out.is_contiguous() or out.shape != (m, n):
            raise ValueError("cuBLASLt path needs x rows contiguous, w and out contiguous")
        desc, a, b, c = self._plan(m, n, k, x.stride(0), x.dtype)
        raw = _Algo.from_buffer_copy(algo.data)
        stream = torch.cuda.current_stream(x.device).cuda_stream
        _check(self.lib.cublasLtMatmul(
            self.handle, desc, ctypes.byref(self._alpha), ctypes.c_void_p(w.data_ptr()), a,
            ctypes.c_void_p(x.data_ptr()), b, ctypes.byref(self._beta), ctypes.c_void_p(out.data_ptr()), c,
            ctypes.c_void_p(out.data_ptr()), c, ctypes.byref(raw), ctypes.c_void_p(self.workspace.data_ptr()),
            ctypes.c_size_t(_WORKSPACE_BYTES), ctypes.c_void_p(stream)), "matmul")
        return out

    def describe(self, algo: LtAlgo) -> dict[str, int | float]:
        """The algorithm's configuration (tile id, split-K, stages, ...) as cublasLt.h numbers them."""
        raw = _Algo.from_buffer_copy(algo.data)
        out: dict[str, int | float] = {"rank": algo.rank, "workspace": algo.workspace, "waves": round(algo.waves, 2)}
        for name, attr in _CONFIG.items():
            v = ctypes.c_uint32(0)
            written = ctypes.c_size_t(0)
            if self.lib.cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(raw), attr, ctypes.byref(v),
                                                             ctypes.c_size_t(4), ctypes.byref(written)) == 0:
                out[name] = int(v.value)
        return out


def bench_ms(fn, rep: int = 60) -> float:  # type: ignore[no-untyped-def]
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "cublaslt_probe_out")
    ap.add_argument("--rows", default="256,128,64")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    lt = CublasLt(dev)
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__, "rows": []}
    for m in (int(r) for r in args.rows.split(",")):
        for name, (n, k) in SHAPES.items():
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
            ref = F.linear(x, w)
            row: dict[str, Any] = {"m": m, "proj": name, "torch_us": round(bench_ms(lambda: F.linear(x, w)) * 1e3, 1)}
            algos = lt.algorithms(m, n, k, x.dtype, count=32)
            row["algos"] = len(algos)
            times = []
            for i, algo in enumerate(algos):
                out = torch.empty(m, n, device=dev, dtype=x.dtype)
                try:
                    lt.matmul(x, w, out, algo)
                    err = float((out.float() - ref.float()).abs().max())
                    us = bench_ms(lambda a=algo, o=out: lt.matmul(x, w, o, a)) * 1e3
                except RuntimeError as ex:
                    times.append({"i": i, "error": str(ex)[:120]})
                    continue
                times.append({"i": i, "us": round(us, 1), "max_err": err, **lt.describe(algo)})
            ok = [t for t in times if "us" in t and t["max_err"] < 0.05]
            row["first_us"] = ok[0]["us"] if ok and ok[0]["i"] == 0 else None
            row["best"] = min(ok, key=lambda t: t["us"]) if ok else None
            row["all"] = times
            res["rows"].append(row)
            print(f"M={m} {name}: torch {row['torch_us']} us, heuristic #0 {row['first_us']}, "
                  f"best {row['best']}", flush=True)
    total = {}
    for r in res["rows"]:
        t = total.setdefault(r["m"], {"torch": 0.0, "best": 0.0})
        mult = 1 if r["proj"] == "lm_head" else 32
        t["torch"] += mult * r["torch_us"]
        t["best"] += mult * min(r["torch_us"], r["best"]["us"] if r["best"] else 1e9)
    res["step_us"] = total
    print("per step (32 layers + lm_head), us:", total)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cublaslt_probe.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
