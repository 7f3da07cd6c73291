"""Small-M linear layers (decode: 1-16 rows) as a weight-streaming Triton kernel.

At decode batch 1-16 a linear layer is bound by reading its weight once, and cuBLAS's choice for
some shapes leaves bandwidth unused (o_proj [4096 x 4096] ran at 1.6 TB/s on an H100 where qkv
and down reached 3.0). This kernel streams the weight in ``[BLOCK_N, BLOCK_K]`` tiles along K
(rows are K-contiguous, so each thread issues 16-byte loads) and either feeds the tensor cores
with the activations padded to 16 rows (``dot``: free, the MMA units idle anyway) or multiplies
and sums in float32 registers (the register path: one row, or a few in small tiles). When N
alone gives too few programs for 132 SMs, K can be split too: each split writes float32 partials
and a tiny second kernel adds them in split order, so results never depend on scheduling (no
atomics)::

    weight [N, K]          program (pid_n, pid_k) reads rows pid_n*BLOCK_N.., K range pid_k
    +------+------+----+   SPLIT_K == 1: out[m, n] = x[m] . w[n] (+ bias), cast to x's dtype
    | 0,0  | 0,1  | .. |   SPLIT_K  > 1: ws[pid_k, m, n] fp32 partials
    +------+------+----+                 -> reduce: out = sum_k ws[k] (+ bias), in split order
    | 1,0  | 1,1  | .. |
    +------+------+----+

Launches depend on shapes only (grid, workspace size), never on data: CUDA-graph capturable.
On Hopper the kernels use programmatic dependent launch: a kernel starts while its predecessor
drains and requests its first weight tile (nothing earlier writes weights) before
``griddepcontrol.wait``; x, out and the workspace are touched only after it. That hides part of
the ~1 us launch gap and the first loads' latency, which on a 32 MB weight is worth ~5%.
``TUNED`` holds measured configs (``bench/gemv_bench.py`` prints a ready-to-paste table);
other shapes get ``default_config``'s heuristic.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

try:  # the kernel is an accelerator, never a requirement
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

__all__ = ["MAX_M", "TUNED", "GemvConfig", "default_config", "small_m_linear"]

MAX_M = 16
_SMS = 132  # H100 SXM; only shapes the heuristic sizes for, never correctness
_DTYPES = (torch.bfloat16, torch.float16)
_REG_TILE = 128  # register path: at most this many float32 products per thread and K tile


@dataclass(frozen=True)
class GemvConfig:
    """One launch shape.

    ``dot``: tensor cores with M padded to 16; else the register path (multiply and add in
    float32 registers), whose tile ``block_n x rows x block_k`` must fit in registers.
    ``num_stages``: Triton's shared-memory pipeline depth (the dot path; the register path issues
    a whole tile's 16-byte loads at once instead, ``block_n * block_k / (256 * num_warps)`` a thread).
    ``pdl``: programmatic dependent launch (Hopper+): the first weight tile is requested while the
    previous kernel still drains, and the next kernel may be scheduled early; ignored where
    unsupported. So the weight must not be written by the kernel just before the call on the
    stream (weights are static while decoding), and a later kernel launched with PDL must
    ``griddepcontrol.wait`` before it reads this output (kernels launched without PDL need nothing).
    """

    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    dot: bool = True
    pdl: bool = True

    def validate(self, m: int) -> None:
        for name in ("block_n", "block_k", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"GemvConfig.{name} must be a power of two, got {v}")
        if self.split_k < 1 or self.num_stages < 1:
            raise ValueError(f"GemvConfig split_k and num_stages must be >= 1, got {self}")
        if self.dot and (self.block_n < 16 or self.block_k < 16):
            raise ValueError(f"GemvConfig with dot=True needs block_n and block_k >= 16, got {self}")
        if not self.dot and self.block_n * _pow2(m) * self.block_k > _REG_TILE * 32 * self.num_warps:
            raise ValueError(f"register path tile block_n x {_pow2(m)} rows x block_k exceeds "
                             f"{_REG_TILE} floats a thread: {self}")


def _pow2(m: int) -> int:
    return 1 << max(0, m - 1).bit_length()


def _reg(block_n: int, block_k: int, num_warps: int) -> GemvConfig:
    return GemvConfig(block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=1, dot=False)


def _dot(block_n: int, block_k: int, split_k: int, num_stages: int) -> GemvConfig:
    return GemvConfig(block_n=block_n, block_k=block_k, split_k=split_k, num_warps=4, num_stages=num_stages)


# (n, k) -> {largest M the entry serves: config}; the entry with the smallest bound >= M wins.
# Llama-3.1-8B's decode shapes, from bench/gemv_bench.py on an H100 SXM (Triton 3.6, bf16); its
# printed TUNED block can replace this one. Per call inside a CUDA graph, vs cuBLAS's best:
# M=1: qkv 17.4 vs 21.0 us, o_proj 11.9 vs 15.9, gate_up 75.2 vs 81.7, down 39.5 vs 44.5,
# lm_head 331 vs 370; M=2..16 gain 3-24%.
TUNED: dict[tuple[int, int], dict[int, GemvConfig]] = {
    (6144, 4096): {1: _reg(4, 1024, 4), 16: _dot(64, 256, 1, 3)},  # qkv
    (4096, 4096): {1: _reg(16, 1024, 8), 16: _dot(64, 256, 2, 3)},  # o_proj
    (28672, 4096): {1: _reg(4, 1024, 4), 2: _reg(4, 1024, 4), 16: _dot(64, 128, 1, 4)},  # gate_up
    (4096, 14336): {1: _reg(16, 1024, 8), 16: _dot(64, 256, 2, 3)},  # down
    (128256, 4096): {1: _reg(4, 1024, 4), 2: _reg(4, 1024, 4), 16: _dot(64, 128, 1, 4)},  # lm_head
}


def default_config(m: int, n: int, k: int) -> GemvConfig:
    """Measured config for (n, k) if ``TUNED`` has one, else what did well on an H100: one row on
    the register path in 16 x 1024 tiles, more rows on tensor cores in 32-64 x 256 tiles, K split
    in two only when N gives under half a program per SM."""
    entry = TUNED.get((n, k))
    if entry:
        fits = [bound for bound in entry if bound >= m]
        if fits:
            return entry[min(fits)]
    if m <= 1:
        block_k = min(1024, max(128, _pow2(k)))
        return GemvConfig(block_n=16, block_k=block_k, num_warps=8 if block_k == 1024 else 4, num_stages=1, dot=False)
    block_n = 64 if _cdiv(n, 64) >= _SMS else 32
    split = 2 if _cdiv(n, block_n) < _SMS // 2 and k >= 4 * 256 else 1
    return GemvConfig(block_n=block_n, block_k=256, split_k=split, num_warps=4, num_stages=3)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None) -> None:
    """Every input error is a ValueError raised here, before Triton is needed."""
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"small_m_linear needs x [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"x has K={k} columns but weight is {tuple(weight.shape)}")
    if m > MAX_M:
        raise ValueError(f"small_m_linear serves at most {MAX_M} rows, got M={m}")
    if x.dtype not in _DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"small_m_linear needs bfloat16 or float16 x and weight of one dtype, got {x.dtype} and {weight.dtype}")
    if not weight.is_contiguous():
        raise ValueError("small_m_linear needs a contiguous weight")
    if k > 0 and x.stride(1) != 1:
        raise ValueError("small_m_linear needs x's last dimension contiguous")
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{n}] tensor of {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if out is not None:
        if out.shape != (m, n) or out.dtype != x.dtype:
            raise ValueError(f"out must be [{m}, {n}] of {x.dtype}, got {tuple(out.shape)} {out.dtype}")
        if n > 0 and out.stride(1) != 1:
            raise ValueError("out needs its last dimension contiguous")
    tensors = [t for t in (x, weight, bias, out) if t is not None]
    if any(t.device != x.device for t in tensors):
        raise ValueError("x, weight, bias and out must be on one device")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"small_m_linear runs on CUDA tensors, got {x.device}")


def small_m_linear(x: torch.Tensor, weight: torch.Tensor, *, bias: torch.Tensor | None = None,
                   out: torch.Tensor | None = None, config: GemvConfig | None = None) -> torch.Tensor:
    """``x [M, K] @ weight[N, K].T (+ bias)`` -> ``[M, N]`` in x's dtype, float32 accumulation.

    M <= 16; writes into ``out`` when given (e.g. a slice of a persistent buffer).
    """
    _check(x, weight, bias, out)
    m, k = x.shape
    n = weight.shape[0]
    cfg = config or default_config(m, n, k)
    plan = _plan(cfg, m, n, k, bias is not None, cfg.pdl and _pdl_supported(x.device))
    if triton is None:
        raise RuntimeError("small_m_linear needs Triton, which is not installed")
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(bias.expand(m, n)) if bias is not None else out.zero_()
    final = plan.split == 1
    dst = out if final else torch.empty((plan.split, m, n), dtype=torch.float32, device=x.device)
    b = bias if bias is not None else out
    _gemv_kernel[plan.grid](x, weight, dst, b, m, n, k, x.stride(0), dst.stride(-2), m * n, plan.k_tiles,
                            **plan.kernel_args)
    if not final:
        _splitk_reduce_kernel[plan.reduce_grid](dst, out, b, m, n, out.stride(0), **plan.reduce_args)
    return out


class _Plan(NamedTuple):
    """Everything about a launch that depends on shapes and config only (cached: host time)."""

    grid: tuple[int, int]
    split: int
    k_tiles: int
    kernel_args: dict[str, Any]
    reduce_grid: tuple[int, int]
    reduce_args: dict[str, Any]


@functools.lru_cache(maxsize=1024)
def _plan(cfg: GemvConfig, m: int, n: int, k: int, has_bias: bool, pdl: bool) -> _Plan:
    cfg.validate(m)
    k_tiles_total = max(1, _cdiv(k, cfg.block_k))
    split = min(cfg.split_k, k_tiles_total)
    k_tiles = _cdiv(k_tiles_total, split)
    split = _cdiv(k_tiles_total, k_tiles)  # no split left without a tile
    final = split == 1
    launch: dict[str, Any] = {"launch_pdl": True} if pdl else {}
    kernel_args = dict(
        HAS_BIAS=final and has_bias, BLOCK_M=16 if cfg.dot else _pow2(m), BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, DOT=cfg.dot, EVEN_K=k == cfg.block_k * k_tiles * split,  # whole tiles only
        FINAL=final, PDL=pdl, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch,
    )
    block = min(1024, _pow2(max(n, 1)))
    reduce_args = dict(SPLIT_K=split, HAS_BIAS=has_bias, BLOCK=block, PDL=pdl, num_warps=4, **launch)
    return _Plan((_cdiv(n, cfg.block_n), split), split, k_tiles, kernel_args, (_cdiv(n, block), m), reduce_args)


_PDL: dict[int, bool] = {}


def _pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch needs Hopper or newer (griddepcontrol) and a real GPU."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _PDL:
        _PDL[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
    return _PDL[idx]

if triton is not None:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def _load_w(w_ptrs, k_ok, EVEN_K: tl.constexpr):
        if EVEN_K:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
        else:
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0, eviction_policy="evict_first")
        return w

    @triton.jit
    def _accumulate(acc, w, x_ptrs, k_ok, m_ok, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, DOT: tl.constexpr):
        """One K tile: dot: acc[n, m] += w @ x^T; register path, one row: acc[n, k] += w * x (summed over k
        once, at the end); register path, a few rows: acc[n, m] += sum_k w[n, k] * x[m, k].
        (One return at the end: Triton compiles the code after an early return too.)"""
        if DOT:  # x_ptrs: x^T tile [BLOCK_K, BLOCK_M]
            if EVEN_K:
                xt = tl.load(x_ptrs, mask=m_ok[None, :], other=0.0)
            else:
                xt = tl.load(x_ptrs, mask=m_ok[None, :] & k_ok[:, None], other=0.0)
            acc = tl.dot(w, xt, acc)
        elif BLOCK_M == 1:  # x_ptrs: [BLOCK_K] (loading it as [1, BLOCK_K] measured slower: 15.5 vs 11.9 us)
            if EVEN_K:
                xv = tl.load(x_ptrs)
            else:
                xv = tl.load(x_ptrs, mask=k_ok, other=0.0)
            acc += w.to(tl.float32) * xv.to(tl.float32)[None, :]
        else:  # x_ptrs: [BLOCK_M, BLOCK_K]
            if EVEN_K:
                xt = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            else:
                xt = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32)[:, None, :] * xt.to(tl.float32)[None, :, :], axis=2)
        return acc

    @triton.jit(do_not_specialize=["M", "k_tiles"])
    def _gemv_kernel(x_ptr, w_ptr, out_ptr, b_ptr, M, N, K, sxm, som, sos, k_tiles,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     DOT: tl.constexpr, EVEN_K: tl.constexpr, FINAL: tl.constexpr, PDL: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.minimum(n, N - 1).to(tl.int64)  # clamped: weight loads need no row mask
        k0 = pid_k * k_tiles * BLOCK_K
        kk = tl.arange(0, BLOCK_K)
        m = tl.arange(0, BLOCK_M)
        m_ok = m < M
        w_ptrs = w_ptr + rows[:, None] * K + (k0 + kk)[None, :]
        if DOT:
            x_ptrs = x_ptr + m[None, :] * sxm + (k0 + kk)[:, None]
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        elif BLOCK_M == 1:
            x_ptrs = x_ptr + k0 + kk
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        else:
            x_ptrs = x_ptr + m[:, None] * sxm + (k0 + kk)[None, :]
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        # The first weight tile is requested before waiting for the previous kernel (PDL): the weight
        # is never written by a predecessor; x, out and the workspace are touched only after the wait.
        k_ok = (k0 + kk) < K
        w = _load_w(w_ptrs, k_ok, EVEN_K)
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        acc = _accumulate(acc, w, x_ptrs, k_ok, m_ok, EVEN_K, BLOCK_M, DOT)
        for i in range(1, k_tiles):  # dot: Triton's pipeliner stages these loads (num_stages)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            k_ok = (k0 + i * BLOCK_K + kk) < K
            acc = _accumulate(acc, _load_w(w_ptrs, k_ok, EVEN_K), x_ptrs, k_ok, m_ok, EVEN_K, BLOCK_M, DOT)
        if not DOT and BLOCK_M == 1:
            acc = tl.sum(acc, axis=1)[:, None]  # [BLOCK_N, 1]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows).to(tl.float32)[:, None]
        dst = out_ptr + pid_k.to(tl.int64) * sos + m[None, :] * som + n[:, None]
        ok = (n[:, None] < N) & m_ok[None, :]
        if FINAL:
            tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=ok)
        else:
            tl.store(dst, acc, mask=ok)

    @triton.jit(do_not_specialize=["M"])
    def _splitk_reduce_kernel(ws_ptr, out_ptr, b_ptr, M, N, som, SPLIT_K: tl.constexpr,
                              HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """out[row] = sum of the split partials in split order (+ bias): deterministic."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        row = tl.program_id(1)
        n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = n < N
        src = ws_ptr + row * N + n
        acc = tl.load(src, mask=ok, other=0.0)
        for s in tl.static_range(1, SPLIT_K):
            acc += tl.load(src + s * M * N, mask=ok, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * som + n, acc.to(out_ptr.dtype.element_ty), mask=ok)
