"""KV cache events in vLLM's wire layout, so stock vLLM/SGLang workers and Turbine's agree.

On the wire (ZMQ PUB): frames ``[topic, seq (8-byte big-endian), msgpack(KVEventBatch)]``.
Engines queue these events; the worker drains them, batches them and numbers the batches.
``block_hashes`` are sequence (chained) hashes; the router recomputes local hashes from
``token_ids``, unless the event carries them (``local_hashes``: Turbine's engines do).

In process, Turbine's engines hand out ``BlockStored.token_ids`` as a u32 ``array("I")`` (a slice
of the sequence's own tokens: no int objects); encoders of these events pass ``enc_hook`` (below),
which writes it as the list the wire layout has. Decoded events always hold lists.
"""
from __future__ import annotations

from array import array
from typing import Any

import msgspec


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """Base class of the three KV events."""


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    # Newer vLLM appends the adapter name (array position 7); it salts the router's local hashes.
    lora_name: str | None = None
    # Turbine's extension (position 8, absent from vLLM's events): each block's local hash, which
    # Turbine's engines compute anyway; a router takes them instead of hashing ``token_ids``.
    local_hashes: list[int] | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(EventBatch):
    events: list[KVEvent]  # type: ignore[assignment]


class KvStateSnapshot(msgspec.Struct, kw_only=True, gc=False):
    """A worker's full prefix-cache state, for a router that missed events (``kv_state`` endpoint).

    ``last_seq`` is the event-plane sequence number of the last batch the worker had published
    when it took the snapshot: later batches are not in ``blocks`` and must be applied on top.
    """

    last_seq: int
    blocks: list[BlockStored]


def enc_hook(obj: Any) -> Any:
    """msgspec ``enc_hook`` for KV events: a u32 token array (see the module docstring) as a list."""
    if type(obj) is array:
        return obj.tolist()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")
