"""Stop strings over a text stream that arrives in arbitrary chunks.

Semantics (independent of how the text is chunked): the stream stops at the first position
where some stop string *ends*, exactly as if the model had been checked after every
character; if several end there, the longest one counts. Output is the text before that stop
string (or through it, with include_stop). Nothing after it is ever emitted.

To never emit part of a stop string that later completes, the matcher holds back the longest
suffix of the text seen so far that is a proper prefix of some stop string:

    seen: "... the answer is 4<|e"      stops: ["<|end|>"]
    emit: "... the answer is 4"         held: "<|e"
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple


class StopResult(NamedTuple):
    emit: str  # text safe to send to the client now
    stopped: bool  # a stop string matched: end the stream (later pushes emit nothing)


class StopStringMatcher:
    """Per-request matcher. Not thread-safe: one owner per request."""

    def __init__(self, stops: Iterable[str], *, include_stop: bool = False) -> None:
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(stops))
        for stop in self.stops:
            if not isinstance(stop, str) or not stop:
                raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        self.include_stop = include_stop
        self.matched: str | None = None  # the stop string that ended the stream
        self._prefixes = frozenset(s[:k] for s in self.stops for k in range(1, len(s)))
        self._max_held = max((len(s) - 1 for s in self.stops), default=0)
        self._held = ""

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def push(self, text: str) -> StopResult:
        if self.matched is not None:
            return StopResult("", True)
        if not self.stops:
            return StopResult(text, False)
        buffer = self._held + text
        match = self._first_match(buffer)
        if match is not None:
            end, stop = match
            self.matched, self._held = stop, ""
            return StopResult(buffer[: end if self.include_stop else end - len(stop)], True)
        keep = self._held_suffix_length(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return StopResult(buffer[: len(buffer) - keep], False)

    def flush(self) -> str:
        """End of stream without a match: the held-back text (which can no longer stop)."""
        held, self._held = self._held, ""
        return "" if self.matched is not None else held

    def _first_match(self, buffer: str) -> tuple[int, str] | None:
        """(end, stop) minimising end, then maximising len(stop). The held part of the buffer
        holds no complete stop string, so every match found here is new."""
        best: tuple[int, str] | None = None
        for stop in self.stops:
            at = buffer.find(stop)
            if at < 0:
                continue
            end = at + len(stop)
            if best is None or end < best[0] or (end == best[0] and len(stop) > len(best[1])):
                best = (end, stop)
        return best

    def _held_suffix_length(self, buffer: str) -> int:
        for k in range(min(self._max_held, len(buffer)), 0, -1):
            if buffer[len(buffer) - k :] in self._prefixes:
                return k
        return 0
