"""Train a real byte-level BPE tokenizer locally, with no downloads.

The corpus is the installed Python's standard library sources (code, comments, docstrings),
read in sorted path order so the same interpreter always yields the same corpus and therefore
a byte-identical tokenizer.json (the `tokenizers` BPE trainer is deterministic).

Vocabulary layout, Llama-3 style:

    ids [0, n_bpe)              BPE tokens: 256 byte tokens, learned merges, filler merges
    ids [n_bpe, vocab_size)     special tokens (<|begin_of_text|>, ..., <|eot_id|>)

Large presets need 128k-152k ids, more merges than a few MB of stdlib text supports or than a
few seconds of training buys. The tail is filled with *filler merges*: concatenations of two
learned tokens, appended at the lowest merge rank. They keep the BPE valid (every merge joins
two vocabulary tokens), every id still decodes to real-looking text (a random-weight model
samples them), and encoding stays lossless.
"""
from __future__ import annotations

import functools
import json
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
SPECIAL_TOKENS: tuple[str, ...] = (BEGIN_OF_TEXT, END_OF_TEXT, START_HEADER, END_HEADER, EOT)

# Llama 3's pre-tokenization regex (tiktoken cl100k-like).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"})
_NUM_BYTE_TOKENS = 256


def stdlib_corpus(max_bytes: int) -> list[str]:
    """Up to ~max_bytes of the installed standard library's .py sources, in sorted path order.

    Falls back to the docstrings of built-in modules when no stdlib sources are on disk
    (embedded or zipped interpreters); the corpus is then small and filler merges do the rest.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    texts: list[str] = []
    total = 0
    for path in _stdlib_sources():
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    if not texts:
        texts = _builtin_docstrings()
    return texts


def _stdlib_sources() -> Iterator[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        return iter(())
    files = [
        p
        for p in root.rglob("*.py")
        if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])
    ]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return iter(files)


def _builtin_docstrings() -> list[str]:
    docs = []
    for name in sorted(sys.builtin_module_names):
        module = __import__(name)
        for attr in sorted(dir(module)):
            doc = getattr(getattr(module, attr, None), "__doc__", None)
            if isinstance(doc, str):
                docs.append(doc)
    return docs


def _empty_byte_level_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


@functools.lru_cache(maxsize=4)
def _trained_bpe_json(vocab_size: int, corpus_bytes: int) -> str:
    """Serialized trained tokenizer (no special tokens); memoized per process, never on disk."""
    tok = _empty_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(stdlib_corpus(corpus_bytes), trainer)
    return tok.to_str()


def _filler_merges(vocab: dict[str, int], count: int) -> list[tuple[str, str]]:
    """`count` new merges joining two learned tokens, enumerated along anti-diagonals.

    Both halves are letters-only tokens (the left may start with a space), so a filler token
    reads like a word: ' return' + 'ing' -> ' returning'.
    """
    learned = sorted(vocab, key=vocab.__getitem__)[_NUM_BYTE_TOKENS:]
    # Byte-level maps ASCII letters to themselves and a leading space to 'Ġ'.
    right = [t for t in learned if t.isascii() and t.isalpha()]
    words = set(right)
    left = [t for t in learned if (t[1:] if t[0] == "Ġ" else t) in words]
    if not left or not right:  # a degenerate corpus: join anything
        left = right = sorted(vocab, key=vocab.__getitem__)
    taken = set(vocab)
    merges: list[tuple[str, str]] = []
    diagonal = 0
    limit = len(left) + len(right) - 1
    while len(merges) < count:
        if diagonal >= limit:
            raise ValueError(f"cannot build {count} filler merges from {len(vocab)} tokens")
        for i in range(max(0, diagonal - len(right) + 1), min(diagonal + 1, len(left))):
            a, b = left[i], right[diagonal - i]
            if a + b not in taken:
                taken.add(a + b)
                merges.append((a, b))
                if len(merges) == count:
                    break
        diagonal += 1
    return merges


@functools.lru_cache(maxsize=4)
def build_tokenizer_json(
    vocab_size: int,
    *,
    trained_vocab_size: int,
    corpus_bytes: int,
    special_tokens: tuple[str, ...] = SPECIAL_TOKENS,
) -> str:
    """tokenizer.json text for a byte-level BPE of exactly `vocab_size` ids (specials included).

    special_tokens[0] is the BOS token, which the post-processor prepends when encoding with
    add_special_tokens=True (Llama 3 behaviour).
    """
    n_bpe = vocab_size - len(special_tokens)
    if n_bpe < _NUM_BYTE_TOKENS:
        raise ValueError(f"vocab_size {vocab_size} leaves fewer than 256 ids for byte tokens")
    if not special_tokens:
        raise ValueError("at least one special token (the BOS token) is required")
    data = json.loads(_trained_bpe_json(min(trained_vocab_size, n_bpe), corpus_bytes))
    model = data["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    for a, b in _filler_merges(vocab, n_bpe - len(vocab)):
        vocab[a + b] = len(vocab)
        merges.append((a, b))
    model["merges"] = [list(m) for m in merges]

    tok = Tokenizer.from_str(json.dumps(data))
    added = tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in special_tokens]
    )
    if added != len(special_tokens) or tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise ValueError("special tokens collide with learned tokens")
    bos = special_tokens[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0",
        pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, n_bpe)],
    )
    return tok.to_str(pretty=True)


def special_token_ids(
    vocab_size: int, special_tokens: Sequence[str] = SPECIAL_TOKENS
) -> dict[str, int]:
    """Ids that `build_tokenizer_json` gives the special tokens (the last ids of the vocab)."""
    base = vocab_size - len(special_tokens)
    return {t: base + i for i, t in enumerate(special_tokens)}
