"""Turbine's models against transformers (the reference) on the same random-weight checkpoints."""
from __future__ import annotations

import json
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from turbine.engine.loader import load_model
from turbine.engine.models.dense_attention import DenseAttention, greedy_generate
from turbine.model_maker.weights import write_random_weights

TOL = 1e-4
BASE = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "hidden_act": "silu", "torch_dtype": "float32"}
CONFIGS: dict[str, dict[str, Any]] = {
    # Llama 3.1-style rope scaling; a short original context puts all three frequency bands in play.
    "llama31-tied": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": True,
                     "rope_theta": 500000.0,
                     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "llama-untied-bias": {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                          "tie_word_embeddings": False, "attention_bias": True, "mlp_bias": True,
                          "rope_scaling": {"type": "linear", "factor": 4.0}},
    "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "num_key_value_heads": 1,
                "tie_word_embeddings": False, "sliding_window": None},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "tie_word_embeddings": True,
              "rope_theta": 1000000.0, "use_sliding_window": False},
    # head_dim 48: q_size (192) differs from hidden_size, as in real Qwen3 checkpoints.
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 48,
              "tie_word_embeddings": False, "rope_theta": 1000000.0, "use_sliding_window": False},
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, str]:
    name = request.param
    path = tmp_path_factory.mktemp(name)
    config = {**BASE, **CONFIGS[name]}
    (path / "config.json").write_text(json.dumps(config))
    write_random_weights(path, config, seed=sorted(CONFIGS).index(name), device="cpu")
    ours, _ = load_model(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours, ref, name


def _prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, BASE["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("start", [0, 3000])
def test_prefill_logits_match_transformers(pair: tuple[Any, Any, str], start: int) -> None:
    ours, ref, _ = pair
    ids = _prompt(40)
    positions = torch.arange(start, start + len(ids))
    got = ours.compute_logits(ours.forward(ids, positions, DenseAttention()))
    want = ref(input_ids=ids[None], position_ids=positions[None]).logits[0].float()
    assert got.dtype == torch.float32 and got.shape == want.shape == (40, BASE["vocab_size"])
    assert want.std() > 0.1  # logits far from flat: a wrong layer shows up well above TOL
    assert (got - want).abs().max().item() < TOL


def test_rope_frequencies_match_transformers(pair: tuple[Any, Any, str]) -> None:
    ours, ref, _ = pair
    torch.testing.assert_close(ours.rotary.inv_freq, ref.model.rotary_emb.inv_freq.float(), rtol=1e-6, atol=0)


@torch.no_grad()
def test_greedy_generation_matches_transformers_generate(pair: tuple[Any, Any, str]) -> None:
    ours, ref, _ = pair
    ids = _prompt(12, seed=2)
    got = greedy_generate(ours, ids.tolist(), 16)
    want = ref.generate(ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=16,
                        min_new_tokens=16, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    assert got == want
    # Feeding the prompt in chunks over the cached prefix computes the same thing.
    assert greedy_generate(ours, ids.tolist(), 16, prefill_chunk=5) == got


@torch.no_grad()
def test_decode_step_logits_match_full_recompute(pair: tuple[Any, Any, str]) -> None:
    ours, _, _ = pair
    ids = _prompt(20, seed=2)
    full = ours.compute_logits(ours.forward(ids, torch.arange(20), DenseAttention()))
    attn = DenseAttention()
    ours.forward(ids[:12], torch.arange(12), attn)
    steps = [ours.compute_logits(ours.forward(ids[i:i + 1], torch.tensor([i]), attn)) for i in range(12, 20)]
    assert attn.num_tokens == 20
    assert (torch.cat(steps) - full[12:]).abs().max().item() < 1e-5
