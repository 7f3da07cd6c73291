"""Sequence: incremental block hashes (the reference values), its u32 copy of the tokens."""
from __future__ import annotations

import random
from array import array

import pytest

from turbine.engine.sequence import PLACEHOLDER, Sequence
from turbine.protocols.generate import StopConditions
from turbine.router.hashing import block_hashes


def _seq(prompt: list[int], lora: str | None = None) -> Sequence:
    return Sequence("r", prompt, stop=StopConditions(max_tokens=100), lora_name=lora)


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("lora", [None, "adapter"])
def test_incremental_hashes_equal_the_reference(block_size: int, lora: str | None) -> None:
    rng = random.Random(block_size)
    prompt = [rng.randrange(0, 50_000) for _ in range(block_size * 3 + 1)]
    seq = _seq(prompt, lora)
    tokens = list(prompt)
    assert seq.block_hashes(block_size) == block_hashes(tokens, block_size, lora).sequence
    for _ in range(block_size * 4 + 3):
        t = rng.randrange(0, 50_000)
        seq.append_token(t)
        tokens.append(t)
        assert seq.block_hashes(block_size) == block_hashes(tokens, block_size, lora).sequence
    n = len(seq.block_hashes(block_size)) * block_size
    assert seq.hashed_tokens_u32()[:n].tolist() == tokens[:n]


def test_placeholders_are_not_hashed_until_filled() -> None:
    seq = _seq([5, 6, 7])
    seq.append_token(PLACEHOLDER)
    assert seq.block_hashes(4) == []
    seq.token_ids[-1] = 8
    assert seq.block_hashes(4) == block_hashes([5, 6, 7, 8], 4).sequence


def test_prompt_u32_packs_once_or_adopts_the_callers_copy() -> None:
    prompt = [9, 8, 7, 6, 5]
    seq = _seq(prompt)
    packed = seq.prompt_u32(array("I", prompt))
    assert packed.tolist() == prompt and seq.prompt_u32() is packed
    assert seq.block_hashes(2) == block_hashes(prompt, 2).sequence
    other = _seq(prompt)
    assert other.prompt_u32(array("I", prompt[:3])).tolist() == prompt  # a copy of another length: packed here
    with pytest.raises(OverflowError):
        _seq([1, -2, 3]).prompt_u32()
    with pytest.raises(OverflowError):
        _seq([1, 2, 2**32]).block_hashes(1)
