"""ModelConfig: the parts of an HF ``config.json`` the engine uses, validated once (no torch).

Every supported architecture is one Llama-shaped decoder; the architecture only decides a few
switches, so they are derived here and the model code never branches on a name:

    architecture          q/k/v bias         o bias            q/k RMSNorm   default head_dim
    LlamaForCausalLM      attention_bias     attention_bias    no            hidden / heads
    MistralForCausalLM    no                 no                no            hidden / heads
    Qwen2ForCausalLM      yes                no                no            hidden / heads
    Qwen3ForCausalLM      attention_bias     attention_bias    yes           128 (as HF)

Missing optional keys take the defaults of the matching ``transformers`` config class, so a
checkpoint means the same thing here as in HF. Both the legacy keys (``rope_theta`` +
``rope_scaling``, ``torch_dtype``) and the transformers-5 ones (``rope_parameters``, ``dtype``)
are read.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DTYPE_BYTES",
    "SUPPORTED_ARCHITECTURES",
    "ModelConfig",
    "RopeScaling",
    "checkpoint_shapes",
]

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_ARCH_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                       "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# transformers' class defaults for keys a config.json may omit.
_MAX_POSITION_DEFAULT = {"LlamaForCausalLM": 2048, "MistralForCausalLM": 131072,
                         "Qwen2ForCausalLM": 32768, "Qwen3ForCausalLM": 32768}

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_DTYPE_ALIASES = {"float": "float32", "fp32": "float32", "bf16": "bfloat16", "half": "float16", "fp16": "float16"}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling; ``default`` has none, ``linear`` divides every frequency by
    ``factor``, ``llama3`` (Llama 3.1+) divides only the low frequencies, blending in between."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    architecture: str  # one of SUPPORTED_ARCHITECTURES
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None  # None: plain RoPE
    tie_word_embeddings: bool  # lm_head shares embed_tokens' weight
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # per-head RMSNorm of q and k before RoPE (Qwen3)
    torch_dtype: str  # the checkpoint's dtype: float32 | bfloat16 | float16
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()  # config.json's, then generation_config.json's

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def kv_bytes_per_token(self, dtype: Any = None) -> int:
        """K and V bytes one token occupies over all layers; ``dtype`` is a name ("bfloat16"),
        anything with ``itemsize`` (a torch.dtype), or None for the checkpoint's dtype."""
        if dtype is None:
            itemsize = DTYPE_BYTES[self.torch_dtype]
        elif isinstance(dtype, str):
            itemsize = DTYPE_BYTES[dtype_name(dtype, "dtype")]
        elif isinstance(getattr(dtype, "itemsize", None), int):
            itemsize = dtype.itemsize
        else:
            raise ValueError(f"dtype must be a name or have an itemsize, got {dtype!r}")
        return 2 * self.num_hidden_layers * self.kv_size * itemsize

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike[str]) -> ModelConfig:
        """Read ``config.json`` (and ``generation_config.json``'s EOS ids, when present)."""
        path = Path(model_dir)
        config_path = path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{path} is not a model directory: no config.json")
        raw = _read_json(config_path)
        gen_path = path / "generation_config.json"
        gen = _read_json(gen_path) if gen_path.is_file() else {}
        try:
            return cls.from_dict(raw, generation_config=gen)
        except ValueError as e:
            raise ValueError(f"{config_path}: {e}") from None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, generation_config: Mapping[str, Any] | None = None) -> ModelConfig:
        if not isinstance(d, Mapping):
            raise ValueError(f"config must be a JSON object, got {type(d).__name__}")
        arch = _architecture(d)
        hidden = _int(d, "hidden_size")
        heads = _int(d, "num_attention_heads")
        kv_heads = _int(d, "num_key_value_heads", heads)
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
        if d.get("head_dim") is not None:
            head_dim = _int(d, "head_dim")
        elif arch == "Qwen3ForCausalLM":
            head_dim = 128
        else:
            if hidden % heads:
                raise ValueError(f"hidden_size ({hidden}) is not divisible by num_attention_heads ({heads}); "
                                 "set head_dim")
            head_dim = hidden // heads
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only 'silu')")
        max_pos = _int(d, "max_position_embeddings", _MAX_POSITION_DEFAULT[arch])
        _check_sliding_window(d, arch, max_pos)
        theta, scaling = _rope(d, max_pos)
        attention_bias = _bool(d, "attention_bias", False)
        gen = generation_config or {}
        return cls(
            architecture=arch,
            model_type=str(d.get("model_type", "")),
            hidden_size=hidden,
            intermediate_size=_int(d, "intermediate_size"),
            num_hidden_layers=_int(d, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=_int(d, "vocab_size"),
            max_position_embeddings=max_pos,
            rms_norm_eps=_float(d, "rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=_bool(d, "tie_word_embeddings", False),
            qkv_bias=arch == "Qwen2ForCausalLM" or (arch != "MistralForCausalLM" and attention_bias),
            o_bias=arch in ("LlamaForCausalLM", "Qwen3ForCausalLM") and attention_bias,
            mlp_bias=arch == "LlamaForCausalLM" and _bool(d, "mlp_bias", False),
            qk_norm=arch == "Qwen3ForCausalLM",
            torch_dtype=dtype_name(d.get("torch_dtype") or d.get("dtype") or "float32", "torch_dtype"),
            bos_token_id=_token_ids(d.get("bos_token_id"), "bos_token_id")[0] if d.get("bos_token_id") is not None
            else None,
            eos_token_ids=tuple(dict.fromkeys(_token_ids(d.get("eos_token_id"), "eos_token_id")
                                              + _token_ids(gen.get("eos_token_id"), "generation eos_token_id"))),
        )


def checkpoint_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name an HF checkpoint of ``cfg`` holds, with its shape (writer and tests).

    ``lm_head.weight`` is absent when the embeddings are tied, as in HF's own saves.
    """
    h, i = cfg.hidden_size, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        for name, rows in (("q", cfg.q_size), ("k", cfg.kv_size), ("v", cfg.kv_size)):
            shapes[f"{p}self_attn.{name}_proj.weight"] = (rows, h)
            if cfg.qkv_bias:
                shapes[f"{p}self_attn.{name}_proj.bias"] = (rows,)
        shapes[f"{p}self_attn.o_proj.weight"] = (h, cfg.q_size)
        if cfg.o_bias:
            shapes[f"{p}self_attn.o_proj.bias"] = (h,)
        if cfg.qk_norm:
            shapes[f"{p}self_attn.q_norm.weight"] = (cfg.head_dim,)
            shapes[f"{p}self_attn.k_norm.weight"] = (cfg.head_dim,)
        for name, shape in (("gate", (i, h)), ("up", (i, h)), ("down", (h, i))):
            shapes[f"{p}mlp.{name}_proj.weight"] = shape
            if cfg.mlp_bias:
                shapes[f"{p}mlp.{name}_proj.bias"] = (shape[0],)
        shapes[f"{p}input_layernorm.weight"] = (h,)
        shapes[f"{p}post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


# -- parsing helpers ------------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _architecture(d: Mapping[str, Any]) -> str:
    archs = d.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise ValueError(f"'architectures' must be a list of class names, got {archs!r}")
    if archs:
        names = archs
    elif d.get("model_type") in _ARCH_BY_MODEL_TYPE:
        names = [_ARCH_BY_MODEL_TYPE[d["model_type"]]]
    else:
        raise ValueError("config has no 'architectures' (and no known model_type); supported: "
                         + ", ".join(SUPPORTED_ARCHITECTURES))
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    raise ValueError(f"unsupported architecture {', '.join(names)}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


_MISSING: Any = object()


def _get(d: Mapping[str, Any], key: str, default: Any) -> Any:
    value = d.get(key)
    if value is None:
        if default is _MISSING:
            raise ValueError(f"missing required field {key!r}")
        return default
    return value


def _int(d: Mapping[str, Any], key: str, default: Any = _MISSING) -> int:
    value = _get(d, key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return value


def _float(d: Mapping[str, Any], key: str, default: Any = _MISSING) -> float:
    value = _get(d, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{key} must be a positive number, got {value!r}")
    return float(value)


def _bool(d: Mapping[str, Any], key: str, default: bool) -> bool:
    value = _get(d, key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def dtype_name(value: Any, key: str = "dtype") -> str:
    """A dtype's canonical name (float32, bfloat16, float16) from a name, an alias or a torch dtype."""
    name = str(value).removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_BYTES:
        raise ValueError(f"{key} {value!r} is not supported; use one of {', '.join(DTYPE_BYTES)}")
    return name


def _token_ids(value: Any, key: str) -> list[int]:
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{key} must be a token id or a list of them, got {value!r}")
    return ids


def _check_sliding_window(d: Mapping[str, Any], arch: str, max_pos: int) -> None:
    """A window no shorter than the context is full attention; a real one is refused."""
    if arch == "MistralForCausalLM":
        window = d.get("sliding_window", 4096)  # MistralConfig's default
    elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        window = d.get("sliding_window", 4096) if d.get("use_sliding_window", False) else None
    else:
        window = None
    if window is not None and window < max_pos:
        raise ValueError(
            f"sliding-window attention (sliding_window={window} < max_position_embeddings={max_pos}) is not "
            "supported; only full attention is implemented"
        )


def _rope(d: Mapping[str, Any], max_pos: int) -> tuple[float, RopeScaling | None]:
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"rope_scaling must be an object or null, got {params!r}")
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ValueError(f"rope_theta must be a positive number, got {theta!r}")
    if params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor other than 1.0 is not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        return float(theta), None
    if rope_type == "linear":
        return float(theta), RopeScaling(rope_type="linear", factor=_float(params, "factor"))
    scaling = RopeScaling(
        rope_type="llama3",
        factor=_float(params, "factor"),
        low_freq_factor=_float(params, "low_freq_factor"),
        high_freq_factor=_float(params, "high_freq_factor"),
        original_max_position_embeddings=_int(params, "original_max_position_embeddings",
                                              d.get("original_max_position_embeddings") or max_pos),
    )
    if scaling.high_freq_factor <= scaling.low_freq_factor:
        raise ValueError("rope_scaling: high_freq_factor must exceed low_freq_factor")
    return float(theta), scaling
