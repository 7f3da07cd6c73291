"""The paged KV cache: device tensors laid out exactly as the block manager hands blocks out.

One allocation holds every layer, K and V, every block:

    data: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
                       ^K/V ^block id from seq.block_table
    token at position p of a sequence lives in block  block_table[p // block_size],
    row  p % block_size;  its flat "slot" is  block_id * block_size + p % block_size

Per layer, ``key(l)`` / ``value(l)`` are views ``[num_blocks, block_size, num_kv_heads, head_dim]``
and ``key_slots(l)`` the same memory as ``[num_blocks * block_size, num_kv_heads, head_dim]``, so
writing a step's k/v is one ``index_copy_`` by slot. One block of one layer is contiguous
(``block_size * num_kv_heads * head_dim`` elements), which is what a KV transfer copies.

The cache starts zeroed: batched attention gathers padded block ids (masked out), and masked
garbage must still be finite (NaN * 0 is NaN). On CUDA a step's K and V are stored by one Triton
kernel (one launch per layer instead of two ``index_copy_``; graph-safe).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

try:  # the fused write is an accelerator, never a requirement
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

__all__ = ["KVCache", "KVCacheSpec", "num_blocks_for_bytes", "write_kv_triton"]

# CPU has no memory fraction to size by: a fixed budget, enough for tests and small models.
CPU_DEFAULT_BYTES = 256 << 20
CPU_DEFAULT_MAX_TOKENS = 1 << 17


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size


def num_blocks_for_bytes(spec: KVCacheSpec, budget_bytes: int) -> int:
    """How many whole blocks fit ``budget_bytes`` (0 when it is not even one)."""
    return max(0, int(budget_bytes) // spec.bytes_per_block)


class KVCache:
    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device | str) -> None:
        if num_blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.spec = spec
        self.num_blocks = num_blocks
        self.block_size = spec.block_size
        self.device = torch.device(device)
        self.data = torch.zeros(
            (spec.num_layers, 2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim),
            dtype=spec.dtype,
            device=self.device,
        )
        n_slots = num_blocks * spec.block_size
        self._k = [self.data[l, 0] for l in range(spec.num_layers)]
        self._v = [self.data[l, 1] for l in range(spec.num_layers)]
        self._k_slots = [t.view(n_slots, spec.num_kv_heads, spec.head_dim) for t in self._k]
        self._v_slots = [t.view(n_slots, spec.num_kv_heads, spec.head_dim) for t in self._v]

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def key(self, layer: int) -> torch.Tensor:
        """``[num_blocks, block_size, num_kv_heads, head_dim]`` keys of ``layer``."""
        return self._k[layer]

    def value(self, layer: int) -> torch.Tensor:
        return self._v[layer]

    def key_slots(self, layer: int) -> torch.Tensor:
        """``[num_blocks * block_size, num_kv_heads, head_dim]`` keys of ``layer`` by flat slot."""
        return self._k_slots[layer]

    def value_slots(self, layer: int) -> torch.Tensor:
        return self._v_slots[layer]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the step's ``k``/``v`` ``[T, num_kv_heads, head_dim]`` at flat ``slots`` ``[T]``."""
        if triton is not None and k.is_cuda and k.stride(-1) == 1 and v.stride(-1) == 1:
            write_kv_triton(k, v, self._k_slots[layer], self._v_slots[layer], slots)
            return
        self._k_slots[layer].index_copy_(0, slots, k.to(self.spec.dtype))
        self._v_slots[layer].index_copy_(0, slots, v.to(self.spec.dtype))


def write_kv_triton(k: torch.Tensor, v: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor,
                    slots: torch.Tensor) -> None:
    """k/v [T, Hkv, D] (any token/head strides, D contiguous) into contiguous ``[S, Hkv, D]`` caches."""
    t, hkv, d = k.shape
    if t == 0:
        return
    _write_kv_kernel[(t,)](k, v, k_slots, v_slots, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                           HKV=hkv, D=d, HKV_PAD=triton.next_power_of_2(hkv), D_PAD=triton.next_power_of_2(d),
                           num_warps=4)


if triton is not None:

    @triton.jit
    def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, sk_t, sk_h, sv_t, sv_h,
                         HKV: tl.constexpr, D: tl.constexpr, HKV_PAD: tl.constexpr, D_PAD: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        h = tl.arange(0, HKV_PAD)
        d = tl.arange(0, D_PAD)
        ok = (h < HKV)[:, None] & (d < D)[None, :]
        dst = slot * (HKV * D) + h[:, None] * D + d[None, :]
        k = tl.load(k_ptr + t * sk_t + h[:, None] * sk_h + d[None, :], mask=ok)
        tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=ok)
        v = tl.load(v_ptr + t * sv_t + h[:, None] * sv_h + d[None, :], mask=ok)
        tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=ok)
