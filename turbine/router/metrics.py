"""Router metrics as plain counters, plus an optional Prometheus collector that reads them.

The router's modules stay free of any metrics library: they bump the fields of ``RouterStats``.
The frontend owns its Prometheus registry and calls ``register_prometheus`` once per model; the
collector reads the counters (and the index size) at scrape time, so routing pays nothing extra.
"""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from turbine.router.router import Router

LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class LagStats:
    """Seconds between a KV event batch's timestamp and when the router applied it."""

    count: int = 0
    total_s: float = 0.0
    max_s: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LAG_BUCKETS) + 1))  # last: +Inf

    def observe(self, lag_s: float) -> None:
        lag_s = max(lag_s, 0.0)  # clocks of two machines: never report negative lag
        self.count += 1
        self.total_s += lag_s
        self.max_s = max(self.max_s, lag_s)
        self.buckets[bisect_left(LAG_BUCKETS, lag_s)] += 1


@dataclass
class RouterStats:
    block_size: int = 16
    decisions: dict[str, int] = field(default_factory=dict)  # policy -> requests routed
    declined: int = 0  # route() calls that found every candidate at its queue limit
    guard_overridden: int = 0  # predicted: no worker passed the ITL guard, the fastest took it
    queued: int = 0  # requests that waited in the frontend's queue (FairQueue)
    queue_rejected: int = 0  # turned away because that queue was full
    # predicted vs actual prefix hits, for requests whose usage came back (observe_actual)
    observed: int = 0
    predicted_blocks: int = 0
    actual_cached_blocks: int = 0
    overlap_abs_error_blocks: int = 0
    # KV events
    events_applied: dict[str, int] = field(default_factory=dict)  # event type -> count
    blocks_stored: int = 0
    blocks_removed: int = 0
    events_unplaced: int = 0  # a BlockStored whose parent the index did not know (resync needed)
    events_rejected: int = 0  # events that contradict the index (e.g. another block size)
    events_ignored: int = 0  # events reaching a router in approximate mode
    resyncs: int = 0  # reset_worker calls
    lag: LagStats = field(default_factory=LagStats)

    def decided(self, policy: str) -> None:
        self.decisions[policy] = self.decisions.get(policy, 0) + 1

    def observe_actual(self, predicted_blocks: int, actual_cached_tokens: int) -> None:
        actual = actual_cached_tokens // self.block_size
        self.observed += 1
        self.predicted_blocks += predicted_blocks
        self.actual_cached_blocks += actual
        self.overlap_abs_error_blocks += abs(predicted_blocks - actual)

    def snapshot(self) -> dict[str, Any]:
        """Everything as one plain dict (for JSON reports, logs and tests)."""
        return {
            "decisions": dict(self.decisions),
            "declined": self.declined,
            "guard_overridden": self.guard_overridden,
            "queued": self.queued,
            "queue_rejected": self.queue_rejected,
            "observed": self.observed,
            "predicted_blocks": self.predicted_blocks,
            "actual_cached_blocks": self.actual_cached_blocks,
            "overlap_abs_error_blocks": self.overlap_abs_error_blocks,
            "events_applied": dict(self.events_applied),
            "blocks_stored": self.blocks_stored,
            "blocks_removed": self.blocks_removed,
            "events_unplaced": self.events_unplaced,
            "events_rejected": self.events_rejected,
            "events_ignored": self.events_ignored,
            "resyncs": self.resyncs,
            "event_lag_count": self.lag.count,
            "event_lag_mean_s": self.lag.total_s / self.lag.count if self.lag.count else 0.0,
            "event_lag_max_s": self.lag.max_s,
        }


