"""Load metrics a worker publishes on the event plane (topic ``load``)."""
from __future__ import annotations

import msgspec


class WorkerLoad(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    worker_id: str
    model_name: str
    kv_active_blocks: int  # blocks referenced by running requests (cached-but-free are not)
    kv_total_blocks: int
    num_running: int
    num_waiting: int
    ts: float = 0.0
