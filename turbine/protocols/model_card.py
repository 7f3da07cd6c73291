"""What a worker tells discovery about the model it serves."""
from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

WorkerRole = Literal["aggregated", "prefill", "decode"]

_Positive = Annotated[int, Meta(ge=1, le=2**40)]


class WorkerTiming(msgspec.Struct, frozen=True, kw_only=True):
    """How long the worker's steps take, for a router that predicts latency (router/latency_model.py).

    ``profile``: a measured timing profile (the mocker's JSON format, turbine/mocker/README.md);
    None means Dynamo's polynomial timing. ``speedup_ratio`` divides every step time."""

    max_num_batched_tokens: _Positive
    speedup_ratio: Annotated[float, Meta(gt=0, le=1e9)] = 1.0
    profile: dict[str, object] | None = None


class ModelCard(msgspec.Struct, frozen=True, kw_only=True):
    """Constraints are checked whenever a card is decoded: a malformed record in discovery is
    refused there, never half-used."""

    model_name: Annotated[str, Meta(min_length=1, max_length=256)]
    tokenizer_source: str  # local directory holding tokenizer.json / tokenizer_config.json
    block_size: _Positive
    total_kv_blocks: _Positive
    max_num_seqs: _Positive
    context_length: Annotated[int, Meta(ge=2, le=2**40)]
    role: WorkerRole = "aggregated"
    engine: str = "mock"
    timing: WorkerTiming | None = None
