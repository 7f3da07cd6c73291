"""What the dashboard page receives: one ``Update`` per SSE event, JSON-encoded from these Structs.

The first event of a connection is a full snapshot (``reset``: the page replaces everything);
each later one carries the fleet as it is now, the decisions recorded or completed since the
previous event, the new history point(s) and planner actions. The page merges decisions and
planner actions by ``key``. Times are wall-clock seconds (``at``, ``t``); durations are ms.
"""
from __future__ import annotations

import msgspec


class TierView(msgspec.Struct, frozen=True, kw_only=True):
    tier: str  # "host" | "disk"
    blocks: int
    capacity_blocks: int
    hit_blocks: int = 0  # cumulative
    onboarded_bytes: int = 0  # cumulative
    offloaded_bytes: int = 0  # cumulative


class WorkerView(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    model: str
    role: str  # "aggregated" | "prefill" | "decode"
    engine: str
    host: str  # from its request-plane address ("in-process" for embedded workers)
    pid: str | None = None
    state: str  # "ok" | "suspect" (set aside after failures) | "silent" (no load report lately) | "new"
    suspect_s: float = 0.0  # seconds left set aside
    report_age_s: float | None = None  # since its last load report reached this frontend
    # as the worker reports it
    running: int = 0
    waiting: int = 0
    prefill_tokens: int = 0
    kv_active_blocks: int = 0
    kv_total_blocks: int = 0
    tiers: list[TierView] = []
    # as this frontend's router sees it (own requests plus other frontends' from reports)
    router_active: int = 0
    router_queued: int = 0
    router_prefill_tokens: int = 0
    router_foreign: int = 0


class AlternativeView(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    worker: str
    overlap_blocks: float
    cost: float | None = None
    ttft_ms: float | None = None
    itl_ms: float | None = None


class DecisionView(msgspec.Struct, frozen=True, kw_only=True):
    key: str  # model/pool/request id: the page merges by it
    request_id: str
    model: str
    pool: str  # "generate" | "prefill"
    at: float
    worker: str
    policy: str
    prompt_tokens: int
    overlap_blocks: int  # predicted
    actual_cached_blocks: int | None = None
    predicted_ttft_ms: float | None = None
    actual_ttft_ms: float | None = None  # route to first token, as the router saw it
    remote_kv: bool = False
    alternatives: list[AlternativeView] | None = None  # None: over the log's detail budget


class HistoryPoint(msgspec.Struct, frozen=True, kw_only=True):
    """One second (``interval``) of the whole frontend. None: nothing to measure in it."""

    t: float
    requests_ps: float = 0.0  # completed
    errors_ps: float = 0.0  # replies with a 4xx/5xx status
    output_tps: float = 0.0
    prompt_tps: float = 0.0
    cached_tps: float = 0.0
    ttft_ms_mean: float | None = None
    ttft_ms_p50: float | None = None
    ttft_ms_p90: float | None = None
    itl_ms_mean: float | None = None
    itl_ms_p50: float | None = None
    itl_ms_p90: float | None = None
    inflight: int = 0
    workers: int = 0
    running: int = 0
    waiting: int = 0
    kv_used: float | None = None  # active / total blocks over the fleet
    disagg_remote_ps: float = 0.0
    disagg_local_ps: float = 0.0
    pulled_blocks_ps: float = 0.0  # KV blocks decode workers pulled from prefill workers
    onboard_bps: float = 0.0  # bytes/s copied up from host/disk tiers
    offload_bps: float = 0.0


class PlannerAction(msgspec.Struct, frozen=True, kw_only=True):
    key: str
    at: float
    pool: str
    action: str  # "up" | "down" | "hold"
    current: int
    needed: int
    target: int
    reason: str = ""
    rate: float | None = None  # observed requests/s
    predicted_rate: float | None = None
    ttft_ms: float | None = None  # observed means
    itl_ms: float | None = None
    correction_ttft: float | None = None
    correction_itl: float | None = None


class DisaggView(msgspec.Struct, frozen=True, kw_only=True):
    decisions: dict[str, int] = {}  # cumulative, by decision (turbine/disagg/decision.py)
    prefill_failures: int = 0
    transfer_errors: int = 0
    pulled_blocks: int = 0
    releases: int = 0


class ModelView(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    policy: str
    block_size: int
    workers: int
    queued: int = 0  # requests waiting in the frontend's route queue
    decisions: int = 0  # routed so far (every pool)


class Meta(msgspec.Struct, frozen=True, kw_only=True):
    interval_s: float
    history_s: float
    planner: bool  # a planner reports to this dashboard
    decisions_logged: int = 0
    decisions_without_detail: int = 0
    clients: int = 0


class Update(msgspec.Struct, frozen=True, kw_only=True):
    reset: bool
    t: float
    meta: Meta
    models: list[ModelView]
    workers: list[WorkerView]
    left: list[str] = []  # workers gone since the previous event
    decisions: list[DecisionView] = []
    history: list[HistoryPoint] = []
    planner: list[PlannerAction] = []
    disagg: DisaggView = DisaggView()
