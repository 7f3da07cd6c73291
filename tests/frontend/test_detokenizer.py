from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turbine.frontend.detokenizer import IncrementalDetokenizer
from turbine.frontend.tokenizer import TurbineTokenizer
from turbine.model_maker import make_model

MULTILINGUAL = "Grüße, 世界! 🎉👩‍💻 naïve café — ありがとう 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ok"


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> TurbineTokenizer:
    return TurbineTokenizer.from_dir(make_model(tmp_path_factory.mktemp("tiny")))


class Recorder:
    """Wraps a tokenizer and records how many ids each decode call sees."""

    def __init__(self, inner: TurbineTokenizer) -> None:
        self.inner = inner
        self.special_token_ids = inner.special_token_ids
        self.window_sizes: list[int] = []

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.window_sizes.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens)


def _stream(tok, ids: list[int], cuts: Sequence[int], **kw) -> tuple[list[str], str]:
    det = IncrementalDetokenizer(tok, **kw)
    chunks, start = [], 0
    for cut in sorted(set(cuts)) + [len(ids)]:
        chunks.append(det.push(ids[start:cut]))
        start = cut
    return chunks, det.flush()


def _check(tok, ids: list[int], cuts: Sequence[int], skip: bool = True) -> None:
    chunks, tail = _stream(tok, ids, cuts, skip_special_tokens=skip)
    full = tok.decode(ids, skip_special_tokens=skip)
    so_far = ""
    for chunk in chunks:
        so_far += chunk
        assert full.startswith(so_far)  # nothing emitted is ever taken back
    assert so_far + tail == full


unicode_text = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8", exclude_characters="\ufffd"),
        st.sampled_from("世界ありがとう🎉👩‍💻é\u0301𝔘 \n"),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(text=unicode_text, data=st.data())
def test_random_text_random_chunking(tok: TurbineTokenizer, text: str, data: st.DataObject) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    cuts = data.draw(st.lists(st.integers(0, len(ids)), max_size=len(ids)))
    chunks, tail = _stream(tok, ids, cuts)
    assert "".join(chunks) + tail == text
    assert all("\ufffd" not in c for c in chunks)  # valid input never streams broken UTF-8


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_random_token_ids(tok: TurbineTokenizer, data: st.DataObject) -> None:
    # Arbitrary ids, including bytes that never form valid UTF-8 and special tokens.
    ids = data.draw(st.lists(
        st.one_of(st.integers(0, tok.vocab_size - 1), st.integers(128, 255),
                  st.sampled_from(sorted(tok.special_token_ids))),
        max_size=30,
    ))
    cuts = data.draw(st.lists(st.integers(0, len(ids)), max_size=len(ids)))
    _check(tok, ids, cuts, skip=data.draw(st.booleans()))


def test_every_split_point_and_one_token_at_a_time(tok: TurbineTokenizer) -> None:
    ids = tok.encode(MULTILINGUAL, add_special_tokens=False)
    assert len(ids) > len(MULTILINGUAL)  # multi-byte characters span several tokens
    for i in range(len(ids) + 1):
        _check(tok, ids, [i])
    _check(tok, ids, range(len(ids)))


def test_partial_character_is_held_back(tok: TurbineTokenizer) -> None:
    ids = tok.encode("a🎉", add_special_tokens=False)
    det = IncrementalDetokenizer(tok)
    outputs = [det.push([i]) for i in ids]
    assert outputs[0] == "a"
    assert all(o == "" for o in outputs[1:-1]) and outputs[-1] == "🎉"
    # An unfinished character only appears (as U+FFFD) when the stream ends.
    det = IncrementalDetokenizer(tok)
    assert det.push(ids[:-1]) == "a"
    assert det.flush() == "\ufffd"
    assert det.flush() == ""


def test_prompt_gives_context_but_is_not_emitted(tok: TurbineTokenizer) -> None:
    prompt = tok.encode("Hello", add_special_tokens=True)
    output = tok.encode(" world, 世界", add_special_tokens=False)
    det = IncrementalDetokenizer(tok, prompt_ids=prompt)
    assert "".join(det.push([i]) for i in output) + det.flush() == " world, 世界"
    assert det.num_output_tokens == len(output)


def test_special_tokens(tok: TurbineTokenizer) -> None:
    eot = tok.token_to_id("<|eot_id|>")
    ids = tok.encode("hi", add_special_tokens=False) + [eot]
    assert IncrementalDetokenizer(tok).push(ids) == "hi"
    det = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert det.push(ids) + det.flush() == "hi<|eot_id|>"


def test_work_per_token_is_bounded(tok: TurbineTokenizer) -> None:
    rec = Recorder(tok)
    ids = tok.encode(MULTILINGUAL * 40, add_special_tokens=False)
    det = IncrementalDetokenizer(rec, prompt_ids=tok.encode("prompt " * 100))
    text = "".join(det.push([i]) for i in ids) + det.flush()
    assert text == MULTILINGUAL * 40
    assert max(rec.window_sizes) <= 8  # a short window, never the whole output
    assert len(rec.window_sizes) <= 2 * len(ids) + 2


class StripLeadingSpace:
    """SentencePiece-like: a text's leading space is dropped, so decode is not concatenative."""

    pieces = ["", " Hello", " world", "!", " a", "b"]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] for i in ids).removeprefix(" ")


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(1, 5), max_size=20), data=st.data())
def test_non_concatenative_decoder(ids: list[int], data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(ids)), max_size=len(ids)))
    _check(StripLeadingSpace(), ids, cuts)


def test_first_token_after_prompt_keeps_its_space() -> None:
    det = IncrementalDetokenizer(StripLeadingSpace(), prompt_ids=[1])
    assert det.push([2]) == " world"
