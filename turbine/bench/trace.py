"""Mooncake-format traces: loading, the trace's own reuse, and deterministic prompt tokens.

A Mooncake trace is JSONL, one request a line::

    {"timestamp": 1500, "input_length": 1100, "output_length": 20, "hash_ids": [7, 8, 31]}

``timestamp`` is the arrival in ms; ``hash_ids`` name the prompt's 512-token blocks, equal ids
at the same position meaning a shared prefix. Replaying needs real token ids, so every hash id
becomes a fixed pseudo-random block (seeded by the id), the blocks are concatenated and the last
one is cut to ``input_length``::

    hash_ids   [7]          [8]          [31]
    tokens     b(7)[0:512]  b(8)[0:512]  b(31)[0:76]     (input_length 1100)

Two requests starting with the same ids therefore start with the same tokens, which is what a
prefix cache and a KV-aware router can exploit. No tokenizer is involved: the ids are sent as a
token-id prompt. They avoid special tokens by staying inside ``token_range(vocab_size)``.
"""
from __future__ import annotations

import _random
import json
import random
from array import array
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import msgspec
import xxhash

from turbine.protocols.block_hashing import HASH_SEED, chain_local_hashes

MOONCAKE_BLOCK_TOKENS = 512
"""Tokens each Mooncake hash id stands for."""

DEFAULT_VOCAB_SIZE = 4096
"""Turbine's tiny generated model; pass the served model's vocabulary size otherwise."""

_HASHES_MEMO = 1 << 16  # hash ids whose block hashes TokenSynth keeps (~40 MiB at 8 blocks each)
_LOW_RESERVED = 16  # ids some tokenizers give <unk>/<s>/</s>/<pad> (Llama 2, Mistral)
_HIGH_RESERVED = 512  # special/added ids at the end (Turbine's, Llama 3's 256, Qwen's ~290)


class TraceRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One request of a trace. ``timestamp_ms`` is its recorded arrival time."""

    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def token_range(vocab_size: int) -> tuple[int, int]:
    """``[lo, hi)``: the ids synthesized prompts use, clear of special ids at either end."""
    if vocab_size < 4 * _HIGH_RESERVED:
        raise ValueError(f"vocab size must be at least {4 * _HIGH_RESERVED}, got {vocab_size}")
    return _LOW_RESERVED, vocab_size - _HIGH_RESERVED


def _int_field(obj: dict, key: str, where: str, minimum: int) -> int:
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < minimum:
        raise ValueError(f"{where}: {key!r} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def parse_trace_line(line: str, where: str = "trace", block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> TraceRequest:
    """One JSONL line -> TraceRequest; ValueError naming ``where`` if it is malformed."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object")
    ts = obj.get("timestamp")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or ts < 0:
        raise ValueError(f"{where}: 'timestamp' must be a number of ms >= 0, got {ts!r}")
    n_in = _int_field(obj, "input_length", where, 1)
    n_out = _int_field(obj, "output_length", where, 1)
    ids = obj.get("hash_ids")
    if not isinstance(ids, list) or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in ids):
        raise ValueError(f"{where}: 'hash_ids' must be a list of non-negative integers")
    if n_in > len(ids) * block_tokens:
        raise ValueError(
            f"{where}: input_length {n_in} exceeds its {len(ids)} hash ids x {block_tokens} tokens"
        )
    return TraceRequest(timestamp_ms=float(ts), input_length=n_in, output_length=n_out, hash_ids=tuple(ids))


def load_trace(
    path: str | Path, max_requests: int | None = None, *, block_tokens: int = MOONCAKE_BLOCK_TOKENS
) -> list[TraceRequest]:
    """The first ``max_requests`` requests of a Mooncake JSONL file, sorted by arrival (stable)."""
    if max_requests is not None and max_requests < 1:
        raise ValueError(f"max_requests must be >= 1, got {max_requests}")
    out: list[TraceRequest] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            out.append(parse_trace_line(line, f"{path}:{lineno}", block_tokens))
            if max_requests is not None and len(out) >= max_requests:
                break
    if not out:
        raise ValueError(f"{path}: the trace holds no requests")
    out.sort(key=lambda r: r.timestamp_ms)
    return out


