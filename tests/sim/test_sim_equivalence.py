"""Speed work must not change what the simulator computes: bit-identical results, pinned.

Several fleets replay the first requests of the shared Mooncake trace; each run is reduced to
digests of everything observable and compared with `sim_equivalence_golden.json`, captured from
the code before the simulator was made faster (commit 4e74e4c):

- per request: ok/error, TTFT, every ITL, E2E (exact floats, ``float.hex``), prompt, output and
  cached tokens;
- the run's stats: steps, preemptions, KV event batches, requests per worker, disaggregation
  decisions, pulled and onboarded blocks, TTFT split;
- the final state: each core's step count, sampler RNG state (the number of draws), block
  manager (which block holds which hash and tokens, the free and LRU orders), KV tiers, and each
  router's index and load view.

A difference fails with the config, the first differing request and the stats side by side.
Regenerate the golden file only for a deliberate change of results:
``python tests/sim/test_sim_equivalence.py --write``.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
TRACE = REPO.parent / "shared" / "data" / "mooncake_synthetic_trace.jsonl"
PROFILE = REPO / "bench" / "profiles" / "h200_llama3-8b_bf16.json"
GOLDEN = Path(__file__).with_name("sim_equivalence_golden.json")

if str(REPO) not in sys.path:  # run as a script (--write)
    sys.path.insert(0, str(REPO))

from turbine.bench.trace import load_trace  # noqa: E402
from turbine.mocker.core import MockerConfig  # noqa: E402
from turbine.sim import SimConfig, Simulator  # noqa: E402

# name -> (requests from the trace's start, SimConfig keyword arguments, MockerConfig keyword arguments)
CONFIGS: dict[str, tuple[int, dict[str, Any], dict[str, Any]]] = {
    "kv": (300, {"workers": 8, "router": "kv"}, {}),
    "round-robin": (300, {"workers": 8, "router": "round-robin"}, {}),
    "kv-speed2": (300, {"workers": 8, "router": "kv", "speed": 2.0}, {}),
    "kv-profile-async": (250, {"workers": 8, "router": "kv"}, {"profile": str(PROFILE)}),
    "rr-profile-sync": (250, {"workers": 4, "router": "round-robin", "speed": 2.0},
                        {"profile": str(PROFILE), "async_scheduling": False}),
    "disagg-2p6d": (250, {"prefill_workers": 2, "decode_workers": 6, "router": "kv"}, {}),
    "disagg-profile": (200, {"prefill_workers": 2, "decode_workers": 2, "router": "kv", "speed": 2.0},
                       {"profile": str(PROFILE), "num_gpu_blocks": 4096}),
    "kv-host-tier": (250, {"workers": 4, "router": "kv", "speed": 2.0},
                     {"num_gpu_blocks": 2048, "host_kv_gb": 8.0, "disk_kv_gb": 16.0}),
    # small caches and few seats: preemptions, recomputation, requests that never fit (errors)
    "kv-preempt": (200, {"workers": 3, "router": "kv", "speed": 4.0},
                   {"num_gpu_blocks": 900, "max_num_seqs": 12, "max_num_batched_tokens": 4096}),
    "approx-temp-seed": (250, {"workers": 5, "router": "kv", "router_approx": True, "router_temperature": 0.5,
                               "seed": 7, "speed": 3.0}, {"block_size": 32}),
    "least-loaded-async": (200, {"workers": 6, "router": "least-loaded", "speed": 2.0},
                           {"async_scheduling": True, "num_gpu_blocks": 3000}),
}


def _h(obj: Any) -> str:
    return hashlib.sha256(repr(obj).encode()).hexdigest()[:16]


def _f(x: float | None) -> str | None:
    return None if x is None else float(x).hex()


def _request_digest(r: Any) -> str:
    return _h((r.ok, r.error, _f(r.ttft_s), [_f(x) for x in r.itl_s], _f(r.e2e_s), r.prompt_tokens,
               r.output_tokens, r.cached_tokens))


def _core_state(core: Any) -> Any:
    bm = core.block_manager
    cached = sorted((b, c.seq_hash, c.parent_hash, c.token_ids.tobytes(), c.position) for b, c in bm._cached.items())
    state = [core.num_steps, core._random.__self__.getstate(), cached, sorted(bm._hash_to_block.items()),
             list(bm._evictable), list(bm._free), bm._next_fresh, bytes(bm._ref)]
    if core.tiers is not None:
        t = core.tiers
        state.append((t.loads(1), [_Event(e) for e in t.snapshot()], [(k, getattr(t.stats, k)) for k in t.stats.__slots__]))
    return state


class _Event:
    """A BlockStored as the golden file's digests saw it: written before ``local_hashes`` joined
    the struct (tier snapshots carry none), so its repr leaves that field out when it is unset."""

    def __init__(self, ev: Any) -> None:
        self.ev = ev

    def __repr__(self) -> str:
        return repr(self.ev).replace(", local_hashes=None)", ")")


def _router_state(router: Any) -> Any:
    ix = router.index
    loads = sorted((w, ld.active_requests, ld.prefill_tokens, ld.decode_blocks)
                   for w, ld in router.loads.workers.items())
    return [sorted(ix._mask.items()), sorted((w, sorted(b.items())) for w, b in ix._blocks.items()), loads,
            router.rng.getstate()]


def run_config(name: str) -> dict[str, Any]:
    n, sim_kw, mocker_kw = CONFIGS[name]
    requests = load_trace(TRACE, n)
    ctx = max(r.input_length + r.output_length for r in requests)
    mocker = MockerConfig(context_length=ctx, **mocker_kw)
    sim = Simulator(requests, SimConfig(mocker=mocker, **sim_kw))
    res = sim.run()
    stats = res.stats.to_dict()
    del stats["wall_s"]
    return {
        "requests": [_request_digest(r) for r in res.results],
        "duration": _f(res.duration_s),
        "stats": stats,
        "cores": _h([_core_state(c) for c in sim.cores]),
        "routers": _h([_router_state(sim.router), _router_state(sim.prefill_router)]),
        "ok": sum(r.ok for r in res.results),
        "output_tokens": sum(r.output_tokens or 0 for r in res.results),
    }


def _golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text())


needs_trace = pytest.mark.skipif(not TRACE.exists(), reason=f"no shared trace at {TRACE}")


@needs_trace
@pytest.mark.parametrize("name", list(CONFIGS))
def test_results_match_the_golden_digests(name: str) -> None:
    want = _golden()[name]
    got = run_config(name)
    if got["requests"] != want["requests"]:
        i = next(i for i, (a, b) in enumerate(zip(got["requests"], want["requests"])) if a != b)
        pytest.fail(f"{name}: request {i} differs (of {len(want['requests'])}); stats now {got['stats']}, "
                    f"golden {want['stats']}")
    assert got["stats"] == want["stats"]
    assert got["duration"] == want["duration"]
    assert got["cores"] == want["cores"], f"{name}: the cores' final state differs"
    assert got["routers"] == want["routers"], f"{name}: the routers' final state differs"
    assert got == want


@needs_trace
def test_the_configs_exercise_what_they_claim() -> None:
    """The golden runs cover preemption, errors, KV tiers, disaggregation (else they pin little)."""
    g = _golden()
    assert g["kv-preempt"]["stats"]["preemptions"] > 0
    assert g["kv-preempt"]["ok"] < CONFIGS["kv-preempt"][0]  # some never fit
    assert g["kv-host-tier"]["stats"].get("onboarded_blocks", 0) > 0
    assert g["disagg-2p6d"]["stats"]["decisions"]["remote"] > 0
    assert g["disagg-2p6d"]["stats"]["pulled_blocks"] > 0
    assert g["kv"]["stats"]["kv_event_batches"] > 0


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: {sys.argv[0]} --write   (rewrites {GOLDEN.name} from the current code)")
    out = {}
    for config in CONFIGS:
        out[config] = run_config(config)
        print(config, out[config]["stats"], flush=True)
    GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
