"""What the planner observes: the frontend's Prometheus counters, differenced per interval.

    rate         requests that got their first token, per second   (TTFT histogram count)
    ISL, OSL     prompt and output tokens per finished request      (token counters / E2E count)
    prefix hit   cached prompt tokens / prompt tokens               (token counters)
    TTFT, ITL    means over the interval                            (histogram sum / count)
    concurrency  requests in flight, by Little's law                (E2E histogram sum / interval)
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from turbine.planner.sla_planner import Observation

_SERIES = {
    "ttft_count": "turbine_frontend_time_to_first_token_seconds_count",
    "ttft_sum": "turbine_frontend_time_to_first_token_seconds_sum",
    "itl_count": "turbine_frontend_inter_token_latency_seconds_count",
    "itl_sum": "turbine_frontend_inter_token_latency_seconds_sum",
    "e2e_count": "turbine_frontend_request_duration_seconds_count",
    "e2e_sum": "turbine_frontend_request_duration_seconds_sum",
    "prompt": "turbine_frontend_prompt_tokens_total",
    "output": "turbine_frontend_output_tokens_total",
    "cached": "turbine_frontend_cached_tokens_total",
}


@dataclass(frozen=True)
class Counters:
    at: float
    values: dict[str, float]


def parse_counters(text: str, *, model: str | None = None, at: float = 0.0) -> Counters:
    """The cumulative series the planner differences, summed over models (or one ``model``)."""
    wanted = {v: k for k, v in _SERIES.items()}
    values = dict.fromkeys(_SERIES, 0.0)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = wanted.get(s.name)
            if key is not None and (model is None or s.labels.get("model") == model):
                values[key] += s.value
    return Counters(at, values)


def difference(prev: Counters, cur: Counters) -> Observation:
    """One interval's observation from two readings (a counter that went down: the frontend
    restarted, so the interval counts from zero)."""
    dt = max(1e-9, cur.at - prev.at)
    d = {k: cur.values[k] - prev.values[k] for k in _SERIES}
    if any(v < 0 for v in d.values()):
        d = dict(cur.values)
    started, finished = d["ttft_count"], d["e2e_count"]
    return Observation(
        interval_s=dt, rate=started / dt,
        isl=d["prompt"] / finished if finished else None, osl=d["output"] / finished if finished else None,
        ttft_ms=d["ttft_sum"] / started * 1e3 if started else None,
        itl_ms=d["itl_sum"] / d["itl_count"] * 1e3 if d["itl_count"] else None,
        concurrency=d["e2e_sum"] / dt if finished else None,
        prefix_hit=d["cached"] / d["prompt"] if d["prompt"] > 0 else None,
    )


class FrontendScraper:
    """Reads a frontend's /metrics; `read` returns the interval since the previous read."""

    def __init__(self, url: str, *, model: str | None = None, api_key: str | None = None, timeout_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        base = url.rstrip("/").removesuffix("/v1")
        self.url = base + "/metrics"
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.clock = clock
        self._prev: Counters | None = None
        self._session: aiohttp.ClientSession | None = None

    async def _fetch(self) -> Counters:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        async with self._session.get(self.url, headers=self.headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"{self.url} answered {resp.status}")
            text = await resp.text()
        return parse_counters(text, model=self.model, at=self.clock())

    async def read(self) -> Observation | None:
        """None on the first call (it only primes the counters)."""
        cur = await self._fetch()
        prev, self._prev = self._prev, cur
        return None if prev is None else difference(prev, cur)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


__all__ = ["Counters", "FrontendScraper", "difference", "parse_counters"]
