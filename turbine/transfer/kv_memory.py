"""Blocks of an engine's paged KV tensor as bytes and back (torch; the engine extra).

    data: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    gather(ids) -> [num_layers, 2, len(ids), block_size, num_kv_heads, head_dim], contiguous
    scatter(ids, src) writes such a tensor into blocks ``ids``

One block is ``2 * num_layers`` contiguous segments (one per layer, K and V), so a copy of n
blocks is an index_select / index_copy along dim 2: one kernel each on the GPU, a strided
memcpy on the CPU.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from turbine.protocols.kv_transfer import KvLayout


class KvMemory:
    def __init__(self, data: torch.Tensor, layout: KvLayout) -> None:
        if data.dim() != 6 or data.shape[1] != 2:
            raise ValueError(f"a KV cache tensor is [layers, 2, blocks, block_size, heads, head_dim], got {tuple(data.shape)}")
        self.data = data
        self.layout = layout
        self.num_blocks = data.shape[2]

    def _index(self, ids: Sequence[int]) -> torch.Tensor:
        idx = torch.tensor(list(ids), dtype=torch.long)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= self.num_blocks):
            raise ValueError(f"block ids outside [0, {self.num_blocks})")
        return idx.to(self.data.device)

    def gather(self, ids: Sequence[int]) -> torch.Tensor:
        return self.data.index_select(2, self._index(ids))

    def scatter(self, ids: Sequence[int], src: torch.Tensor) -> None:
        self.data.index_copy_(2, self._index(ids), src.to(self.data.device, non_blocking=False))

    def to_bytes(self, ids: Sequence[int]) -> bytes:
        t = self.gather(ids).cpu().contiguous()
        return t.view(-1).view(torch.uint8).numpy().tobytes()

    def from_bytes(self, ids: Sequence[int], data: bytes | bytearray | memoryview) -> None:
        shape = (self.data.shape[0], 2, len(ids), *self.data.shape[3:])
        expected = len(ids) * self.layout.block_bytes
        if len(data) != expected:
            raise ValueError(f"{len(data)} bytes for {len(ids)} blocks of {self.layout.block_bytes} bytes")
        with warnings.catch_warnings():  # read-only bytes are fine: the tensor is only copied from
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(data, dtype=torch.uint8)
        self.scatter(ids, flat.view(self.data.dtype).view(shape))
