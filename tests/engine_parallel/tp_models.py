"""Tiny HF-format checkpoints of the three decoder shapes the tensor-parallel tests run: Llama
(tied, odd vocabulary), Qwen2 (q/k/v bias, one KV head for two ranks), Qwen3 (q/k norms,
explicit head_dim)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BASE: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "hidden_act": "silu",
                        "torch_dtype": "float32", "eos_token_id": 2}
# vocab 301 is odd: the second of two vocabulary shards is zero-padded.
SHAPES: dict[str, dict[str, Any]] = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_key_value_heads": 2,
              "vocab_size": 301, "tie_word_embeddings": True},
    # one KV head for two ranks: replicated
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_key_value_heads": 1,
              "vocab_size": 300, "tie_word_embeddings": False, "use_sliding_window": False},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "num_key_value_heads": 2,
              "head_dim": 24, "vocab_size": 301, "tie_word_embeddings": False, "use_sliding_window": False},
}


def write_model(path: Path, name: str, seed: int = 0) -> Path:
    from turbine.model_maker.weights import write_random_weights

    path.mkdir(parents=True, exist_ok=True)
    config = {**BASE, **SHAPES[name]}
    (path / "config.json").write_text(json.dumps(config))
    write_random_weights(path, config, seed=seed, device="cpu")
    return path
