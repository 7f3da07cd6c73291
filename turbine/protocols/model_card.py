"""What a worker tells discovery about the model it serves."""
from __future__ import annotations

from typing import Literal

import msgspec

WorkerRole = Literal["aggregated", "prefill", "decode"]


class ModelCard(msgspec.Struct, frozen=True, kw_only=True):
    model_name: str
    tokenizer_source: str  # local directory holding tokenizer.json / tokenizer_config.json
    block_size: int
    total_kv_blocks: int
    max_num_seqs: int
    context_length: int
    role: WorkerRole = "aggregated"
    engine: str = "mock"
