"""Prometheus metrics of the frontend and, relayed from their load events, of its workers.

Each frontend owns its own registry (tests run several in one process). Labelled children are
resolved once per model so the per-token path is a bare ``observe``.
"""
from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from turbine.protocols.load import TierLoad, WorkerLoad

_TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ModelMetrics:
    """The children of every per-model series, resolved once."""

    __slots__ = ("inflight", "ttft", "itl", "e2e", "prompt_tokens", "output_tokens", "cached_tokens")

    def __init__(self, m: FrontendMetrics, model: str):
        self.inflight = m.inflight.labels(model)
        self.ttft = m.ttft.labels(model)
        self.itl = m.itl.labels(model)
        self.e2e = m.e2e.labels(model)
        self.prompt_tokens = m.prompt_tokens.labels(model)
        self.output_tokens = m.output_tokens.labels(model)
        self.cached_tokens = m.cached_tokens.labels(model)


class FrontendMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter("turbine_frontend_requests", "HTTP requests served",
                                ["model", "endpoint", "status"], registry=r)
        self.inflight = Gauge("turbine_frontend_inflight_requests", "Requests being served", ["model"], registry=r)
        self.ttft = Histogram("turbine_frontend_time_to_first_token_seconds", "Time to first token",
                              ["model"], buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("turbine_frontend_inter_token_latency_seconds", "Time between streamed tokens",
                             ["model"], buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("turbine_frontend_request_duration_seconds", "End-to-end request latency",
                             ["model"], buckets=_E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("turbine_frontend_prompt_tokens", "Prompt tokens", ["model"], registry=r)
        self.output_tokens = Counter("turbine_frontend_output_tokens", "Generated tokens", ["model"], registry=r)
        self.cached_tokens = Counter("turbine_frontend_cached_tokens", "Prompt tokens served from prefix cache",
                                     ["model"], registry=r)
        self.kv_active = Gauge("turbine_worker_kv_active_blocks", "KV blocks referenced by running requests",
                               ["model", "worker"], registry=r)
        self.kv_total = Gauge("turbine_worker_kv_capacity_blocks", "KV blocks of the worker's GPU cache",
                              ["model", "worker"], registry=r)
        self.running = Gauge("turbine_worker_requests_running", "Requests running on the worker",
                             ["model", "worker"], registry=r)
        self.waiting = Gauge("turbine_worker_requests_waiting", "Requests queued on the worker",
                             ["model", "worker"], registry=r)
        self.workers = Gauge("turbine_frontend_workers", "Workers serving the model", ["model"], registry=r)
        self.tiers: dict[tuple[str, str, str], TierLoad] = {}  # (model, worker, tier) -> its last report
        self._worker_gauges: dict[tuple[str, str], tuple[Any, ...]] = {}  # (model, worker) -> its 4 children
        r.register(_TierCollector(self.tiers))
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_open_fds, CPU seconds
        self._models: dict[str, ModelMetrics] = {}

    def watch_serving(self, http: Any, registry: Any, generation: Any, client: Any) -> None:
        """Export the counters the HTTP server, registry, generation and request plane keep."""
        self.registry.register(_ServingCollector(http, registry, generation, client))

    def model(self, name: str) -> ModelMetrics:
        mm = self._models.get(name)
        if mm is None:
            mm = self._models[name] = ModelMetrics(self, name)
        return mm

    def count(self, model: str, endpoint: str, status: int) -> None:
        self.requests.labels(model, endpoint, str(status)).inc()

    def worker_load(self, load: WorkerLoad) -> None:
        """A worker's load report (up to ~100 a second each): its gauges' children are looked up
        once per worker, not on every report (``labels()`` was most of a report's cost)."""
        key = (load.model_name, load.worker_id)
        gauges = self._worker_gauges.get(key)
        if gauges is None:
            gauges = self._worker_gauges[key] = tuple(g.labels(*key) for g in (self.kv_active, self.kv_total,
                                                                                self.running, self.waiting))
        kv_active, kv_total, running, waiting = gauges
        kv_active.set(load.kv_active_blocks)
        kv_total.set(load.kv_total_blocks)
        running.set(load.num_running)
        waiting.set(load.num_waiting)
        for t in load.tiers:
            self.tiers[(*key, t.tier)] = t

    def worker_gone(self, model: str, worker_id: str) -> None:
        self._worker_gauges.pop((model, worker_id), None)
        for g in (self.kv_active, self.kv_total, self.running, self.waiting):
            try:
                g.remove(model, worker_id)
            except KeyError:
                pass
        for key in [k for k in self.tiers if k[0] == model and k[1] == worker_id]:
            del self.tiers[key]

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _TierCollector:
    """The KV tiers below each worker's GPU cache, from the workers' last load reports; the
    cumulative counts the workers report are counters (they restart at zero with the worker)."""

    _LABELS = ("model", "worker", "tier")

    def __init__(self, tiers: dict[tuple[str, str, str], TierLoad]) -> None:
        self.tiers = tiers

    def collect(self) -> Iterator[Metric]:
        families = [
            (GaugeMetricFamily("turbine_worker_kv_tier_blocks", "KV blocks held in a tier below the GPU cache",
                               labels=self._LABELS), "blocks"),
            (GaugeMetricFamily("turbine_worker_kv_tier_capacity_blocks", "KV blocks a lower tier can hold",
                               labels=self._LABELS), "capacity_blocks"),
            (CounterMetricFamily("turbine_worker_kv_tier_hit_blocks", "Prefix blocks found in a lower tier",
                                 labels=self._LABELS), "hit_blocks"),
            (CounterMetricFamily("turbine_worker_kv_tier_onboarded_bytes",
                                 "Bytes copied back to the GPU from a lower tier", labels=self._LABELS),
             "onboarded_bytes"),
            (CounterMetricFamily("turbine_worker_kv_tier_offloaded_bytes", "Bytes copied down into a lower tier",
                                 labels=self._LABELS), "offloaded_bytes"),
            (CounterMetricFamily("turbine_worker_kv_tier_onboard_seconds",
                                 "Time onboardings from a lower tier took", labels=self._LABELS),
             "onboard_seconds"),
        ]
        tiers = list(self.tiers.items())  # a load report may land while a scrape runs elsewhere
        for fam, field in families:
            for key, t in tiers:
                fam.add_metric(list(key), getattr(t, field))
            yield fam


class _ServingCollector:
    """Reads plain counters at scrape time, so the serving path only ever bumps integers."""

    def __init__(self, http: Any, registry: Any, generation: Any, client: Any) -> None:
        self.http, self.model_registry, self.generation, self.client = http, registry, generation, client

    def collect(self) -> Iterator[Metric]:
        http = self.http
        yield GaugeMetricFamily("turbine_http_connections", "Open client connections", value=len(http.connections))
        yield GaugeMetricFamily("turbine_http_max_connections", "Connection cap", value=http.max_connections)
        yield CounterMetricFamily("turbine_http_connections_refused", "Connections refused at the cap",
                                  value=http.refused)
        rejected = CounterMetricFamily("turbine_http_requests_rejected",
                                       "Requests refused before routing (malformed, over a limit, too slow)",
                                       labels=["status"])
        for status, n in sorted(http.rejected.items()):
            rejected.add_metric([str(status)], n)
        yield rejected
        timeouts = CounterMetricFamily("turbine_http_timeouts", "Connections closed by a timeout", labels=["kind"])
        for kind, n in http.timeouts.items():
            timeouts.add_metric([kind], n)
        yield timeouts
        rejected_records = self.model_registry.rejected_records + getattr(self.model_registry.discovery, "rejected", 0)
        yield CounterMetricFamily("turbine_frontend_discovery_records_rejected",
                                  "Discovery records skipped as malformed", value=rejected_records)
        yield CounterMetricFamily("turbine_frontend_migrations",
                                  "Streams continued on another worker after theirs failed mid-way",
                                  value=self.generation.migrations)
        yield CounterMetricFamily("turbine_frontend_retries",
                                  "Requests a worker refused before starting (draining, unreachable), sent to another",
                                  value=self.generation.retries)
        yield CounterMetricFamily("turbine_request_plane_stalls",
                                  "Worker connections dropped because the worker went silent",
                                  value=getattr(self.client, "stalls", 0))
        d = self.generation.prefill.stats
        decisions = CounterMetricFamily("turbine_disagg_decisions",
                                        "Where disaggregated models' prompts were prefilled, and why",
                                        labels=["decision"])
        for decision, n in d.decisions.items():
            decisions.add_metric([decision], n)
        yield decisions
        yield CounterMetricFamily("turbine_disagg_prefill_failures",
                                  "Prefill legs that failed (prefilled on the decode worker instead)",
                                  value=d.prefill_failures)
        yield CounterMetricFamily("turbine_disagg_transfer_errors",
                                  "KV transfers a decode worker refused (prefilled there instead)",
                                  value=d.transfer_errors)
        yield CounterMetricFamily("turbine_disagg_pulled_blocks", "KV blocks decode workers pulled from prefill workers",
                                  value=d.pulled_blocks)
        try:
            tasks = len(asyncio.all_tasks())
        except RuntimeError:  # scraped from outside the loop (tests)
            tasks = 0
        yield GaugeMetricFamily("turbine_process_asyncio_tasks", "Tasks alive on the event loop", value=tasks)
