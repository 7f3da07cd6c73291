"""Disaggregated serving on the wire: what a prefill worker hands a decode worker, via the frontend.

    frontend ── GenerateRequest(kv_transfer=KvTransferRequest(hold_s)) ──▶ prefill worker
             ◀── last delta: first token + KvTransferParams (which blocks, where, until when)
    frontend ── GenerateRequest(prompt + first token, kv_transfer=KvTransferRequest(source=params)) ──▶ decode worker
                decode worker ── pull the blocks it lacks (transfer backend) ──▶ prefill worker's memory
                decode worker ── kv_release(transfer_id) ──▶ prefill worker frees the blocks

The prefill worker holds the blocks until the release or until ``hold_s`` passes, never longer.
The layout travels with the parameters; a decode worker with another layout refuses them.
"""
from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

MAX_BLOCKS = 1 << 20  # blocks one transfer may name


class KvLayout(msgspec.Struct, frozen=True, kw_only=True):
    """How one engine lays out its paged KV cache (turbine/engine/kv_cache.py):
    ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`` of ``dtype``."""

    num_layers: Annotated[int, Meta(ge=1, le=4096)]
    num_kv_heads: Annotated[int, Meta(ge=1, le=4096)]
    head_dim: Annotated[int, Meta(ge=1, le=65536)]
    block_size: Annotated[int, Meta(ge=1, le=65536)]
    dtype: str  # "float32" | "bfloat16" | "float16"

    @property
    def itemsize(self) -> int:
        return {"float32": 4, "bfloat16": 2, "float16": 2}.get(self.dtype, 0)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over every layer, K and V."""
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def segment_bytes(self) -> int:
        """Bytes of one block of one layer's K (or V): the contiguous unit a copy moves."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    def mismatch(self, other: KvLayout) -> str | None:
        """Why ``other``'s blocks cannot be copied into this layout (None: they can)."""
        diffs = [f"{f} {getattr(other, f)} vs {getattr(self, f)}" for f in self.__struct_fields__
                 if getattr(self, f) != getattr(other, f)]
        return ", ".join(diffs) or None


class AgentInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Where a worker's KV memory can be read: the backend and what it needs to reach it."""

    backend: str  # "inproc" | "tcp" | "nixl" | "cuda_ipc" | "mock"
    layout: KvLayout | None = None  # None: no real memory (the mocker)
    metadata: bytes = b""  # backend specific (a NIXL agent's metadata, a CUDA IPC handle, a name)


class KvTransferParams(msgspec.Struct, frozen=True, kw_only=True):
    """A prefill worker's blocks, held for a decode worker to pull (the last delta of a prefill)."""

    transfer_id: Annotated[str, Meta(min_length=1, max_length=512)]
    worker_address: str  # the prefill worker's request plane: kv_read / kv_release
    agent: AgentInfo
    block_ids: Annotated[list[Annotated[int, Meta(ge=0, le=2**40)]], Meta(max_length=MAX_BLOCKS)]
    block_hashes: Annotated[list[int], Meta(max_length=MAX_BLOCKS)]  # chained hashes: the decode side checks them
    num_tokens: Annotated[int, Meta(ge=0)]  # prompt tokens whose KV the blocks hold (full blocks only)
    hold_s: float  # the blocks are held this long after the prefill finished, at most


class KvTransferRequest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """On a GenerateRequest: ``hold_s`` set = prefill only, keep the KV for a pull; ``source`` set =
    pull what the local prefix cache lacks from there, then decode."""

    hold_s: Annotated[float, Meta(gt=0, le=3600)] | None = None
    source: KvTransferParams | None = None


class KvRead(msgspec.Struct, frozen=True, kw_only=True):
    """Request of the TCP backend's ``kv_read`` endpoint (the answer is raw block bytes)."""

    transfer_id: str
    block_ids: list[int]


class KvRelease(msgspec.Struct, frozen=True, kw_only=True):
    transfer_id: str