def write_trace(path: str | Path, requests: Iterable[TraceRequest]) -> None:
    """Write requests as Mooncake JSONL (tests and tools that build synthetic traces)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in requests:
            ts: float | int = int(r.timestamp_ms) if r.timestamp_ms == int(r.timestamp_ms) else r.timestamp_ms
            f.write(json.dumps({"timestamp": ts, "input_length": r.input_length,
                                "output_length": r.output_length, "hash_ids": list(r.hash_ids)}) + "\n")


def ideal_hit_rate(requests: Iterable[TraceRequest]) -> float:
    """Fraction of hash-id blocks already seen earlier in the trace: the reuse a single cache of
    unlimited size would get. A property of the trace, the ceiling for any router."""
    seen: set[int] = set()
    total = reused = 0
    for r in requests:
        for h in r.hash_ids:
            total += 1
            if h in seen:
                reused += 1
            else:
                seen.add(h)
    return reused / total if total else 0.0


def arrival_offsets_s(requests: Sequence[TraceRequest], speed: float = 1.0) -> list[float]:
    """Seconds from the first request to each request, compressed by ``speed`` (2 = twice as fast)."""
    if not speed > 0:
        raise ValueError(f"speed must be positive, got {speed}")
    if not requests:
        return []
    t0 = requests[0].timestamp_ms
    return [(r.timestamp_ms - t0) / 1000.0 / speed for r in requests]


@lru_cache(maxsize=64)
def _lane_patterns(bits: int, lo: int, lanes: int) -> tuple[int, int]:
    """(mask, offset) big ints holding ``2**bits - 1`` and ``lo`` in each 32-bit lane."""
    mask = offset = 0
    for _ in range(lanes):
        mask = (mask << 32) | ((1 << bits) - 1)
        offset = (offset << 32) | lo
    return mask, offset


_RNG = random.Random()
_SEED_RNG = _random.Random.seed  # what Random.seed does for an int, minus its Python-level dispatch


@lru_cache(maxsize=32768)  # 32k blocks x 2 KiB = 64 MiB at most (the Mooncake trace has 44k)
def _block_bytes(hash_id: int, lo: int, bits: int, block_tokens: int, seed: int) -> bytes:
    """u32 little-endian ids in ``[lo, lo + 2**bits)``: one random big int, masked and offset lane
    by lane (lo + 2**bits < 2**32, so no lane carries into the next): no per-token Python. The
    generator is ``random.Random((seed << 64) ^ hash_id)`` (one instance, re-seeded)."""
    mask, offset = _lane_patterns(bits, lo, block_tokens)
    _SEED_RNG(_RNG, (seed << 64) ^ hash_id)
    x = _RNG.getrandbits(32 * block_tokens)
    return ((x & mask) + offset).to_bytes(4 * block_tokens, "little")


class TokenSynth:
    """Hash id -> its fixed token block; request -> its prompt. Deterministic across runs and
    processes (Mersenne Twister seeded by the id and ``seed``), so a simulation and a live
    replay of the same trace see the same tokens."""

    def __init__(self, vocab_size: int = DEFAULT_VOCAB_SIZE, *, block_tokens: int = MOONCAKE_BLOCK_TOKENS,
                 seed: int = 0) -> None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        self.lo, hi = token_range(vocab_size)
        self.bits = (hi - self.lo).bit_length() - 1  # ids span a power of two inside the range
        self.vocab_size = vocab_size
        self.block_tokens = block_tokens
        self.seed = seed
        # (block size, seed) -> hash id -> [its blocks' local hashes, the sequence hash they chain
        # from last time, their sequence hashes then]
        self._hashes: dict[tuple[int, int], dict[int, list]] = {}

    def block(self, hash_id: int) -> list[int]:
        """The ``block_tokens`` token ids hash id ``hash_id`` stands for."""
        return array("I", _block_bytes(hash_id, self.lo, self.bits, self.block_tokens, self.seed)).tolist()

    def prompt_array(self, request: TraceRequest) -> array:
        """The request's prompt as u32 ids: its blocks concatenated, the last cut to
        ``input_length``. Hashing an array is cheaper than hashing a list of Python ints."""
        n = request.input_length
        if n > len(request.hash_ids) * self.block_tokens:
            raise ValueError(f"input_length {n} exceeds {len(request.hash_ids)} blocks of {self.block_tokens}")
        need = -(-n // self.block_tokens)
        args = (self.lo, self.bits, self.block_tokens, self.seed)
        buf = b"".join([_block_bytes(h, *args) for h in request.hash_ids[:need]])
        out = array("I")
        out.frombytes(buf[: 4 * n])
        return out

    def prompt_block_hashes(self, request: TraceRequest, block_size: int,
                            seed: int = HASH_SEED) -> tuple[list[int], list[int]] | None:
        """Local and sequence hashes (``turbine.protocols.block_hashing``: ``local_block_hash`` with
        ``seed``, ``chain_hash``) of the full ``block_size``-token blocks of the request's prompt:
        the values hashing `prompt_array` gives, computed once per hash id (its blocks lie inside
        its own ``block_tokens``; its sequence hashes are kept with the sequence hash they chain
        from, and reused when a request reaches it through the same one). None when ``block_size``
        does not divide ``block_tokens`` (a block would span two hash ids)."""
        if block_size < 1 or self.block_tokens % block_size:
            return None
        memo = self._hashes.get((block_size, seed))
        if memo is None or len(memo) >= _HASHES_MEMO:
            memo = self._hashes[(block_size, seed)] = {}
        whole, part = divmod(request.input_length // block_size, self.block_tokens // block_size)
        local: list[int] = []
        chained: list[int] = []
        parent = None
        entry: list = []
        for h in request.hash_ids[: whole + (part > 0)]:
            entry = memo.get(h)  # type: ignore[assignment]
            if entry is None:
                entry = memo[h] = [self._local_hashes(h, block_size, seed), None, ()]
            if entry[1] != parent or not entry[2]:
                entry[1] = parent
                entry[2] = tuple(chain_local_hashes(entry[0], parent))
            local += entry[0]
            chained += entry[2]
            parent = entry[2][-1]
        if part:
            cut = len(local) - len(entry[0]) + part
            del local[cut:], chained[cut:]
        return local, chained

    def _local_hashes(self, hash_id: int, block_size: int, seed: int) -> tuple[int, ...]:
        step = 4 * block_size
        h = xxhash.xxh3_64_intdigest
        with memoryview(_block_bytes(hash_id, self.lo, self.bits, self.block_tokens, self.seed)) as raw:
            return tuple([h(raw[i : i + step], seed) for i in range(0, len(raw), step)])

    def prompt(self, request: TraceRequest) -> list[int]:
        """`prompt_array` as a list (what a GenerateRequest or a JSON body carries)."""
        return self.prompt_array(request).tolist()


__all__ = [
    "DEFAULT_VOCAB_SIZE", "MOONCAKE_BLOCK_TOKENS", "TokenSynth", "TraceRequest", "arrival_offsets_s",
    "ideal_hit_rate", "load_trace", "parse_trace_line", "token_range", "write_trace",
]
