"""The frontend's per-worker gauges follow the workers' load reports, and a worker that left
loses its series; one that comes back under the same id gets them again."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from turbine.frontend.metrics import FrontendMetrics
from turbine.protocols.load import WorkerLoad


def _series(m: FrontendMetrics, name: str) -> dict[str, float]:
    for fam in text_string_to_metric_families(m.render().decode()):
        if fam.name == name:
            return {s.labels["worker"]: s.value for s in fam.samples}
    return {}


def _load(worker: str, running: int) -> WorkerLoad:
    return WorkerLoad(worker_id=worker, model_name="tiny", kv_active_blocks=3 * running, kv_total_blocks=100,
                      num_running=running, num_waiting=1)


def test_worker_gauges_follow_reports_and_go_with_the_worker() -> None:
    m = FrontendMetrics()
    for running in (1, 4):
        m.worker_load(_load("a", running))
    m.worker_load(_load("b", 2))
    assert _series(m, "turbine_worker_requests_running") == {"a": 4.0, "b": 2.0}
    assert _series(m, "turbine_worker_kv_active_blocks") == {"a": 12.0, "b": 6.0}
    m.worker_gone("tiny", "a")
    assert _series(m, "turbine_worker_requests_running") == {"b": 2.0}
    m.worker_load(_load("a", 5))  # back under the same id: a fresh series, not a stale child
    assert _series(m, "turbine_worker_requests_running") == {"a": 5.0, "b": 2.0}
