"""Building blocks of a Llama-shaped decoder, numerically as ``transformers`` computes them.

Each block follows HF's order of operations and dtype casts (RMSNorm in float32 then cast back
before the weight; RoPE cos/sin from float32 frequencies cast to the activation dtype), so a
float32 model matches HF to rounding and a bf16 one stays within bf16 noise of it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from turbine.engine.models.config import RopeScaling

__all__ = ["RMSNorm", "RotaryEmbedding", "SiluAndMul", "apply_rotary", "rope_inv_freq"]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` of a fused ``[..., 2 * intermediate]`` gate/up projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


class RotaryEmbedding:
    """cos/sin for a step's positions, computed once per forward and shared by every layer.

    Deliberately not an nn.Module: the frequencies are derived from the config, never loaded,
    and must survive the loader's meta-device build (``to_empty`` would blank a buffer).
    """

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None) -> None:
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)

    def to(self, device: torch.device | str) -> RotaryEmbedding:
        """Move the frequencies (the loader does, so no copy happens during CUDA-graph capture)."""
        self.inv_freq = self.inv_freq.to(device)
        return self

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, 1, head_dim] in ``dtype`` (broadcast over heads)."""
        if self.inv_freq.device != positions.device:  # a model moved after loading
            self.to(positions.device)
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; HF's rotate-half convention (the two halves form the pairs)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
