"""Model shapes the model maker can write, as data.

A preset is everything `make_model` needs to write a model directory: the architecture fields
of config.json and how large a tokenizer to build. Adding a model is adding an entry to
`PRESETS`, never a code branch.

The tokenizer vocabulary always equals `vocab_size` (a random-weight model can sample any id,
and every id must decode). Only `trained_vocab_size` BPE tokens are learned from the corpus (a
few seconds); the rest are filled deterministically (see tokenizer_trainer.py).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True, kw_only=True)
class ModelPreset:
    name: str
    architecture: str  # HF class name written to config.json "architectures"
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int  # == tokenizer vocab size, special tokens included
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    torch_dtype: str = "bfloat16"
    # Tokenizer: BPE tokens learned from local text (capped by what the corpus supports); the
    # remaining ids up to vocab_size are deterministic filler merges.
    trained_vocab_size: int = 4096
    corpus_bytes: int = 4_000_000
    # Architecture-specific config.json keys (attention_bias, sliding_window, ...).
    extra_config: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"preset {self.name!r}: num_attention_heads ({self.num_attention_heads}) must be "
                f"a multiple of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.vocab_size <= 256 + 5:
            raise ValueError(f"preset {self.name!r}: vocab_size must exceed 261 (bytes + specials)")


_PRESET_LIST = (
    # Small enough for CPU tests: ~0.8M parameters (3 MB in float32), mostly embeddings.
    # Grouped-query attention (4 query heads share 2 KV heads) so engines exercise the GQA path;
    # head_dim 32 because some attention backends (vLLM's CPU one) need at least that.
    ModelPreset(
        name="tiny",
        architecture="LlamaForCausalLM",
        model_type="llama",
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=4096,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        torch_dtype="float32",
        trained_vocab_size=4096,
        extra_config={"attention_bias": False, "hidden_act": "silu", "mlp_bias": False},
    ),
    # Shapes of Qwen/Qwen3-0.6B's config.json.
    ModelPreset(
        name="qwen3-0.6b",
        architecture="Qwen3ForCausalLM",
        model_type="qwen3",
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        trained_vocab_size=16384,
        corpus_bytes=8_000_000,
        extra_config={
            "attention_bias": False,
            "hidden_act": "silu",
            "max_window_layers": 28,
            "sliding_window": None,
            "use_sliding_window": False,
        },
    ),
    # Shapes of meta-llama/Meta-Llama-3-8B's config.json.
    ModelPreset(
        name="llama3-8b",
        architecture="LlamaForCausalLM",
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        trained_vocab_size=16384,
        corpus_bytes=8_000_000,
        extra_config={"attention_bias": False, "hidden_act": "silu", "mlp_bias": False},
    ),
)

PRESETS: Mapping[str, ModelPreset] = MappingProxyType({p.name: p for p in _PRESET_LIST})


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None
