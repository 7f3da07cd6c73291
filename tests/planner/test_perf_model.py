"""The performance model: anchored to a measured profile at TP=1, analytical terms by hand."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from turbine.mocker.timing import ProfileTiming
from turbine.planner.gpus import GpuSpec, get_gpu
from turbine.planner.model_shape import SHAPES, ModelShape, get_shape
from turbine.planner.perf_model import Parallel, PerfModel, Step

PROFILES = Path(__file__).resolve().parents[2] / "bench" / "profiles"


@pytest.fixture(scope="module")
def h200() -> dict:
    return json.loads((PROFILES / "h200_llama3-8b_bf16.json").read_text())


def test_tp1_is_the_measured_profile_point_for_point(h200: dict) -> None:
    m = PerfModel(get_shape("llama3.1-8b"), "h200", profile=h200)
    timing = ProfileTiming(h200)
    pre, dec = h200["prefill"], h200["decode"]
    for i, n in enumerate(pre["new_tokens"]):
        for j, c in enumerate(pre["cached_tokens"]):
            assert m.step_ms(Step(prefill_tokens=n, prefill_context=c, prefill_seqs=1)) == pytest.approx(
                timing.prefill_ms(n, c))
            assert timing.prefill_ms(n, c) == pytest.approx(pre["ms"][i][j])
    for b in dec["batch_size"]:
        for L in dec["context_length"]:
            assert m.step_ms(Step(decode_seqs=b, decode_context=L)) == pytest.approx(timing.decode_ms(b, L))
    # The profile it writes for TP1 replays as the measured one, mixed grid included.
    again = ProfileTiming(m.profile_for(Parallel()))
    for n in (16, 300, 2048, 9000):
        for b in (0, 1, 20, 128):
            assert again.mixed_ms(n, 0.0, b, 1024.0) == pytest.approx(timing.mixed_ms(n, 0.0, b, 1024.0), rel=1e-4)


def test_calibration_fits_overheads_and_matmul_efficiency(h200: dict) -> None:
    m = PerfModel(get_shape("llama3.1-8b"), "h200", profile=h200)
    assert 0.2 < m.overhead_ms < 1.5  # a graphed decode step's fixed cost
    assert m.prefill_overhead_ms > m.overhead_ms  # eager steps cost more
    assert 0.4 < m.gpu.mma_efficiency < 0.9
    # A model without a profile on the same GPU borrows them.
    moe = PerfModel(get_shape("qwen3-30b-a3b"), "h200", calibration=h200)
    assert moe.overhead_ms == pytest.approx(m.overhead_ms) and moe.gpu.mma_efficiency == pytest.approx(m.gpu.mma_efficiency)


# A GPU and a model with round numbers, to check the rooflines by hand.
TOY_GPU = GpuSpec("toy", memory_gb=100, hbm_gbps=1000, bf16_tflops=100, fp8_tflops=200, nvlink_gbps=100,
                  hbm_efficiency=1.0, mma_efficiency=1.0, nvlink_efficiency=1.0, collective_base_s=1e-5,
                  collective_per_rank_s=0.0)
TOY = ModelShape(name="toy", num_layers=10, hidden_size=1000, num_heads=10, num_kv_heads=10, head_dim=100,
                 intermediate_size=2000, vocab_size=10000, tie_word_embeddings=True)


def test_decode_rooflines_by_hand() -> None:
    m = PerfModel(TOY, TOY_GPU)
    # attention 4 * 1000 * 1000 = 4e6 per layer, MLP 3 * 1000 * 2000 = 6e6: 1e8 params * 2 bytes.
    assert TOY.attention_params == 4_000_000 and TOY.dense_mlp_params == 6_000_000
    bd = m.breakdown(Step(decode_seqs=1, decode_context=999), Parallel())
    assert bd.linear == pytest.approx(1e8 * 2 / 1e12)  # memory-bound: 0.2 ms
    assert bd.lm_head == pytest.approx(1e7 * 2 / 1e12)
    # KV: 10 layers * 2 * 10 heads * 100 dims * 2 bytes = 40 kB per token, 1000 tokens read.
    assert TOY.kv_bytes_per_token == 40_000
    assert bd.attention == pytest.approx(1000 * 40_000 / 1e12)
    assert bd.comm == 0
    # TP2 halves every read and adds two all-reduces per layer: 10 us latency + the ring.
    bd2 = m.breakdown(Step(decode_seqs=1, decode_context=999), Parallel(tp=2))
    assert bd2.linear == pytest.approx(bd.linear / 2) and bd2.attention == pytest.approx(bd.attention / 2)
    ring = 2 * (1 / 2) * (1000 * 2) / 100e9
    assert bd2.comm == pytest.approx(2 * 10 * (1e-5 + ring))


def test_prefill_is_compute_bound_by_hand() -> None:
    m = PerfModel(TOY, TOY_GPU)
    n = 10_000
    bd = m.breakdown(Step(prefill_tokens=n, prefill_seqs=1), Parallel())
    assert bd.linear == pytest.approx(2 * n * 1e8 / 100e12)  # 20 ms of matmuls; the weights read in 0.2
    attn_flops = n * (n / 2) * 4 * 10 * 10 * 100
    assert bd.attention == pytest.approx(attn_flops / 100e12)


def test_parallel_layouts_behave_as_hardware_does(h200: dict) -> None:
    m = PerfModel(get_shape("llama3.1-8b"), "h200", profile=h200)
    dec = Step(decode_seqs=1, decode_context=1024)
    t1, t2, t8 = (m.step_ms(dec, Parallel(tp=k)) for k in (1, 2, 8))
    assert t8 < t2 < t1 and t2 > t1 / 2  # faster, never linearly (overhead, all-reduces)
    big = Step(prefill_tokens=8192, prefill_seqs=1)
    assert m.step_ms(big, Parallel(tp=2)) == pytest.approx(m.step_ms(big) / 2, rel=0.15)  # compute splits
    # Pipeline stages never shorten one prefill; they do add KV room.
    assert m.step_ms(big, Parallel(tp=2, pp=2)) >= m.step_ms(big, Parallel(tp=2))
    assert m.kv_capacity_tokens(Parallel(tp=2, pp=2)) > m.kv_capacity_tokens(Parallel(tp=2))


def test_moe_memory_and_expert_parallelism(h200: dict) -> None:
    ds = PerfModel(get_shape("deepseek-v3"), "h200", calibration=h200)
    assert get_shape("deepseek-v3").total_params == pytest.approx(671e9, rel=0.01)
    assert not ds.fits(Parallel(tp=4))  # 671 GB of fp8 weights on four 141 GB GPUs
    assert ds.fits(Parallel(tp=8)) and ds.fits(Parallel(tp=1, ep=8))
    step = Step(decode_seqs=256, decode_context=2048)
    # A step of 256 tokens touches nearly all 256 experts: spreading them over 8 ranks reads 1/8 each.
    e1 = ds.breakdown(step, Parallel(tp=8)).experts
    e8 = ds.breakdown(step, Parallel(tp=1, ep=8)).experts
    assert e8 == pytest.approx(e1, rel=0.05)  # TP8 slices every expert, EP8 places whole ones: same bytes per rank
    assert ds.comm_s(step, Parallel(tp=1, ep=8)) > 0


def test_parallel_parse_and_validation() -> None:
    assert Parallel.parse("TP4PP2") == Parallel(tp=4, pp=2)
    assert Parallel.parse("tp2ep8").dp == 4 and Parallel.parse("tp2ep8").gpus == 8
    for bad in ("tp3", "4", "tp2x", "ep8tp3"):
        with pytest.raises(ValueError):
            Parallel.parse(bad)
    with pytest.raises(ValueError):
        Parallel(tp=4, ep=2)


def test_shapes_from_hf_config(tmp_path: Path) -> None:
    llama = {"num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
             "intermediate_size": 14336, "vocab_size": 128256, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(llama))
    s = ModelShape.from_hf_config(tmp_path)
    assert s.total_params == SHAPES["llama3.1-8b"].total_params and s.head_dim == 128
    assert get_shape(str(tmp_path)).total_params == s.total_params
    ds = {"num_hidden_layers": 61, "hidden_size": 7168, "num_attention_heads": 128, "num_key_value_heads": 128,
          "intermediate_size": 18432, "moe_intermediate_size": 2048, "n_routed_experts": 256, "num_experts_per_tok": 8,
          "n_shared_experts": 1, "first_k_dense_replace": 3, "kv_lora_rank": 512, "q_lora_rank": 1536,
          "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128, "vocab_size": 129280,
          "quantization_config": {"quant_method": "fp8"}}
    parsed = ModelShape.from_hf_config(ds, name="ds")
    assert parsed.total_params == SHAPES["deepseek-v3"].total_params and parsed.weight_bytes == 1.0
    with pytest.raises(ValueError, match="lacks"):
        ModelShape.from_hf_config({"hidden_size": 8})
    with pytest.raises(ValueError, match="unknown model"):
        get_shape("no-such-model")


def test_gpus() -> None:
    assert get_gpu("NVIDIA H200").name == "h200" and get_gpu("h100").memory_gb == 80
    with pytest.raises(ValueError):
        get_gpu("a100")
    with pytest.raises(ValueError):
        replace(TOY_GPU, hbm_efficiency=1.5)


def test_a_tensor_parallel_profile_anchors_the_model_at_its_layout(h200: dict) -> None:
    """A profile measured at TP=2 (meta "parallel", as `turbine profile --tensor-parallel-size 2`
    writes it) is the model at TP=2, point for point; other layouts scale from there."""
    from turbine.planner.perf_model import profile_parallel

    shape = get_shape("llama3.1-8b")
    tp1 = PerfModel(shape, "h200", profile=h200)
    tp2_profile = tp1.profile_for(Parallel(tp=2))  # stands in for a TP=2 measurement
    assert profile_parallel(tp2_profile) == Parallel(tp=2)
    assert profile_parallel({"meta": {"tensor_parallel_size": 4}}) == Parallel(tp=4)
    assert profile_parallel({"meta": {}}) == Parallel()
    m = PerfModel(shape, "h200", profile=tp2_profile)
    assert m.base == Parallel(tp=2)
    timing = ProfileTiming(tp2_profile)
    dec = tp2_profile["decode"]
    for b in dec["batch_size"]:
        for L in dec["context_length"]:
            step = Step(decode_seqs=b, decode_context=L)
            assert m.step_ms(step, Parallel(tp=2)) == pytest.approx(timing.decode_ms(b, L))
            # back to TP=1 through the TP=2 anchor: near the TP=1 measurement it was derived from
            assert m.step_ms(step, Parallel()) == pytest.approx(tp1.step_ms(step), rel=0.05)
    for n in tp2_profile["prefill"]["new_tokens"]:
        step = Step(prefill_tokens=n, prefill_seqs=1)
        assert m.step_ms(step, Parallel(tp=2)) == pytest.approx(timing.prefill_ms(n, 0.0))
        assert m.step_ms(step, Parallel()) == pytest.approx(tp1.step_ms(step), rel=0.05)
