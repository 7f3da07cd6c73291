"""Decode KV event batches from any vLLM-compatible publisher into Turbine's event structs.

vLLM has put two msgpack layouts on the wire, and both are accepted:

    array-like (msgspec ``array_like=True``; what ``turbine.protocols.kv_events`` encodes)
        batch  [ts, [event, ...], data_parallel_rank?]
        event  ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size,
                lora_id?, medium?, lora_name?, ...]
               ["BlockRemoved", block_hashes, medium?, ...]   ["AllBlocksCleared", ...]
    map
        batch  {"ts": .., "events": [..], "data_parallel_rank" (or "dp_rank"): ..}
        event  {"type": "BlockStored", "block_hashes": .., ...}   (unknown keys ignored)

Block hashes are ints in older vLLM and ``bytes`` (a sha256 digest) in newer vLLM. The index
keys blocks by int, so a bytes hash becomes ``xxh3_64_intdigest(bytes)``: deterministic, so a
BlockStored, its children's ``parent_block_hash`` and a later BlockRemoved all agree.

The common case (array layout, int hashes, known event types) is one typed msgspec decode; any
other payload falls back to a generic decode and a field-by-field conversion. Unknown event
types are skipped and counted; a payload that is not a batch raises ValueError.
"""
from __future__ import annotations

from typing import Any

import msgspec
import xxhash

from turbine.protocols.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, KVEventBatch

def block_hash_to_int(h: object) -> int:
    """An engine block hash as an int: ints pass through, bytes go through xxh3_64."""
    if type(h) is int:
        return h
    if isinstance(h, (bytes, bytearray, memoryview)):
        return xxhash.xxh3_64_intdigest(bytes(h))
    raise ValueError(f"a block hash must be an int or bytes, got {type(h).__name__}")


def _opt_hash(h: object) -> int | None:
    return None if h is None else block_hash_to_int(h)


def _int_list(v: object, what: str) -> list[int]:
    if not isinstance(v, list) or any(type(x) is not int for x in v):
        raise ValueError(f"{what} must be a list of ints")
    return v


def _opt(v: object, kind: type, what: str) -> Any:
    if v is not None and type(v) is not kind:
        raise ValueError(f"{what} must be {kind.__name__} or null, got {type(v).__name__}")
    return v


class KvEventDecoder:
    """Decodes payloads and counts what it had to skip; one per subscriber (not thread-safe)."""

    def __init__(self) -> None:
        self._typed = msgspec.msgpack.Decoder(KVEventBatch)
        self._generic = msgspec.msgpack.Decoder()
        self.unknown_events: dict[str, int] = {}  # event type name -> times skipped
        self.slow_path = 0  # payloads that needed the generic decode

    def decode(self, payload: bytes) -> KVEventBatch:
        try:
            return self._typed.decode(payload)
        except (msgspec.ValidationError, msgspec.DecodeError):
            pass
        self.slow_path += 1
        try:
            raw = self._generic.decode(payload)
        except msgspec.DecodeError as e:
            raise ValueError(f"KV event batch is not valid msgpack: {e}") from None
        return self._batch(raw)

    # -- the generic path ---------------------------------------------------------------------
    def _batch(self, raw: object) -> KVEventBatch:
        if isinstance(raw, list):
            if len(raw) < 2:
                raise ValueError(f"KV event batch array needs [ts, events, ...], got {len(raw)} items")
            ts, events = raw[0], raw[1]
            rank = raw[2] if len(raw) > 2 else None
        elif isinstance(raw, dict):
            if "ts" not in raw or "events" not in raw:
                raise ValueError("KV event batch map needs 'ts' and 'events'")
            ts, events = raw["ts"], raw["events"]
            rank = raw.get("data_parallel_rank", raw.get("dp_rank"))
        else:
            raise ValueError(f"KV event batch must be an array or a map, got {type(raw).__name__}")
        if type(ts) not in (int, float):
            raise ValueError(f"KV event batch 'ts' must be a number, got {type(ts).__name__}")
        if not isinstance(events, list):
            raise ValueError("KV event batch 'events' must be an array")
        _opt(rank, int, "data_parallel_rank")
        out: list[KVEvent] = []
        for i, ev in enumerate(events):
            try:
                decoded = self._event(ev)
            except ValueError as e:
                raise ValueError(f"KV event {i} of the batch: {e}") from None
            if decoded is not None:
                out.append(decoded)
        return KVEventBatch(ts=float(ts), events=out, data_parallel_rank=rank)

    def _event(self, ev: object) -> KVEvent | None:
        if isinstance(ev, list):
            if not ev or not isinstance(ev[0], str):
                raise ValueError("an array event must start with its type name")
            kind = ev[0]
            names = _FIELDS.get(kind)
            f = dict(zip(names, ev[1:])) if names is not None else {}
        elif isinstance(ev, dict):
            kind = ev.get("type")
            if not isinstance(kind, str):
                raise ValueError("a map event needs a string 'type'")
            f = ev
        else:
            raise ValueError(f"an event must be an array or a map, got {type(ev).__name__}")
        if kind == "BlockStored":
            for key in ("block_hashes", "token_ids", "block_size"):
                if key not in f:
                    raise ValueError(f"BlockStored lacks {key!r}")
            hashes = f["block_hashes"]
            if not isinstance(hashes, list):
                raise ValueError("block_hashes must be a list")
            block_size = f["block_size"]
            if type(block_size) is not int or block_size <= 0:
                raise ValueError(f"block_size must be a positive int, got {block_size!r}")
            return BlockStored(
                block_hashes=[block_hash_to_int(h) for h in hashes],
                parent_block_hash=_opt_hash(f.get("parent_block_hash")),
                token_ids=_int_list(f["token_ids"], "token_ids"),
                block_size=block_size,
                lora_id=_opt(f.get("lora_id"), int, "lora_id"),
                medium=_opt(f.get("medium"), str, "medium"),
                lora_name=_opt(f.get("lora_name"), str, "lora_name"),
            )
        if kind == "BlockRemoved":
            hashes = f.get("block_hashes")
            if not isinstance(hashes, list):
                raise ValueError("BlockRemoved needs a block_hashes list")
            return BlockRemoved(block_hashes=[block_hash_to_int(h) for h in hashes],
                                medium=_opt(f.get("medium"), str, "medium"))
        if kind == "AllBlocksCleared":
            return AllBlocksCleared()
        self.unknown_events[kind] = self.unknown_events.get(kind, 0) + 1
        return None


# Positional field names of the array layout, after the type tag (extra trailing items ignored).
_FIELDS: dict[str, tuple[str, ...]] = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
                    "lora_name"),
    "BlockRemoved": ("block_hashes", "medium"),
    "AllBlocksCleared": (),
}

_default = KvEventDecoder()


def decode_kv_event_batch(payload: bytes) -> KVEventBatch:
    """Decode one payload with the module's shared decoder (its counters: ``default_decoder()``)."""
    return _default.decode(payload)


def default_decoder() -> KvEventDecoder:
    return _default
