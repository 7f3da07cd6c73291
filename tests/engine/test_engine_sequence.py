"""Sequence: incremental block hashes (the reference values), its u32 copy of the tokens."""
from __future__ import annotations

import random
from array import array

import pytest

from turbine.engine.sequence import PLACEHOLDER, Sequence
from turbine.protocols.generate import StopConditions
from turbine.protocols.block_hashing import block_hashes


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


def test_tokens_are_a_u32_array_or_a_list_for_ids_that_are_no_u32() -> None:
    seq = _seq([3, 4, 5])
    assert type(seq.token_ids) is array and seq.token_ids.typecode == "I"
    assert seq.hashed_tokens_u32() is seq.token_ids  # hashed in place, no second copy
    seq.extend_tokens([6, 7])
    seq.append_token(PLACEHOLDER)
    assert seq.prompt_token_ids == [3, 4, 5] and seq.output_token_ids == [6, 7, PLACEHOLDER]
    own = array("I", [1, 2])
    other = Sequence("x", own, stop=StopConditions(max_tokens=1))
    own[0] = 9
    assert other.token_ids.tolist() == [1, 2]  # a copy of the caller's array
    odd = _seq([1, 2**40, 3])  # no u32 (no engine accepts it): kept as given
    odd.extend_tokens([4])
    assert odd.token_ids == [1, 2**40, 3, 4] and odd.prompt_token_ids == [1, 2**40, 3]


@pytest.mark.parametrize("lora", [None, "adapter"])
def test_adopted_block_hashes_continue_like_computed_ones(lora: str | None) -> None:
    rng = random.Random(5)
    prompt = [rng.randrange(0, 50_000) for _ in range(4 * 3 + 2)]
    mine = _seq(prompt, lora)
    adopted = _seq(prompt, lora)
    adopted.adopt_block_hashes(4, block_hashes(prompt, 4, lora).sequence + [123])  # extra hashes are ignored
    assert adopted.block_hashes(4) == mine.block_hashes(4)
    for t in (7, 8, 9, 10, 11):
        mine.append_token(t)
        adopted.append_token(t)
        assert adopted.block_hashes(4) == mine.block_hashes(4)
    with pytest.raises(ValueError, match="already hashed"):
        adopted.adopt_block_hashes(4, [])
    odd = _seq([1, 2, 3, 4, 2**40])
    odd.adopt_block_hashes(2, block_hashes([1, 2, 3, 4], 2).sequence)
    assert odd.hashed_tokens_u32().tolist()[:4] == [1, 2, 3, 4]  # a list's u32 copy covers them
