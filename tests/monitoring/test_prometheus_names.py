"""What Turbine exports to Prometheus: every name follows the conventions, and every query of the
Grafana dashboard (deploy/grafana/turbine.json) names a metric that is exported.

"Exported" is read from real objects: a frontend with two mock workers in this process (its
/metrics scraped: HTTP, frontend, router, worker, tier, disaggregation and process families)
and the planner's registry; a family declared without samples yet still counts (its HELP/TYPE).
"""
from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from testkit import ServerThread

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "turbine.json"


class Family(NamedTuple):
    name: str  # as exposed: a counter's without its _total (the parser strips it)
    type: str
    doc: str
    samples: list  # prometheus_client Sample


@pytest.fixture(scope="module")
def exported(model_dir: Path) -> dict[str, Family]:
    """Family name -> Family, over a live frontend's /metrics and the planner's registry."""
    from turbine.planner.runner import PlannerMetrics

    with ServerThread(model_dir, workers=2, speedup=50.0) as s:
        body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                           "stream": True}).encode()
        req = urllib.request.Request(s.url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
        with urllib.request.urlopen(s.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
    planner = CollectorRegistry(auto_describe=False)
    PlannerMetrics(planner)
    text += generate_latest(planner).decode()
    out: dict[str, Family] = {}
    for fam in text_string_to_metric_families(text):
        assert fam.name not in out, f"{fam.name} is exported twice"
        out[fam.name] = Family(fam.name, fam.type, fam.documentation, list(fam.samples))
    for name in [n for n in out if n.endswith("_created")]:  # prometheus_client's creation-time gauges
        if out.get(name.removesuffix("_created"), Family("", "gauge", "", [])).type in ("counter", "histogram"):
            del out[name]
    return out


# --- naming conventions ----------------------------------------------------------------------------
_NOT_BASE_UNITS = re.compile(r"_(ms|msec|millis|milliseconds|us|usec|micros|microseconds|ns|nanoseconds|minutes|"
                             r"hours|days|kb|mb|gb|kib|mib|gib|kilobytes|megabytes|gigabytes|percent|pct)(_|$)")
_TIME_WORDS = {"latency", "duration", "lag", "time", "wait", "delay", "elapsed", "age", "uptime"}
_SIZE_WORDS = {"memory", "size", "bytes"}
_UNITS = ("_seconds", "_bytes", "_tokens", "_blocks", "_requests", "_ratio")


def test_exported_names_follow_prometheus_conventions(exported: dict[str, Family]) -> None:
    assert len(exported) > 40  # the whole frontend came up, not an empty registry
    for name, fam in exported.items():
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), f"{name}: lower snake case"
        assert name.startswith(("turbine_", "process_", "python_")), f"{name}: namespaced"
        assert fam.doc.strip(), f"{name}: HELP text"
        assert not _NOT_BASE_UNITS.search(name), f"{name}: base units only (seconds, bytes), no ms or KiB"
        assert "_total" not in name, f"{name}: only a counter's samples end in _total"
        if fam.type == "counter":
            for s in fam.samples:
                assert s.name in (name + "_total", name + "_created"), f"counter sample {s.name} must end in _total"
        else:
            for s in fam.samples:
                assert not s.name.endswith("_total"), f"{fam.type} {s.name}: _total is for counters"
        if fam.type in ("histogram", "summary"):
            assert name.endswith(_UNITS), f"{name}: a distribution names its unit"
        words = set(name.split("_"))
        if words & _TIME_WORDS:
            assert name.endswith(("_seconds", "_ratio")), f"{name}: time is in seconds"
        if words & _SIZE_WORDS:
            assert name.endswith("_bytes"), f"{name}: sizes are in bytes"
        for s in fam.samples:  # units belong in the name, not in a label value
            for k, v in s.labels.items():
                assert not re.search(r"_(ms|milliseconds|us)$", v), f"{name}{{{k}={v!r}}}: unit in a label value"


def test_known_renames_are_gone(exported: dict[str, Family]) -> None:
    """Names that broke the conventions before (issue 19) stay gone; their replacements exist."""
    for old in ("turbine_worker_kv_total_blocks", "turbine_planner_observed", "turbine_planner_predicted",
                "turbine_planner_correction"):
        assert old not in exported
    for new, kind in (("turbine_worker_kv_capacity_blocks", "gauge"), ("turbine_worker_kv_tier_hit_blocks", "counter"),
                      ("turbine_worker_kv_tier_onboarded_bytes", "counter"),
                      ("turbine_worker_kv_tier_offloaded_bytes", "counter"),
                      ("turbine_worker_kv_tier_onboard_seconds", "counter"),
                      ("turbine_planner_observed_ttft_seconds", "gauge"),
                      ("turbine_planner_latency_correction_ratio", "gauge")):
        assert exported[new].type == kind, new


# --- the dashboard's queries -----------------------------------------------------------------------
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
             "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, aggregations, label matchers,
    grouping labels, ranges, strings and Grafana's $variables left out)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, regexes)
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges and subqueries ($__rate_interval)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # grouping labels
    names = set()
    for m in re.finditer(r"(?<![\w$:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", e):
        if m.group(2) is None and m.group(1) not in _KEYWORDS:
            names.add(m.group(1))
    return names


def test_promql_metric_names() -> None:
    assert promql_metric_names(
        'histogram_quantile(0.99, sum by (le, model) (rate(turbine_x_seconds_bucket{model=~"$m",a="{b}"}[$__rate_interval])))'
    ) == {"turbine_x_seconds_bucket"}
    assert promql_metric_names("sum(rate(a_total[5m])) / sum without (w) (b) * on (x) group_left c > bool 0.5") \
        == {"a_total", "b", "c"}
    assert promql_metric_names("max by (worker) (g{x!~\"2..\"}) offset 5m") == {"g"}


def _resolve(sample: str, exported: dict[str, Family]) -> str | None:
    """The family a sample name belongs to, or why it does not belong to any."""
    fam = exported.get(sample)
    if fam is not None:
        return None if fam.type in ("gauge", "untyped", "info") else f"{sample} is a {fam.type}: select its samples"
    for suffix, kinds in (("_total", ("counter",)), ("_bucket", ("histogram",)), ("_sum", ("histogram", "summary")),
                          ("_count", ("histogram", "summary"))):
        if sample.endswith(suffix):
            fam = exported.get(sample[: -len(suffix)])
            if fam is not None:
                return None if fam.type in kinds else f"{sample}: {fam.name} is a {fam.type}, not a {kinds[0]}"
    return f"{sample} is not exported by Turbine"


def _dashboard_queries() -> Iterator[tuple[str, str]]:
    d = json.loads(DASHBOARD.read_text())
    for p in d["panels"]:
        for t in p.get("targets", []):
            yield p["title"], t["expr"]
    for v in d["templating"]["list"]:
        q = v.get("query")
        if isinstance(q, dict):
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q["query"])
            assert m, f"variable {v['name']}: {q['query']}"
            yield f"variable {v['name']}", m.group(1)


