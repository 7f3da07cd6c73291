from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turbine.frontend.stop_strings import StopResult, StopStringMatcher


def reference(text: str, stops: list[str], include_stop: bool = False) -> tuple[str, str | None]:
    """Check after every character; the first stop string to end wins (longest on a tie)."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if len(s) <= end and text[end - len(s) : end] == s]
        if ending:
            stop = max(ending, key=len)
            return (text[:end] if include_stop else text[: end - len(stop)]), stop
    return text, None


def longest_hold(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    return max(
        (k for s in stops for k in range(1, len(s)) if k <= len(text) and s.startswith(text[-k:])),
        default=0,
    )


stops_strategy = st.lists(st.text(alphabet="ab", min_size=1, max_size=4), min_size=1, max_size=3)
chunks_strategy = st.lists(st.text(alphabet="abc", max_size=6), max_size=8)


@settings(max_examples=400, deadline=None)
@given(stops=stops_strategy, chunks=chunks_strategy, include_stop=st.booleans())
def test_matches_reference_for_any_chunking(
    stops: list[str], chunks: list[str], include_stop: bool
) -> None:
    matcher = StopStringMatcher(stops, include_stop=include_stop)
    emitted, seen, stopped = "", "", False
    for chunk in chunks:
        result = matcher.push(chunk)
        emitted += result.emit
        if result.stopped:
            stopped = True
            break
        seen += chunk
        # Held back: exactly the longest suffix that could still start a stop string.
        assert emitted == seen[: len(seen) - longest_hold(seen, stops)]
    if not stopped:
        emitted += matcher.flush()
    expected, matched = reference("".join(chunks), stops, include_stop)
    assert emitted == expected
    assert matcher.matched == matched and matcher.stopped == (matched is not None)


def test_holds_back_possible_stop_prefix() -> None:
    m = StopStringMatcher(["<|end|>"])
    assert m.push("the answer is 4<|e") == StopResult("the answer is 4", False)
    assert m.push("x") == StopResult("<|ex", False)
    assert m.push("<|en") == StopResult("", False)
    assert m.push("d|> and more") == StopResult("", True)
    assert m.matched == "<|end|>"
    assert m.push("later") == StopResult("", True)
    assert m.flush() == ""


def test_flush_returns_held_text_without_match() -> None:
    m = StopStringMatcher(["STOP", "\n\n"])
    assert m.push("done\n") == StopResult("done", False)
    assert m.push("ST") == StopResult("\n", False)
    assert m.flush() == "ST"
    assert m.flush() == ""


def test_first_ending_stop_wins_and_longest_on_tie() -> None:
    m = StopStringMatcher(["abcd", "bc"])
    assert m.push("xabcd") == StopResult("xa", True) and m.matched == "bc"
    m = StopStringMatcher(["bc", "abc"])
    assert m.push("xabc") == StopResult("x", True) and m.matched == "abc"
    m = StopStringMatcher(["bc"], include_stop=True)
    assert m.push("abcd") == StopResult("abc", True)


def test_unicode_and_no_stops() -> None:
    m = StopStringMatcher(["世界"])
    assert m.push("你好世") == StopResult("你好", False)
    assert m.push("界!") == StopResult("", True)
    passthrough = StopStringMatcher([])
    assert passthrough.push("anything") == StopResult("anything", False)
    assert passthrough.flush() == ""


@pytest.mark.parametrize("bad", [[""], ["ok", ""], [None]])
def test_rejects_empty_stop_strings(bad: list) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(bad)
