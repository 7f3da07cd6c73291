"""A transformer's shape, as the performance model needs it: parameter counts by kind, KV bytes
per token, and the mixture-of-experts layout.

Read from an HF ``config.json`` (the checkpoint a user brings: Llama, Qwen2/3, Mistral,
Mixtral, Qwen3-MoE, DeepSeek-V2/V3 keys) or taken from ``SHAPES`` by name. Only shapes matter
here, never weights.

Parameters per layer, dense (GQA attention; SwiGLU MLP with three matrices):

    attention  hidden*(heads*head_dim) [q] + 2*hidden*(kv_heads*head_dim) [k,v] + (heads*head_dim)*hidden [o]
    mlp        3 * hidden * intermediate

Multi-head latent attention (DeepSeek) stores one compressed vector per token and layer
(``kv_lora_rank + qk_rope_head_dim`` values) instead of K and V per head.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (dense layers of an MoE model too)
    vocab_size: int
    weight_bytes: float = 2.0  # bytes per parameter as served (bf16 2, fp8 1)
    kv_bytes: float = 2.0  # bytes per cached K/V value
    tie_word_embeddings: bool = False
    # Mixture of experts (num_experts 0: dense).
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    num_shared_experts: int = 0
    first_dense_layers: int = 0  # leading layers with a dense MLP (DeepSeek: 3)
    # Multi-head latent attention (kv_lora_rank 0: not MLA).
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0

    def __post_init__(self) -> None:
        for f in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
            if getattr(self, f) <= 0:
                raise ValueError(f"model {self.name!r}: {f} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model {self.name!r}: num_heads must be a multiple of num_kv_heads")
        if self.is_moe and not (0 < self.experts_per_token <= self.num_experts and self.moe_intermediate_size > 0):
            raise ValueError(f"model {self.name!r}: an MoE shape needs 0 < experts_per_token <= num_experts "
                             "and moe_intermediate_size")
        if not self.is_moe and self.intermediate_size <= 0:
            raise ValueError(f"model {self.name!r}: intermediate_size must be positive")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers if self.is_moe else 0

    @property
    def dense_layers(self) -> int:
        return self.num_layers - self.moe_layers

    # -- parameters ---------------------------------------------------------------------------
    @property
    def attention_params(self) -> int:
        """Per layer."""
        h = self.hidden_size
        if self.is_mla:
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = (h * self.q_lora_rank + self.q_lora_rank * self.num_heads * qk) if self.q_lora_rank else h * self.num_heads * qk
            kv = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank * self.num_heads * (
                self.qk_nope_head_dim + self.v_head_dim)
            return q + kv + self.num_heads * self.v_head_dim * h
        return h * self.num_heads * self.head_dim * 2 + 2 * h * self.num_kv_heads * self.head_dim

    @property
    def dense_mlp_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def expert_params(self) -> int:
        """One routed expert."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def shared_expert_params(self) -> int:
        return self.num_shared_experts * self.expert_params

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        per_layer = self.attention_params
        experts = self.moe_layers * (self.num_experts * self.expert_params + self.shared_expert_params
                                     + self.num_experts * self.hidden_size)  # + the router
        head = 0 if self.tie_word_embeddings else self.embedding_params
        return (self.num_layers * per_layer + self.dense_layers * self.dense_mlp_params + experts
                + self.embedding_params + head)

    @property
    def active_params(self) -> int:
        """Parameters one token multiplies through (embedding lookup excluded, LM head included)."""
        experts = self.moe_layers * ((self.experts_per_token + self.num_shared_experts) * self.expert_params)
        return (self.num_layers * self.attention_params + self.dense_layers * self.dense_mlp_params + experts
                + self.embedding_params)

    @property
    def weight_gb(self) -> float:
        return self.total_params * self.weight_bytes / 1e9

    # -- KV -----------------------------------------------------------------------------------
    @property
    def kv_values_per_token_layer(self) -> int:
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim

    @property
    def kv_bytes_per_token(self) -> float:
        """All layers, on one copy of the cache (before any split across ranks)."""
        return self.num_layers * self.kv_values_per_token_layer * self.kv_bytes

    def attention_flops_per_token_context(self) -> float:
        """FLOPs one query token spends per cached token it attends to (QK^T and PV, all layers)."""
        if self.is_mla:  # absorbed MLA: scores and values over the latent + rope dims
            return 2 * self.num_layers * self.num_heads * (2 * self.kv_lora_rank + self.qk_rope_head_dim)
        return 4 * self.num_layers * self.num_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | Path, name: str | None = None) -> ModelShape:
        """From an HF config.json (a dict, the file, or the model directory holding it)."""
        if not isinstance(config, dict):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"cannot read model config {path}: {e}") from None
            name = name or path.parent.name
        cfg = dict(config)
        cfg.update(cfg.get("text_config") or {})

        def need(key: str) -> int:
            if key not in cfg:
                raise ValueError(f"config.json lacks {key!r}")
            return int(cfg[key])

        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
        quant = cfg.get("quantization_config") or {}
        fp8 = "fp8" in str(quant.get("quant_method", "")).lower() or "float8" in dtype
        experts = int(cfg.get("n_routed_experts") or cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
        moe_inter = int(cfg.get("moe_intermediate_size") or (cfg.get("intermediate_size") if experts else 0) or 0)
        return cls(
            name=name or str(cfg.get("_name_or_path") or cfg.get("model_type") or "model"),
            num_layers=need("num_hidden_layers"), hidden_size=hidden, num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate_size=int(cfg.get("intermediate_size") or 0), vocab_size=need("vocab_size"),
            weight_bytes=1.0 if fp8 else (4.0 if dtype == "float32" else 2.0),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            num_experts=experts, experts_per_token=int(cfg.get("num_experts_per_tok") or 0) if experts else 0,
            moe_intermediate_size=moe_inter if experts else 0,
            num_shared_experts=int(cfg.get("n_shared_experts") or 0),
            first_dense_layers=int(cfg.get("first_k_dense_replace") or 0) if experts else 0,
            kv_lora_rank=int(cfg.get("kv_lora_rank") or 0), q_lora_rank=int(cfg.get("q_lora_rank") or 0),
            qk_rope_head_dim=int(cfg.get("qk_rope_head_dim") or 0),
            qk_nope_head_dim=int(cfg.get("qk_nope_head_dim") or 0), v_head_dim=int(cfg.get("v_head_dim") or 0),
        )


SHAPES = MappingProxyType({s.name: s for s in (
    # meta-llama/Llama-3.1-8B-Instruct and -70B-Instruct config.json
    ModelShape(name="llama3.1-8b", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
               intermediate_size=14336, vocab_size=128256),
    ModelShape(name="llama3.1-70b", num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8, head_dim=128,
               intermediate_size=28672, vocab_size=128256),
    # Qwen/Qwen3-30B-A3B and Qwen3-235B-A22B: 128 experts, 8 per token, no shared expert
    ModelShape(name="qwen3-30b-a3b", num_layers=48, hidden_size=2048, num_heads=32, num_kv_heads=4, head_dim=128,
               intermediate_size=6144, vocab_size=151936, num_experts=128, experts_per_token=8,
               moe_intermediate_size=768),
    ModelShape(name="qwen3-235b-a22b", num_layers=94, hidden_size=4096, num_heads=64, num_kv_heads=4, head_dim=128,
               intermediate_size=12288, vocab_size=151936, num_experts=128, experts_per_token=8,
               moe_intermediate_size=1536),
    # deepseek-ai/DeepSeek-V3: MLA, 256 routed experts (8 per token) + 1 shared, 3 dense layers, fp8 weights
    ModelShape(name="deepseek-v3", num_layers=61, hidden_size=7168, num_heads=128, num_kv_heads=128, head_dim=128,
               intermediate_size=18432, vocab_size=129280, weight_bytes=1.0, num_experts=256, experts_per_token=8,
               moe_intermediate_size=2048, num_shared_experts=1, first_dense_layers=3, kv_lora_rank=512,
               q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128),
)})
_ALIASES = {"llama3-8b": "llama3.1-8b", "llama-3.1-8b": "llama3.1-8b", "meta-llama/llama-3.1-8b": "llama3.1-8b",
            "llama8b": "llama3.1-8b", "llama3-70b": "llama3.1-70b", "qwen3-moe": "qwen3-30b-a3b"}


def get_shape(name: str) -> ModelShape:
    """A shape by name, or read from a config.json / model directory path."""
    key = name.strip().lower().removesuffix("-instruct")
    key = _ALIASES.get(key, key)
    if key in SHAPES:
        return SHAPES[key]
    if Path(name).exists():
        return ModelShape.from_hf_config(name)
    raise ValueError(f"unknown model {name!r}: name one of {', '.join(SHAPES)} or give a config.json / model directory")


__all__ = ["SHAPES", "ModelShape", "get_shape"]
