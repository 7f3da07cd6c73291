"""A served model with a host KV tier: a prefix evicted from the GPU cache comes back from host
memory (usage counts it as cached), the router is told the tier, and /metrics shows the tier."""
from __future__ import annotations

import time

import openai

from testkit import metric_values


def test_host_tier_serves_evicted_prefixes(model_dir, server_factory) -> None:  # type: ignore[no-untyped-def]
    # 64 GPU blocks of 16 tokens (1 KiB a token): ~1000 tokens of cache; a host tier of 4x that
    with server_factory(model_dir, workers=1, speedup=200.0, block_size=16, num_gpu_blocks=64,
                        kv_bytes_per_token=1024, host_kv_gb=4 * 64 * 16 * 1024 / 1e9) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=30)
        first = "A long shared system prompt about paged attention and KV caches. " * 12
        r = c.completions.create(model="tiny", prompt=first, max_tokens=2)
        n = r.usage.prompt_tokens
        for i in range(6):  # other prompts push the first one out of the GPU cache
            c.completions.create(model="tiny", prompt=f"unrelated request number {i} " * 40, max_tokens=2)
        again = c.completions.create(model="tiny", prompt=first, max_tokens=2)
        assert again.usage.prompt_tokens_details.cached_tokens >= n - 16  # onboarded tokens are cached
        stats = s.call(lambda: s.dep.workers[0].engine.core.tiers.stats)
        assert stats.onboarded["host"] > 0 and stats.offloaded > 0
        deadline = time.monotonic() + 3  # the worker's load (with its tiers) within its heartbeat
        while True:
            import urllib.request

            with urllib.request.urlopen(s.url + "/metrics", timeout=5) as resp:
                text = resp.read().decode()
            if sum(metric_values(text, "turbine_worker_kv_tier_onboarded_bytes_total")) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert metric_values(text, "turbine_worker_kv_tier_onboarded_bytes_total")[0] > 0
        assert metric_values(text, "turbine_worker_kv_tier_capacity_blocks")[0] == 256
        assert s.call(lambda: s.dep.frontend.registry.models["tiny"].router.index.has_tiers())
