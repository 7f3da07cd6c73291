"""A step as host data: every integer it needs in ONE int64 buffer, and where each array lies.

``ModelRunner.pack`` builds it from a ``SchedulerOutput`` (host only); ``ModelRunner.upload``
copies the buffer to the device once and slices it there. Under tensor parallelism rank 0
sends exactly this (``PackedStep`` + the buffer, one message) to the other ranks, which upload
and run it like rank 0; that is why it holds no sequence, request id or sampling option.

    ints: [ ids | positions | slots | context_lens | split | logits_idx | tables | qstart
            | cu_q | cu_k | gather | fix_dst | fix_src ]            (the last five optional)
    StepLayout.<name> = Span(start, length) into ints

A decode-graph step keeps its first five arrays back to back, each ``graph_batch`` long (the
graph's ``[5, B]`` static input is one copy of ``ints[:5 * B]``); an eager step starts every
array 16-byte aligned (see ``ModelRunner.upload``).
"""
from __future__ import annotations

from typing import NamedTuple

import msgspec
import numpy as np

__all__ = ["PackedStep", "Span", "StepLayout", "pack_ints"]


class Span(NamedTuple):
    start: int
    length: int


class StepLayout(msgspec.Struct, frozen=True, array_like=True):
    """Where each of a step's arrays lies in its int64 buffer (field order = buffer order)."""

    ids: Span  # [T] input token ids (a PLACEHOLDER where ``fix`` fills it on the device)
    positions: Span  # [T]
    slots: Span  # [T] flat KV cache slot of each new token
    context_lens: Span  # [S] (padded to graph_batch on a graph step)
    split: Span  # [1] or [graph_batch]: the decode kernel's context split length
    logits_idx: Span  # [N] packed index of each sampled sequence's last token
    tables: Span  # [table_rows * table_width] block tables, row-major
    qstart: Span  # [S + 1] query start of each sequence
    cu_q: Span | None = None  # the varlen prefill layout (PrefillLayout)
    cu_k: Span | None = None
    gather: Span | None = None
    fix_dst: Span | None = None  # rows of ids taken from the in-flight step's sampled tokens
    fix_src: Span | None = None  # ... and their rows in those tokens


class PackedStep(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    layout: StepLayout
    table_rows: int
    table_width: int
    num_decodes: int  # sequences 0 .. num_decodes-1 have one new token
    query_lens: tuple[int, ...]  # per sequence (host mirrors: no device read to learn a layout)
    context_lens: tuple[int, ...]
    max_q: int = 0  # varlen prefill maxima
    max_k: int = 0
    graph_batch: int = 0  # > 0: replay the decode graph of this padded batch size
    aligned: bool = True
    logits_all_rows: bool = False  # logits_idx is arange(N)
    piecewise: bool = False  # the forward replays the piecewise graphs
    num_sampled: int = 0  # N: rows whose logits are computed (every rank: the gather is collective)
    share_tokens: bool = False  # rank 0 broadcasts the sampled tokens (a later step's ``fix`` reads them)


def pack_ints(parts: list[np.ndarray | None], *, aligned: bool) -> tuple[np.ndarray, list[Span | None]]:
    """``parts`` (None: absent) into one int64 buffer; with ``aligned`` every part starts at an
    even index (16 bytes). Returns the buffer and each part's span."""
    spans: list[Span | None] = []
    at = 0
    for p in parts:
        if p is None:
            spans.append(None)
            continue
        n = len(p)
        spans.append(Span(at, n))
        at += n + (n & 1) if aligned else n
    host = np.zeros(at, dtype=np.int64)
    for p, s in zip(parts, spans, strict=True):
        if p is not None and s is not None:
            host[s.start:s.start + s.length] = p
    return host, spans
