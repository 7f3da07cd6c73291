"""Pinned block-hash values: every worker and router must agree on them, across releases."""
from __future__ import annotations

import struct

import pytest
import xxhash

from turbine.protocols.block_hashing import (
    HASH_SEED,
    block_hashes,
    chain_hash,
    local_block_hash,
    lora_seed,
)
from turbine.router.indexer import hash_blocks


def test_local_hash_is_xxh3_of_little_endian_u32_with_seed_1337() -> None:
    by_hand = bytes([1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0])  # 1, 2, 3, 4 as LE u32
    assert struct.pack("<4I", 1, 2, 3, 4) == by_hand
    expected = xxhash.xxh3_64_intdigest(by_hand, seed=1337)
    assert local_block_hash([1, 2, 3, 4]) == expected == 14643705804678351452
    # big token ids use all four bytes, lowest first
    assert local_block_hash([0x01020304]) == xxhash.xxh3_64_intdigest(b"\x04\x03\x02\x01", seed=HASH_SEED)


def test_pinned_local_hashes() -> None:
    assert local_block_hash(list(range(16))) == 15310707395893867146
    assert block_hashes(list(range(10)), 4).local == [9143094415614847814, 12124091508212882195]


def test_pinned_chained_sequence_hashes() -> None:
    hs = block_hashes(list(range(10)), 4)  # 2 full blocks; the 2-token tail is never hashed
    assert hs.sequence == [9143094415614847814, 9510318385840434533]
    assert hs.sequence[0] == hs.local[0]  # the first block's sequence hash is its local hash
    assert chain_hash(hs.sequence[0], hs.local[1]) == hs.sequence[1]
    # the chain is xxh3 (seed 1337) of (parent, local) as two little-endian u64
    assert chain_hash(123, 456) == xxhash.xxh3_64_intdigest(struct.pack("<2Q", 123, 456), seed=1337)
    assert chain_hash(123, 456) == 5428555674194055336
    # continuing a chain from a parent gives the same hashes as hashing the whole prompt
    tail = block_hashes(list(range(4, 8)), 4, parent=hs.sequence[0])
    assert tail.sequence == hs.sequence[1:]


def test_pinned_lora_salted_hashes() -> None:
    assert lora_seed(None) == lora_seed("") == HASH_SEED
    assert lora_seed("my-adapter") == xxhash.xxh3_64_intdigest(b"my-adapter", seed=1337) == 107349570576321665
    salted = block_hashes(list(range(10)), 4, "my-adapter")
    assert salted.local == [3865466936782180115, 8384710386267379510]
    assert salted.sequence == [3865466936782180115, 9029779648062030658]
    assert salted.local[0] != block_hashes(list(range(10)), 4).local[0]


@pytest.mark.parametrize("n_tokens", [0, 3, 4, 5, 64, 67])
@pytest.mark.parametrize("lora", [None, "my-adapter"])
def test_indexer_fast_hashing_agrees_with_reference(n_tokens: int, lora: str | None) -> None:
    tokens = [(i * 7919) % 151_000 for i in range(n_tokens)]
    assert hash_blocks(tokens, 4, lora_seed(lora)) == block_hashes(tokens, 4, lora).local


def test_bad_block_size_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="block_size"):
        block_hashes([1, 2, 3], 0)


@pytest.mark.parametrize("block_size", [1, 3, 16, 64])
@pytest.mark.parametrize("lora", [None, "adapter-a"])
def test_one_pass_chained_hashes_agree_with_reference(block_size: int, lora: str | None) -> None:
    import random
    from array import array

    from turbine.protocols.block_hashing import chain_hashes_u32

    rng = random.Random(block_size)
    tokens = [rng.randrange(0, 2**32) for _ in range(block_size * 9 + 2)]
    ref = block_hashes(tokens, block_size, lora).sequence
    raw = memoryview(array("I", tokens)).cast("B")
    seed = lora_seed(lora)
    assert chain_hashes_u32(raw, block_size, seed) == ref  # a partial block at the end is skipped
    # a chain continued after its fourth block
    assert chain_hashes_u32(raw[block_size * 4 * 4 :], block_size, seed, ref[3]) == ref[4:]
    assert chain_hashes_u32(raw[:4 * (block_size - 1)], block_size, seed) == []
