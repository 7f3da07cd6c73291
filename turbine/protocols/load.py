"""Load metrics a worker publishes on the event plane (topic ``load``)."""
from __future__ import annotations

import msgspec


class TierLoad(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One KV tier below the GPU cache (turbine/kvbm). Counts are cumulative since start."""

    tier: str  # "host" | "disk"
    blocks: int  # held now
    capacity_blocks: int
    hit_blocks: int = 0  # found here at admission
    onboarded_bytes: int = 0  # copied back up to the GPU
    offloaded_bytes: int = 0  # copied down into this tier
    onboard_seconds: float = 0.0  # time onboardings from this tier took


class WorkerLoad(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    worker_id: str
    model_name: str
    kv_active_blocks: int  # blocks referenced by running requests (cached-but-free are not)
    kv_total_blocks: int
    num_running: int
    num_waiting: int
    prefill_tokens: int = 0  # prompt tokens not computed yet (waiting and partly prefilled requests)
    ts: float = 0.0
    tiers: list[TierLoad] = []
