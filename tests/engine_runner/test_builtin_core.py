"""BuiltinCore: greedy outputs equal a dense reference alone, batched, after prefix hits and
after preemption; abort frees blocks; seeded sampling ignores the batch; stop conditions."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from runner_toys import dense_greedy, greedy, run_to_completion

from turbine.engine.builtin_core import BuiltinConfig
from turbine.protocols.generate import GenerateRequest, SamplingOptions, StopConditions
from turbine.protocols.kv_events import BlockStored

pytestmark = pytest.mark.timeout(60)

PROMPTS = {
    "a": list(range(10, 31)),  # 21 tokens: five full blocks and a partial one
    "b": [7, 3, 250, 11],
    "c": [100 + (i * 37) % 200 for i in range(45)],
    "d": [5],
}
MAX_TOKENS = {"a": 12, "b": 20, "c": 9, "d": 15}


@pytest.fixture(scope="module")
def reference(toy_model):  # type: ignore[no-untyped-def]
    return {rid: dense_greedy(toy_model, p, MAX_TOKENS[rid]) for rid, p in PROMPTS.items()}


def test_alone_equals_dense_reference(make_core, reference) -> None:  # type: ignore[no-untyped-def]
    for rid, prompt in PROMPTS.items():
        core = make_core()
        core.add_request(greedy(rid, prompt, MAX_TOKENS[rid]))
        assert run_to_completion(core) == {rid: reference[rid]}
        assert core.stats().kv_active_blocks == 0


@pytest.mark.parametrize("budget", [8, 64])
def test_batched_with_chunked_prefill_and_late_arrivals_equals_alone(make_core, reference, budget) -> None:  # type: ignore[no-untyped-def]
    core = make_core(max_num_batched_tokens=budget)
    core.add_request(greedy("a", PROMPTS["a"], MAX_TOKENS["a"]))
    core.add_request(greedy("b", PROMPTS["b"], MAX_TOKENS["b"]))
    out: dict[str, list[int]] = {}
    mixed = 0
    for i in range(200):  # c and d arrive while a and b decode: steps mix prefill and decode
        if i == 3:
            core.add_request(greedy("c", PROMPTS["c"], MAX_TOKENS["c"]))
        if i == 5:
            core.add_request(greedy("d", PROMPTS["d"], MAX_TOKENS["d"]))
        res = core.step()
        mixed += bool(res.num_prefill_tokens and res.num_decode_seqs)
        for o in res.outputs:
            if o.token_id is not None:
                out.setdefault(o.request_id, []).append(o.token_id)
        core.block_manager.check_integrity()
        if i > 5 and not core.has_work():
            break
    assert out == reference
    assert mixed > 0


def test_prefix_cache_hit_skips_tokens_and_keeps_the_output(make_core, reference) -> None:  # type: ignore[no-untyped-def]
    core = make_core()
    core.add_request(greedy("a", PROMPTS["a"], MAX_TOKENS["a"]))
    run_to_completion(core)
    # The same prompt again, and one sharing its first 16 tokens, run together.
    core.add_request(greedy("a2", PROMPTS["a"], MAX_TOKENS["a"]))
    shared = PROMPTS["a"][:16] + [300, 301, 302]
    core.add_request(greedy("s", shared, 10))
    first = core.step()
    hits = {o.request_id: o.cached_tokens for o in first.outputs}
    assert hits == {"a2": 20, "s": 16}  # whole blocks; never the whole prompt
    assert first.num_prefill_tokens == (21 - 20) + (19 - 16)
    out = run_to_completion(core)
    for o in first.outputs:
        if o.token_id is not None:
            out[o.request_id].insert(0, o.token_id)
    assert out["a2"] == reference["a"]
    fresh = make_core(enable_prefix_caching=False)
    fresh.add_request(greedy("s", shared, 10))
    assert out["s"] == run_to_completion(fresh)["s"]


def test_preemption_recomputes_to_the_same_output(make_core, reference) -> None:  # type: ignore[no-untyped-def]
    # 16 blocks of 4 tokens cannot hold all four sequences: the newest ones are preempted.
    core = make_core(num_gpu_blocks=16)
    for rid in ("a", "c", "b", "d"):
        core.add_request(greedy(rid, PROMPTS[rid], MAX_TOKENS[rid]))
    out = run_to_completion(core)
    assert core.scheduler.num_preemptions > 0
    assert out == reference
    assert core.stats().kv_active_blocks == 0


def test_abort_frees_blocks_in_any_state(make_core) -> None:  # type: ignore[no-untyped-def]
    core = make_core(max_num_batched_tokens=16)
    core.add_request(greedy("a", PROMPTS["a"], 50))
    core.add_request(greedy("c", PROMPTS["c"], 50))
    core.step()
    core.step()
    assert core.stats().kv_active_blocks > 0
    assert core.abort("a") and core.abort("c") and not core.abort("a")
    assert core.stats()[:4] == (0, 256, 0, 0)
    core.block_manager.check_integrity()
    assert core.step().outputs == []


def test_seeded_sampling_is_reproducible_across_batch_compositions(make_core) -> None:  # type: ignore[no-untyped-def]
    def sampled(rid: str, seed: int | None) -> GenerateRequest:
        return GenerateRequest(request_id=rid, token_ids=PROMPTS["a"],
                               sampling=SamplingOptions(temperature=1.0, top_p=0.95, seed=seed),
                               stop=StopConditions(max_tokens=15))

    core = make_core()
    core.add_request(sampled("x", 7))
    alone = run_to_completion(core)["x"]
    core = make_core(max_num_batched_tokens=8, num_gpu_blocks=20)  # chunked and preempted
    for rid in ("c", "b"):
        core.add_request(greedy(rid, PROMPTS[rid], MAX_TOKENS[rid]))
    core.add_request(sampled("x", 7))
    core.add_request(sampled("other", 8))
    core.add_request(sampled("unseeded", None))
    out = run_to_completion(core)
    assert out["x"] == alone
    assert out["other"] != alone


def test_stop_tokens_min_tokens_and_ignore_eos(make_core, reference) -> None:  # type: ignore[no-untyped-def]
    first = reference["b"][0]
    core = make_core()
    core.add_request(greedy("stop", PROMPTS["b"], 10, stop_token_ids=(first,)))
    res = core.step().outputs[0]
    assert (res.token_id, res.finish_reason) == (first, "stop")
    # min_tokens bans the stop token until 3 tokens exist: the stream cannot end early.
    core.add_request(greedy("min", PROMPTS["b"], 10, stop_token_ids=(first,), min_tokens=3))
    out = run_to_completion(core)["min"]
    assert first not in out[:3] and len(out) >= 3
    # EOS comes from the model config (the toy's is id 1) unless ignore_eos.
    eos_core = make_core()
    assert eos_core.eos_token_ids == (1,)
    eos_core.scheduler._eos = frozenset({first})  # make the greedy first token an EOS
    eos_core.add_request(greedy("e", PROMPTS["b"], 10))
    eos_core.add_request(greedy("i", PROMPTS["b"], 4, ignore_eos=True))
    out = run_to_completion(eos_core)
    assert out == {"e": [first], "i": reference["b"][:4]}


def test_kv_events_match_the_snapshot(make_core) -> None:  # type: ignore[no-untyped-def]
    core = make_core()
    core.add_request(greedy("a", PROMPTS["a"], 6))
    stored: list[int] = []
    while core.has_work():
        for ev in core.step().kv_events:
            assert isinstance(ev, BlockStored) and ev.block_size == 4
            stored.extend(ev.block_hashes)
    snap = [h for ev in core.kv_snapshot() for h in ev.block_hashes]
    assert stored == snap and len(snap) == (21 + 6 - 1) // 4


def test_requests_are_validated(make_core) -> None:  # type: ignore[no-untyped-def]
    core = make_core(context_length=64)
    assert core.context_length == 64 and core.num_kv_blocks == 256
    with pytest.raises(ValueError, match="token ids"):
        core.add_request(greedy("x", [384], 4))
    with pytest.raises(ValueError, match="top_p"):
        core.add_request(GenerateRequest(request_id="y", token_ids=[1, 2], sampling=SamplingOptions(top_p=0.0),
                                         stop=StopConditions(max_tokens=4)))
    with pytest.raises(ValueError, match="context length"):
        core.add_request(greedy("z", list(range(64)), 4))
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        BuiltinConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="dtype"):
        BuiltinConfig(dtype="int8")
    with pytest.raises(ValueError, match="piecewise_graph_tokens"):
        BuiltinConfig(piecewise_graph_tokens=-1)
    # CPU default sizing: 256 MiB capped at 128k tokens (the toy needs 512 bytes per token).
    auto = make_core(num_gpu_blocks=None, context_length=64)
    assert auto.num_kv_blocks * 4 == 1 << 17 and auto.kv_cache.nbytes == (1 << 17) * 512


def test_real_tiny_llama_matches_transformers_greedy(real_tiny_dir) -> None:  # type: ignore[no-untyped-def]
    """Turbine's loader + engine against HF transformers' generate on the same checkpoint, with
    chunked prefill, a prefix hit, mixed batches and preemption all happening in the engine."""
    transformers = pytest.importorskip("transformers")
    from turbine.engine.builtin_core import BuiltinCore

    prompts = {"a": list(range(10, 40)), "b": [5, 900, 33], "c": [100 + i * 7 for i in range(50)],
               "a2": list(range(10, 40)) + [7, 7]}
    n_out = 12
    hf = transformers.AutoModelForCausalLM.from_pretrained(real_tiny_dir, dtype=torch.float32).eval()
    expected = {}
    with torch.inference_mode():
        for rid, p in prompts.items():
            ids = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=n_out, min_new_tokens=n_out, do_sample=False)
            expected[rid] = ids[0, len(p):].tolist()
    del hf
    core = BuiltinCore.load(real_tiny_dir, BuiltinConfig(device="cpu", block_size=4, num_gpu_blocks=24,
                                                         max_num_batched_tokens=24))
    assert core.eos_token_ids and core.context_length == 4096
    for rid in ("a", "b", "c"):
        core.add_request(greedy(rid, prompts[rid], n_out, ignore_eos=True))
    out = run_to_completion(core)
    core.add_request(greedy("a2", prompts["a2"], n_out, ignore_eos=True))  # shares a's prompt blocks
    first = core.step().outputs
    assert first[0].cached_tokens >= 8  # what of a survived c's evictions
    out.update({k: [o.token_id for o in first] + v for k, v in run_to_completion(core).items()})
    assert core.scheduler.num_preemptions > 0
    assert out == expected
