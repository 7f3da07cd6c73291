"""Disaggregated serving with the built-in engine on CPU: greedy output identical to aggregated
serving, for every transfer backend (in-process; TCP and NIXL between processes), fewer blocks
pulled after a decode-side prefix hit, and no KV block left held or referenced anywhere."""
from __future__ import annotations

import importlib.util
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from testkit import free_port, metric_values, spawn, wait_workers

pytest.importorskip("torch")

BLOCK = 16
# Prompts of 160-400 tokens: whole blocks to pull, and a partial tail the decode worker computes.
PROMPTS = ["The event loop runs one task at a time; " * 12, "Paged attention keeps KV in blocks. " * 20,
           "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n" * 6]
ENGINE = dict(engine="builtin", block_size=BLOCK, num_gpu_blocks=256)


def _disagg(**kw: object):  # type: ignore[no-untyped-def]
    from turbine.disagg import DisaggConfig

    return DisaggConfig(min_remote_prefill_tokens=0, **kw)  # type: ignore[arg-type]


def _complete(url: str) -> list[str]:
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    return [c.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0).choices[0].text
            for p in PROMPTS]


def _metrics(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return r.read().decode()


@pytest.fixture(scope="module")
def varied_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Weights of std 0.2: at the default 0.02 the tiny model's greedy output repeats one token,
    which would hide a wrong KV block."""
    from turbine.model_maker.make_model import make_model
    from turbine.model_maker.weights import write_random_weights

    return make_model(tmp_path_factory.mktemp("models") / "tiny-std02", preset="tiny",
                      write_weights=lambda d, c: write_random_weights(d, c, std=0.2))


@pytest.fixture(scope="module")
def reference(varied_model: Path, server_factory) -> list[str]:  # type: ignore[no-untyped-def]
    """What one aggregated worker answers (greedy)."""
    with server_factory(varied_model, workers=1, **ENGINE) as s:
        out = _complete(s.url)
    assert len(set(out)) == len(out) and all(len(set(t)) > 5 for t in out), out  # varied, not one token repeated
    return out


def test_in_process_disaggregation_matches_aggregated(varied_model: Path, server_factory, reference) -> None:  # type: ignore[no-untyped-def]
    with server_factory(varied_model, workers=0, prefill_workers=1, decode_workers=1, disagg=_disagg(),
                        **ENGINE) as s:
        assert _complete(s.url) == reference
        text = _metrics(s.url)
        assert metric_values(text, 'turbine_disagg_decisions_total{decision="remote"}') == [len(PROMPTS)]
        pulled = metric_values(text, "turbine_disagg_pulled_blocks_total")[0]
        assert pulled >= 10 * len(PROMPTS)
        assert metric_values(text, "turbine_disagg_prefill_failures_total") == [0.0]

        # A decode-side prefix hit: the same prompt, longer. The decode worker holds the first
        # prompt's blocks now (pulled ones join its prefix cache), so it pulls only the new ones.
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)
        longer = PROMPTS[1] + "Each block holds sixteen tokens. " * 8
        c.completions.create(model="tiny", prompt=longer, max_tokens=4, temperature=0)
        again = metric_values(_metrics(s.url), "turbine_disagg_pulled_blocks_total")[0] - pulled
        n_tokens = c.completions.create(model="tiny", prompt=longer, max_tokens=1, temperature=0).usage.prompt_tokens
        assert 0 < again < n_tokens // BLOCK - 5, (again, n_tokens)

        stats = s.call(lambda: [(w.card.role, w.engine.stats(), len(w.engine.core.scheduler.held))
                                for w in s.dep.workers])
        for role, st, held in stats:
            assert st.kv_active_blocks == 0 and held == 0, (role, st, held)


@pytest.mark.parametrize("backend", ["tcp", "nixl"])
def test_prefill_and_decode_processes_match_aggregated(backend: str, varied_model: Path, reference, tmp_path: Path,
                                                       procs) -> None:  # type: ignore[no-untyped-def]
    if backend == "nixl" and importlib.util.find_spec("nixl") is None:
        pytest.skip("the nixl package is not installed")
    disc = tmp_path / "disc"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spawn(procs, "frontend", "--discovery-dir", str(disc), "--port", str(port), "--disagg-min-prefill-tokens", "0")
    for role in ("prefill", "decode"):
        spawn(procs, "worker", "--engine", "builtin", "--device", "cpu", "--model", str(varied_model),
              "--model-name", "tiny", "--discovery-dir", str(disc), "--role", role, "--kv-transfer", backend,
              "--block-size", str(BLOCK), "--num-gpu-blocks", "256")
    wait_workers(url, 2, timeout=120)
    assert _complete(url) == reference
    text = _metrics(url)
    assert metric_values(text, 'turbine_disagg_decisions_total{decision="remote"}') == [len(PROMPTS)]
    assert metric_values(text, "turbine_disagg_pulled_blocks_total")[0] >= 10 * len(PROMPTS)
    assert metric_values(text, "turbine_disagg_prefill_failures_total") == [0.0]
    assert metric_values(text, "turbine_disagg_transfer_errors_total") == [0.0]
    deadline = time.monotonic() + 5  # the workers' load arrives within their 1 s heartbeat
    while (active := sum(metric_values(_metrics(url), "turbine_worker_kv_active_blocks"))) and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    assert active == 0  # released on the prefill side, finished on the decode side
