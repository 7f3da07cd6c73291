"""Block hashing shared by the router and every worker (see DESIGN.md "Block hashing").

A block's *local* hash depends on its tokens only (the router can compute it from a prompt);
its *sequence* hash chains the parent's sequence hash, so it names the whole prefix.

    tokens:   [t0 .. t(B-1)] [tB .. t(2B-1)] [t2B .. partial]
    local:         L0              L1          (never hashed)
    sequence:   S0 = L0      S1 = H(S0, L1)
"""
from __future__ import annotations

import struct
from array import array
from collections.abc import Sequence
from typing import NamedTuple, NewType

import xxhash

LocalBlockHash = NewType("LocalBlockHash", int)
SequenceHash = NewType("SequenceHash", int)

HASH_SEED = 1337
_U64 = (1 << 64) - 1
_PACK_CHAIN = struct.Struct("<QQ").pack  # the same bytes as chain_hash's array("Q") (little-endian)


def lora_seed(lora_name: str | None) -> int:
    """The seed for local hashes: 1337, salted by the LoRA adapter name when there is one."""
    if not lora_name:
        return HASH_SEED
    return xxhash.xxh3_64_intdigest(lora_name.encode(), seed=HASH_SEED)


def local_block_hash(tokens: Sequence[int], seed: int = HASH_SEED) -> LocalBlockHash:
    """xxh3_64 of the block's token ids as little-endian u32."""
    buf = array("I", tokens)  # native u32; every platform Turbine runs on is little-endian
    return LocalBlockHash(xxhash.xxh3_64_intdigest(buf.tobytes(), seed=seed))


def chain_hash(parent: SequenceHash | None, local: LocalBlockHash) -> SequenceHash:
    """Sequence hash of a block: its local hash for the first block, else H(parent, local)."""
    if parent is None:
        return SequenceHash(local)
    buf = array("Q", (parent & _U64, local & _U64))
    return SequenceHash(xxhash.xxh3_64_intdigest(buf.tobytes(), seed=HASH_SEED))


def chain_hashes_u32(packed: memoryview, block_size: int, seed: int = HASH_SEED,
                     parent: SequenceHash | None = None,
                     locals_out: list[LocalBlockHash] | None = None) -> list[SequenceHash]:
    """Sequence hashes of the blocks of ``packed`` (token ids as little-endian u32 bytes, whole
    blocks), continuing the chain after ``parent``: the values of ``local_block_hash`` and
    ``chain_hash`` block by block, with one xxh3 call per hash and no per-block conversion.
    ``locals_out``: also append each block's local hash there (a worker's KV events carry them,
    so the router need not hash the tokens again)."""
    step = 4 * block_size
    h = xxhash.xxh3_64_intdigest
    out: list[SequenceHash] = []
    append = out.append
    keep = locals_out.append if locals_out is not None else None
    for off in range(0, len(packed) - step + 1, step):
        local = h(packed[off : off + step], seed)
        if keep is not None:
            keep(local)  # type: ignore[arg-type]
        parent = local if parent is None else h(_PACK_CHAIN(parent, local), HASH_SEED)  # type: ignore[assignment]
        append(parent)  # type: ignore[arg-type]
    return out


def chain_local_hashes(local_hashes: Sequence[int], parent: SequenceHash | None = None) -> list[SequenceHash]:
    """Sequence hashes of blocks whose local hashes are known, continuing the chain after
    ``parent``: the values ``chain_hashes_u32`` gives for the blocks these local hashes name."""
    h = xxhash.xxh3_64_intdigest
    out: list[SequenceHash] = []
    append = out.append
    for local in local_hashes:
        parent = local if parent is None else h(_PACK_CHAIN(parent, local), HASH_SEED)  # type: ignore[assignment]
        append(parent)  # type: ignore[arg-type]
    return out


class BlockHashes(NamedTuple):
    local: list[LocalBlockHash]
    sequence: list[SequenceHash]


def block_hashes(
    tokens: Sequence[int],
    block_size: int,
    lora_name: str | None = None,
    *,
    parent: SequenceHash | None = None,
) -> BlockHashes:
    """Local and sequence hashes of every *full* block of ``tokens`` (the tail is skipped).

    ``parent`` continues a chain: pass the sequence hash of the block before ``tokens[0]``.
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    seed = lora_seed(lora_name)
    n_full = len(tokens) // block_size
    locals_: list[LocalBlockHash] = []
    seqs: list[SequenceHash] = []
    prev = parent
    for i in range(n_full):
        lh = local_block_hash(tokens[i * block_size : (i + 1) * block_size], seed)
        prev = chain_hash(prev, lh)
        locals_.append(lh)
        seqs.append(prev)
    return BlockHashes(locals_, seqs)
