"""Building blocks of a Llama-shaped decoder, numerically as ``transformers`` computes them.

Each block follows HF's order of operations and dtype casts (RMSNorm in float32 then cast back
before the weight; RoPE cos/sin from float32 frequencies cast to the activation dtype), so a
float32 model matches HF to rounding and a bf16 one stays within bf16 noise of it.

On CUDA (with Triton) three blocks run as one fused kernel each instead of 5-10 small torch ops,
which is most of a decode step's launches: residual add + RMSNorm, SiLU(gate) * up, and RoPE of
q and k in place. The kernels round every intermediate to the model dtype exactly where torch
does (a bf16 add, the bf16 cast before the norm weight, each product of the rotation), so they
compute HF's function, not an approximation of it; only float32 reduction order differs.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from turbine.engine.models.config import RopeScaling
from turbine.engine.models.gemv import MAX_M, small_m_linear

try:  # fused kernels are an accelerator, never a requirement
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

__all__ = ["Linear", "RMSNorm", "RopeInputs", "RotaryEmbedding", "SiluAndMul", "apply_rotary", "apply_rotary_qk",
           "fused_kernels_enabled", "linear", "rms_norm_triton", "rope_inv_freq", "rope_triton_",
           "set_fused_kernels", "set_small_m_linear", "silu_and_mul_triton", "small_m_linear_available"]

_FUSED = True


def set_fused_kernels(enabled: bool) -> None:
    """Switch the CUDA fused kernels off (A/B measurements, debugging); the torch ops remain."""
    global _FUSED
    _FUSED = bool(enabled)


def fused_kernels_enabled() -> bool:
    return _FUSED and triton is not None


def _fused(x: torch.Tensor) -> bool:
    return _FUSED and triton is not None and x.is_cuda


# Few-row products (decode batches) on the weight-streaming Triton kernel (models/gemv.py) instead
# of cuBLAS. Off by default: DecodeGraphs captures each small batch size both ways, times the
# replays and keeps the faster graph, switching this on only while it captures.
SMALL_M_ROWS = MAX_M
_SMALL_M = False


def set_small_m_linear(enabled: bool) -> None:
    global _SMALL_M
    _SMALL_M = bool(enabled)


def small_m_linear_available() -> bool:
    return triton is not None and _FUSED


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``; rows <= SMALL_M_ROWS on CUDA go to the Triton kernel when enabled."""
    if _SMALL_M and x.is_cuda and x.dim() == 2 and x.shape[0] <= SMALL_M_ROWS and \
            x.dtype in (torch.bfloat16, torch.float16) and weight.is_contiguous():
        return small_m_linear(x, weight, bias=bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` whose decode-sized products may run on the Triton kernel (see ``linear``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):  # type: ignore[no-untyped-def]
        """``norm(x)``; with ``residual``: ``s = x + residual`` (rounded as a torch add) and
        returns ``(norm(s), s)`` — the decoder's residual stream, fused on CUDA."""
        if _fused(x):
            return rms_norm_triton(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` of a fused ``[..., 2 * intermediate]`` gate/up projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fused(x) and x.dim() == 2:
            return silu_and_mul_triton(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """``[head_dim / 2]`` float32 inverse frequencies on the CPU (HF's formulas, same order)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type != "llama3":
        raise ValueError(f"rope type {scaling.rope_type!r} is not supported")
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


class RopeInputs(NamedTuple):
    """What one forward's layers need for RoPE: per-token cos/sin ``[T, 1, D]`` (torch path) or
    whole tables ``[max_positions, D]`` indexed by ``positions`` inside the fused kernel."""

    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    fused: bool


class RotaryEmbedding:
    """cos/sin for a step's positions, computed once per forward and shared by every layer.

    Deliberately not an nn.Module: the frequencies are derived from the config, never loaded,
    and must survive the loader's meta-device build (``to_empty`` would blank a buffer).
    The fused path keeps cos/sin tables for positions ``[0, max_positions)``, built on first use
    with the same ops as the per-step path (so the values are identical) and outside any graph.
    """

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None,
                 max_positions: int = 0) -> None:
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)
        self.max_positions = max_positions
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def to(self, device: torch.device | str) -> RotaryEmbedding:
        """Move the frequencies (the loader does, so no copy happens during CUDA-graph capture)."""
        self.inv_freq = self.inv_freq.to(device)
        self._tables = None
        return self

    def reserve(self, max_positions: int) -> None:
        """Make the tables cover positions up to ``max_positions`` (the engine's context length)."""
        if max_positions > self.max_positions:
            self.max_positions = max_positions
            self._tables = None

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, 1, head_dim] in ``dtype`` (broadcast over heads)."""
        if self.inv_freq.device != positions.device:  # a model moved after loading
            self.to(positions.device)
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]

    def inputs(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeInputs:
        if _fused(positions) and self.max_positions > 0:
            tables = self._tables
            if tables is None or tables[0].dtype != dtype or tables[0].device != positions.device:
                cos, sin = self(torch.arange(self.max_positions, device=positions.device), dtype)
                tables = self._tables = (cos[:, 0].contiguous(), sin[:, 0].contiguous())
            return RopeInputs(positions, tables[0], tables[1], True)
        cos, sin = self(positions, dtype)
        return RopeInputs(positions, cos, sin, False)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; HF's rotate-half convention (the two halves form the pairs)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def apply_rotary_qk(q: torch.Tensor, k: torch.Tensor, rope: RopeInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k; the fused path rotates them in place (views of the qkv projection)."""
    if rope.fused:
        rope_triton_(q, k, rope.positions, rope.cos, rope.sin)
        return q, k
    return apply_rotary(q, rope.cos, rope.sin), apply_rotary(k, rope.cos, rope.sin)


# -- Triton kernels (CUDA; the tests also run them through Triton's CPU interpreter) ---------------------
def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):  # type: ignore[no-untyped-def]
    """RMSNorm over the last dim of ``x`` [..., N]; with ``residual`` returns (norm(x + r), x + r)."""
    shape = x.shape
    n = shape[-1]
    x2 = x.reshape(-1, n)
    rows = x2.shape[0]
    out = torch.empty(shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res_out = None
    if residual is not None:
        r2 = residual.reshape(-1, n)
        res_out = torch.empty(shape, dtype=x.dtype, device=x.device)
    if rows:
        block = triton.next_power_of_2(n)
        _rmsnorm_kernel[(rows,)](
            x2, r2 if residual is not None else x2, weight, out, res_out if res_out is not None else out, n, eps,
            x2.stride(0), r2.stride(0) if residual is not None else 0,
            HAS_RES=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 512)),
        )
    return out if residual is None else (out, res_out)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] (gate | up) -> silu(gate) * up [T, I]."""
    t, two_i = x.shape
    inter = two_i // 2
    out = torch.empty((t, inter), dtype=x.dtype, device=x.device)
    if t:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_mul_kernel[(t, triton.cdiv(inter, block))](x, out, inter, x.stride(0), BLOCK=block, num_warps=4)
    return out


def rope_triton_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> None:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place; cos/sin tables [max_pos, D] in q's dtype."""
    t, hq, d = q.shape
    hk = k.shape[1]
    if t == 0:
        return
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("rope_triton_ needs the head dimension contiguous")
    _rope_kernel[(t,)](
        q, k, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        HQ=hq, HK=hk, HQ_PAD=triton.next_power_of_2(hq), HK_PAD=triton.next_power_of_2(hk), HALF=d // 2,
        HALF_PAD=triton.next_power_of_2(d // 2), num_warps=4,
    )


if triton is not None:

    @triton.jit
    def _rmsnorm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, rout_ptr, n, eps, sx, sr,
                        HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < n
        x = tl.load(x_ptr + row * sx + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(r_ptr + row * sr + cols, mask=ok, other=0.0).to(tl.float32)
            s = (x + r).to(rout_ptr.dtype.element_ty)  # the residual stream, rounded like a torch add
            tl.store(rout_ptr + row * n + cols, s, mask=ok)
            x = s.to(tl.float32)
        var = tl.sum(x * x, axis=0) / n
        y = (x * tl.math.rsqrt(var + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)  # HF: .to(input dtype)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n + cols, (w * y).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, inter, sx, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < inter
        g = tl.load(x_ptr + row * sx + cols, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * sx + inter + cols, mask=ok, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)  # F.silu rounds here
        tl.store(out_ptr + row * inter + cols, (s * u).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _rotate(ptr, c, s, heads, d, ok, HALF: tl.constexpr):
        """HF: x * cos + cat(-x2, x1) * sin, each product and the sum rounded to the dtype."""
        dt = ptr.dtype.element_ty
        p1 = ptr + heads[:, None] + d[None, :]
        x1 = tl.load(p1, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(p1 + HALF, mask=ok, other=0.0).to(tl.float32)
        a1 = (x1 * c[None, :]).to(dt).to(tl.float32)
        b1 = (x2 * s[None, :]).to(dt).to(tl.float32)
        a2 = (x2 * c[None, :]).to(dt).to(tl.float32)
        b2 = (x1 * s[None, :]).to(dt).to(tl.float32)
        tl.store(p1, (a1 - b1).to(dt), mask=ok)
        tl.store(p1 + HALF, (a2 + b2).to(dt), mask=ok)

    @triton.jit
    def _rope_kernel(q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr, sq_t, sq_h, sk_t, sk_h, s_tab,
                     HQ: tl.constexpr, HK: tl.constexpr, HQ_PAD: tl.constexpr, HK_PAD: tl.constexpr,
                     HALF: tl.constexpr, HALF_PAD: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        d = tl.arange(0, HALF_PAD)
        d_ok = d < HALF
        c = tl.load(cos_ptr + pos * s_tab + d, mask=d_ok, other=0.0).to(tl.float32)  # cos[:half] == cos[half:]
        s = tl.load(sin_ptr + pos * s_tab + d, mask=d_ok, other=0.0).to(tl.float32)
        hq = tl.arange(0, HQ_PAD)
        _rotate(q_ptr + t * sq_t, c, s, hq * sq_h, d, (hq < HQ)[:, None] & d_ok[None, :], HALF)
        hk = tl.arange(0, HK_PAD)
        _rotate(k_ptr + t * sk_t, c, s, hk * sk_h, d, (hk < HK)[:, None] & d_ok[None, :], HALF)
