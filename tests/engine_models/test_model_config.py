from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from turbine.engine.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeScaling, checkpoint_shapes
from turbine.model_maker import get_preset, model_config


def _llama(**over: Any) -> dict[str, Any]:
    base = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
        "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}


def test_tiny_preset_parses_with_its_declared_shapes() -> None:
    raw = model_config(get_preset("tiny"))
    cfg = ModelConfig.from_dict(raw)
    assert (cfg.architecture, cfg.hidden_size, cfg.head_dim) == ("LlamaForCausalLM", 128, 32)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (4, 2, 2)
    assert cfg.tie_word_embeddings and cfg.torch_dtype == "float32"
    assert cfg.eos_token_ids == (raw["eos_token_id"],) and cfg.bos_token_id == raw["bos_token_id"]
    assert not (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias or cfg.qk_norm)


def test_defaults_follow_transformers() -> None:
    cfg = ModelConfig.from_dict(_llama(num_key_value_heads=..., max_position_embeddings=..., rms_norm_eps=...))
    assert cfg.num_key_value_heads == 4  # defaults to num_attention_heads
    assert cfg.head_dim == 32  # hidden / heads
    assert cfg.max_position_embeddings == 2048 and cfg.rms_norm_eps == 1e-6
    assert cfg.rope_theta == 10000.0 and cfg.rope_scaling is None
    assert not cfg.tie_word_embeddings and cfg.eos_token_ids == () and cfg.bos_token_id is None
    qwen3 = ModelConfig.from_dict(_llama(architectures=["Qwen3ForCausalLM"], model_type="qwen3"))
    assert qwen3.head_dim == 128 and qwen3.qk_norm  # Qwen3Config's own default head_dim
    explicit = ModelConfig.from_dict(_llama(head_dim=48))
    assert explicit.head_dim == 48 and explicit.q_size == 192


def test_bias_switches_per_architecture() -> None:
    qwen2 = ModelConfig.from_dict(_llama(architectures=["Qwen2ForCausalLM"]))
    assert qwen2.qkv_bias and not qwen2.o_bias and not qwen2.qk_norm
    llama = ModelConfig.from_dict(_llama(attention_bias=True, mlp_bias=True))
    assert llama.qkv_bias and llama.o_bias and llama.mlp_bias
    mistral = ModelConfig.from_dict(_llama(architectures=["MistralForCausalLM"], sliding_window=None,
                                           attention_bias=True))
    assert not (mistral.qkv_bias or mistral.o_bias or mistral.mlp_bias)
    shapes = checkpoint_shapes(qwen2)
    assert shapes["model.layers.0.self_attn.k_proj.bias"] == (64,)
    assert "model.layers.0.self_attn.o_proj.bias" not in shapes
    assert shapes["lm_head.weight"] == (512, 128)
    assert "lm_head.weight" not in checkpoint_shapes(ModelConfig.from_dict(_llama(tie_word_embeddings=True)))


def test_architecture_from_model_type_and_unknown_architectures() -> None:
    cfg = ModelConfig.from_dict(_llama(architectures=..., model_type="qwen2"))
    assert cfg.architecture == "Qwen2ForCausalLM"
    with pytest.raises(ValueError) as e:
        ModelConfig.from_dict(_llama(architectures=["GPT2LMHeadModel"]))
    assert "GPT2LMHeadModel" in str(e.value)
    for name in SUPPORTED_ARCHITECTURES:
        assert name in str(e.value)


def test_rope_legacy_and_transformers5_layouts_agree() -> None:
    llama31 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    legacy = ModelConfig.from_dict(_llama(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **llama31}))
    old_key = ModelConfig.from_dict(_llama(rope_theta=500000.0, rope_scaling={"type": "llama3", **llama31}))
    v5 = ModelConfig.from_dict(_llama(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **llama31}))
    expected = RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=8192)
    for cfg in (legacy, old_key, v5):
        assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == expected
    plain = ModelConfig.from_dict(_llama(rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    assert plain.rope_theta == 1e6 and plain.rope_scaling is None
    linear = ModelConfig.from_dict(_llama(rope_scaling={"type": "linear", "factor": 2.0}))
    assert linear.rope_scaling == RopeScaling(rope_type="linear", factor=2.0)


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"hidden_size": ...}, "missing required field 'hidden_size'"),
        ({"vocab_size": "big"}, "vocab_size must be a positive integer"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"hidden_size": 130}, "not divisible by num_attention_heads"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"torch_dtype": "float8_e4m3fn"}, "torch_dtype 'float8_e4m3fn' is not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not supported"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "missing required field 'low_freq_factor'"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
        ({"eos_token_id": [1, "x"]}, "eos_token_id must be a token id"),
        ({"architectures": "LlamaForCausalLM"}, "'architectures' must be a list"),
    ],
)
def test_invalid_configs_fail_clearly(over: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(_llama(**over))


def test_sliding_window_is_full_attention_only_when_it_covers_the_context() -> None:
    mistral = {"architectures": ["MistralForCausalLM"], "max_position_embeddings": 4096}
    ModelConfig.from_dict(_llama(**mistral, sliding_window=None))
    ModelConfig.from_dict(_llama(**mistral, sliding_window=4096))
    with pytest.raises(ValueError, match="sliding-window attention .*sliding_window=1024"):
        ModelConfig.from_dict(_llama(**mistral, sliding_window=1024))
    with pytest.raises(ValueError, match="sliding-window"):  # MistralConfig defaults to a 4096 window
        ModelConfig.from_dict(_llama(architectures=["MistralForCausalLM"], max_position_embeddings=32768))
    qwen = {"architectures": ["Qwen2ForCausalLM"], "sliding_window": 512}
    ModelConfig.from_dict(_llama(**qwen, use_sliding_window=False))
    with pytest.raises(ValueError, match="sliding-window"):
        ModelConfig.from_dict(_llama(**qwen, use_sliding_window=True))


def test_from_dir_merges_generation_eos_and_reads_dtype_key(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(_llama(torch_dtype=..., dtype="float16", eos_token_id=7)))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [9, 7]}))
    cfg = ModelConfig.from_dir(tmp_path)
    assert cfg.eos_token_ids == (7, 9) and cfg.torch_dtype == "float16"
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelConfig.from_dir(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(_llama(intermediate_size=...)))
    with pytest.raises(ValueError, match=r"config\.json: missing required field 'intermediate_size'"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        ModelConfig.from_dir(tmp_path)


def test_kv_bytes_per_token() -> None:
    cfg = ModelConfig.from_dict(_llama())  # 2 layers x 2 kv heads x 32 dims, K and V
    assert cfg.kv_bytes_per_token() == 2 * 2 * 2 * 32 * 2  # the checkpoint's bfloat16
    assert cfg.kv_bytes_per_token("float32") == 2 * 2 * 2 * 32 * 4
    llama8b = ModelConfig.from_dict(model_config(get_preset("llama3-8b")))
    assert llama8b.kv_bytes_per_token("bfloat16") == 128 * 1024  # the well-known 128 KiB/token
    with pytest.raises(ValueError, match="not supported"):
        cfg.kv_bytes_per_token("int3")


def test_config_and_registry_import_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from turbine.engine.models import ModelConfig, model_class\n"
        "from turbine.model_maker import get_preset, model_config\n"
        "cfg = ModelConfig.from_dict(model_config(get_preset('tiny')))\n"
        "print(cfg.kv_bytes_per_token('bfloat16'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(2 * 2 * 2 * 32 * 2)