def test_every_dashboard_query_names_an_exported_metric(exported: dict[str, Family]) -> None:
    queries = list(_dashboard_queries())
    assert len(queries) > 50
    problems = []
    seen: set[str] = set()
    for where, expr in queries:
        names = promql_metric_names(expr)
        if not names:
            problems.append(f"{where}: no metric in {expr!r}")
        for n in names:
            seen.add(n)
            why = _resolve(n, exported)
            if why:
                problems.append(f"{where}: {why}")
    assert not problems, "\n".join(problems)
    # every subsystem the issue names has panels
    for prefix in ("turbine_frontend_", "turbine_router_", "turbine_worker_requests_", "turbine_worker_kv_tier_",
                   "turbine_disagg_", "turbine_planner_"):
        assert any(n.startswith(prefix) for n in seen), prefix


def test_dashboard_is_importable() -> None:
    """The shape Grafana's import needs: unique panel ids, a datasource variable every target uses."""
    d = json.loads(DASHBOARD.read_text())
    assert d["title"] and d["uid"] and d["schemaVersion"] >= 36
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    assert any(v["type"] == "datasource" and v["name"] == "datasource" for v in d["templating"]["list"])
    for p in d["panels"]:
        assert p["type"] in ("row", "timeseries", "stat")
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}"
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
