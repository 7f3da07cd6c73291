"""Deterministic synthetic prompts built from local text (no downloads, no tokenizer needed).

Words are drawn, with their natural frequencies, from the Python standard library's sources, so a
given byte-level BPE tokenizer sees a stable tokens-per-word ratio: ~1.1 for the Dynamo anchor's
toy tokenizer, ~1.3 for `turbine make-model --preset tiny` (Llama-3 split pattern). When the
exact length matters, pass a tokenizer and each prompt is trimmed to the requested token count.

    prompt i = [shared prefix words] "[i]" [random words ...]
               └─ same for every i ─┘ └ makes every prompt distinct from its first block on
"""
from __future__ import annotations

import functools
import glob
import os
import random
from collections.abc import Sequence
from typing import Protocol

TOKENS_PER_WORD = 1.1
"""Tokens per pool word assumed when no tokenizer is given (the anchor tokenizer's ratio)."""

_POOL_FILES = 60  # enough text for a ~100k-word pool; fixed so the pool is the same every run


class Tokenizer(Protocol):
    """The slice of `tokenizers.Tokenizer` this module uses (encode to ids, decode back)."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> object: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


@functools.lru_cache(maxsize=1)
def word_pool() -> tuple[str, ...]:
    """Alphabetic words from the stdlib's top-level .py files (sorted, so deterministic)."""
    stdlib = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))
    words: list[str] = []
    for path in files[:_POOL_FILES]:
        try:
            with open(path, encoding="utf-8", errors="ignore") as f:
                text = f.read()
        except OSError:
            continue
        words.extend(w for w in text.split() if w.isalpha() and len(w) <= 16)
    if len(words) < 1000:
        raise RuntimeError(f"word pool from {stdlib} has only {len(words)} words")
    return tuple(words)


def _words(rng: random.Random, count: int) -> str:
    pool = word_pool()
    return " ".join(rng.choices(pool, k=count))


def _trim(tokenizer: Tokenizer, text: str, tokens: int) -> str:
    ids = list(tokenizer.encode(text, add_special_tokens=False).ids)  # type: ignore[attr-defined]
    if len(ids) < tokens:
        raise ValueError(f"text has only {len(ids)} tokens, {tokens} requested")
    return tokenizer.decode(ids[:tokens])


def build_prompts(
    n: int,
    prompt_tokens: int,
    *,
    shared_prefix_tokens: int = 0,
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
) -> list[str]:
    """``n`` distinct prompts of about ``prompt_tokens`` tokens each (chat template excluded).

    The first ``shared_prefix_tokens`` of every prompt are identical (a system-prompt-like
    prefix for prefix-cache experiments). The same arguments always give the same prompts.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if prompt_tokens < 1:
        raise ValueError(f"prompt_tokens must be >= 1, got {prompt_tokens}")
    if not 0 <= shared_prefix_tokens <= prompt_tokens:
        raise ValueError(
            f"shared_prefix_tokens must be in [0, prompt_tokens={prompt_tokens}], "
            f"got {shared_prefix_tokens}"
        )
    rng = random.Random(seed)
    if tokenizer is None:
        prefix_words = round(shared_prefix_tokens / TOKENS_PER_WORD)
        body_words = max(1, round(prompt_tokens / TOKENS_PER_WORD) - prefix_words)
        prefix = _words(rng, prefix_words) + " " if prefix_words else ""
        return [f"{prefix}[{i}] {_words(rng, body_words)}" for i in range(n)]
    # With a tokenizer: over-generate words (every word is >= 1 token), then trim to the count.
    prefix = _trim(tokenizer, _words(rng, shared_prefix_tokens), shared_prefix_tokens) + " " \
        if shared_prefix_tokens else ""
    body_tokens = prompt_tokens - shared_prefix_tokens
    out = []
    for i in range(n):
        body = f"[{i}] " + _words(rng, body_tokens + 4)
        out.append(prefix + _trim(tokenizer, body, max(1, body_tokens)))
    return out
