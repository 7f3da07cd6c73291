"""Turn a stream of token ids into a stream of text, O(1) work per token.

Decoding each token alone is wrong: a byte-level token may end in the middle of a UTF-8
character, and SentencePiece-style decoders treat a leading space differently at the start of
a text. Re-decoding the whole output each step is right but quadratic. So, as vLLM does, keep
two offsets into the token list and decode only a short window:

    ids:  ... | p r e f i x | n e w |
              ^prefix_off   ^read_off
    new text = decode(ids[prefix_off:])[len(decode(ids[prefix_off:read_off])):]

The prefix tokens give the decoder context; once the window's text is complete (it does not
end in U+FFFD, the replacement a partial character decodes to) the new text is emitted and
both offsets move forward. A token that ends mid-character is held until the character
completes, or until `flush()`.

Invariant: every emission ends on a complete character, so decoding restarts cleanly at
read_off and the concatenated output equals decode(all output ids).
"""
from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Protocol

# Prompt tokens kept as decoder context for the first output token (vLLM uses 5 too).
INITIAL_CONTEXT_TOKENS = 5
_TRIM_AT = 64  # drop ids before prefix_off once this many have piled up
_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Per-request streaming decoder. Not thread-safe: one owner per request."""

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        # Skipped special tokens decode to nothing, so they never enter the window.
        special: Collection[int] = getattr(tokenizer, "special_token_ids", ())
        self._skip_ids: Collection[int] = frozenset(special) if skip_special_tokens else ()
        context = list(prompt_ids[-INITIAL_CONTEXT_TOKENS:]) if prompt_ids else []
        self._ids = [t for t in context if t not in self._skip_ids]
        self._prefix_off = 0
        self._read_off = len(self._ids)
        self.num_output_tokens = 0

    def push(self, token_ids: Iterable[int]) -> str:
        """Append output tokens; return the text they complete (possibly "").

        Tokens are taken one at a time so that text before an unfinished character is not
        held back with it (2 small decodes per token)."""
        pieces = []
        for token_id in token_ids:
            self.num_output_tokens += 1
            if token_id not in self._skip_ids:
                self._ids.append(token_id)
                pieces.append(self._emit(final=False))
        return "".join(pieces)

    def flush(self) -> str:
        """End of stream: return any text held back (e.g. an unfinished character as U+FFFD)."""
        return self._emit(final=True) if self._read_off < len(self._ids) else ""

    def _emit(self, *, final: bool) -> str:
        ids, start = self._ids, self._prefix_off
        prefix = self._decode(ids[start : self._read_off])
        text = self._decode(ids[start:])
        if not final and (len(text) <= len(prefix) or text.endswith(_REPLACEMENT)):
            return ""  # nothing new, or a character still incomplete: wait for more tokens
        new = text[len(prefix) :]
        self._prefix_off, self._read_off = self._read_off, len(ids)
        if self._prefix_off >= _TRIM_AT:
            del ids[: self._prefix_off]
            self._read_off -= self._prefix_off
            self._prefix_off = 0
        return new

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)
