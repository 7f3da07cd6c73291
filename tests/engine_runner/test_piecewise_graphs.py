"""Piecewise CUDA graphs (CUDA only): captured segments between the attentions must compute
what the eager forward computes, for every bucket, with stale pad rows, and the engine must
serve steps with prompt tokens through them."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from runner_toys import greedy, run_to_completion

from turbine.engine.piecewise_graphs import PiecewiseGraphs, default_token_buckets

pytestmark = pytest.mark.timeout(120)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def test_default_token_buckets() -> None:
    assert default_token_buckets(2048) == [16, 32, 64, 128, 256, *range(384, 2049, 128)]
    assert default_token_buckets(1000) == [16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1000]
    assert default_token_buckets(100) == [16, 32, 64, 100]
    assert default_token_buckets(0) == []


@needs_cuda
def test_captured_segments_match_the_eager_forward(real_tiny_dir) -> None:  # type: ignore[no-untyped-def]
    from turbine.engine.loader import load_model
    from turbine.engine.paged_attention import CausalAttention

    model, cfg = load_model(real_tiny_dir, dtype=torch.float32, device="cuda")
    pw = PiecewiseGraphs(model, buckets=[16, 64], num_heads=cfg.num_attention_heads,
                         num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, dtype=torch.float32,
                         device=torch.device("cuda"))
    pw.capture()
    assert len(pw.segments[64]) == cfg.num_hidden_layers + 1
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for lens in ([60], [5], [3, 9, 1], [20, 30], [16]):  # 5 after 60: bucket 16 keeps stale rows
            n = sum(lens)
            ids = torch.randint(0, cfg.vocab_size, (n,), generator=gen).cuda()
            pos = torch.cat([torch.arange(m) for m in lens]).cuda()
            ref = model.forward(ids, pos, CausalAttention(lens))
            got = pw.forward(ids, pos, CausalAttention(lens))
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no piecewise graph"):
        pw.forward(torch.zeros(65, dtype=torch.int64, device="cuda"), torch.zeros(65, dtype=torch.int64,
                   device="cuda"), CausalAttention([65]))


@needs_cuda
def test_engine_serves_prompt_steps_through_piecewise_graphs(real_tiny_dir) -> None:  # type: ignore[no-untyped-def]
    from turbine.engine.builtin_core import BuiltinConfig, BuiltinCore

    prompts = {f"r{i}": [(7 * i + 3 * j) % 200 + 5 for j in range(4 + 11 * i)] for i in range(6)}

    def serve(piecewise_tokens: int) -> tuple[dict[str, list[int]], BuiltinCore]:
        core = BuiltinCore.load(real_tiny_dir, BuiltinConfig(dtype="float32", num_gpu_blocks=256, block_size=16,
                                                             max_num_batched_tokens=64,
                                                             piecewise_graph_tokens=piecewise_tokens))
        for rid, p in prompts.items():
            core.add_request(greedy(rid, p, 8))
        return run_to_completion(core), core

    eager, _ = serve(0)
    graphed, core = serve(64)
    assert core.runner.piecewise is not None and core.runner.piecewise.buckets == [16, 32, 64]
    assert graphed == eager
    assert core.stats().kv_active_blocks == 0
    assert core.step().device_s is None  # untimed unless asked
    core.enable_device_timing()
    core.add_request(greedy("timed", prompts["r3"], 2))
    res = core.step()
    assert res.num_prefill_tokens and res.device_s is not None and 0 < res.device_s < res.duration_s + 1
    run_to_completion(core)