class RouterCollector:
    """A Prometheus collector over one model's routers: the main pool's series are labelled with
    the model, those of other pools (a disaggregated model's prefill pool) with the pool too."""

    def __init__(self, router: Router, model: str, pools: dict[str, Router] | None = None):
        self.router = router
        self.model = model
        self.pools = pools if pools is not None else {}

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        routers = [(self.router, [self.model]),  # other pools once they saw traffic: no empty series
                   *((r, [self.model, p]) for p, r in self.pools.items() if r.decisions or r.index_blocks)]

        def labels(base: list[str], pool_labels: list[str]) -> list[str]:
            return base[:1] + (["pool"] if len(pool_labels) > 1 else []) + base[1:]

        families: dict[str, Any] = {}

        def family(kind: Any, name: str, doc: str) -> Any:
            if name not in families:
                families[name] = kind(name, doc)
            return families[name]

        for router, ls in routers:
            s = router.stats
            dec = family(CounterMetricFamily, "turbine_router_decisions", "Requests routed")
            for policy, n in s.decisions.items():
                _add(dec, labels(["model", "policy"], ls), [*ls, policy], n)
            for name, doc, value in (
                ("turbine_router_predicted_overlap_blocks", "Predicted prefix-cache hits (blocks) of observed requests",
                 s.predicted_blocks),
                ("turbine_router_actual_cached_blocks", "Actual prefix-cache hits (blocks) of observed requests",
                 s.actual_cached_blocks),
                ("turbine_router_overlap_error_blocks", "Sum of |predicted - actual| hit blocks",
                 s.overlap_abs_error_blocks),
                ("turbine_router_overlap_observations", "Requests with predicted and actual hits", s.observed),
                ("turbine_router_kv_blocks_stored", "Blocks in BlockStored events applied", s.blocks_stored),
                ("turbine_router_kv_blocks_removed", "Blocks in BlockRemoved events applied", s.blocks_removed),
                ("turbine_router_kv_events_unplaced", "BlockStored events whose parent was unknown", s.events_unplaced),
                ("turbine_router_kv_events_rejected", "KV events contradicting the index", s.events_rejected),
                ("turbine_router_resyncs", "Worker index rebuilds from a full-state dump", s.resyncs),
                ("turbine_router_declined", "Routing attempts that found every worker at its queue limit", s.declined),
                ("turbine_router_itl_guard_overridden", "Predicted routing with no worker inside the ITL guard",
                 s.guard_overridden),
                ("turbine_router_queued_requests", "Requests that waited in the frontend's queue", s.queued),
                ("turbine_router_queue_rejected", "Requests turned away by a full frontend queue", s.queue_rejected),
            ):
                _add(family(CounterMetricFamily, name, doc), labels(["model"], ls), ls, value)
            ev = family(CounterMetricFamily, "turbine_router_kv_events", "KV events applied")
            for kind, n in s.events_applied.items():
                _add(ev, labels(["model", "type"], ls), [*ls, kind], n)
            _add(family(GaugeMetricFamily, "turbine_router_index_blocks", "Indexed (worker, block) pairs"),
                 labels(["model"], ls), ls, router.index_blocks)
            _add(family(GaugeMetricFamily, "turbine_router_index_nodes", "Distinct prefixes indexed"),
                 labels(["model"], ls), ls, router.index_nodes)
            lag = family(HistogramMetricFamily, "turbine_router_kv_event_lag_seconds", "KV event batch age when applied")
            cum, buckets = 0, []
            for bound, n in zip((*LAG_BUCKETS, float("inf")), s.lag.buckets, strict=True):
                cum += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cum))
            lag.samples.extend(_histogram_samples(lag.name, labels(["model"], ls), ls, buckets, s.lag.total_s))
        yield from families.values()


def _add(fam: Any, names: list[str], values: list[str], value: float) -> None:
    from prometheus_client.samples import Sample

    suffix = "_total" if fam.type == "counter" else ""
    fam.samples.append(Sample(fam.name + suffix, dict(zip(names, values, strict=True)), value, None))


def _histogram_samples(name: str, names: list[str], values: list[str], buckets: list[tuple[str, float]],
                       total: float) -> list[Any]:
    from prometheus_client.samples import Sample

    base = dict(zip(names, values, strict=True))
    out = [Sample(name + "_bucket", {**base, "le": le}, n, None) for le, n in buckets]
    out.append(Sample(name + "_count", base, buckets[-1][1], None))
    out.append(Sample(name + "_sum", base, total, None))
    return out


def register_prometheus(registry: Any, router: Router, model: str,
                        pools: dict[str, Router] | None = None) -> RouterCollector:
    """Expose the routers' stats in ``registry`` (a prometheus_client CollectorRegistry)."""
    collector = RouterCollector(router, model, pools)
    registry.register(collector)
    return collector
