"""What a worker tells discovery about the model it serves."""
from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

WorkerRole = Literal["aggregated", "prefill", "decode"]

_Positive = Annotated[int, Meta(ge=1, le=2**40)]


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
