"""One decoder for Llama 2/3/3.1, Mistral, Qwen2/2.5 and Qwen3 (see config.py for the switches).

    input_ids [T] ─ embed_tokens ─▶ x [T, H]
    per layer:  x = x + o_proj(attn(rope(qkv_proj(input_layernorm(x)))))
                x = x + down_proj(silu(gate) * up  of  gate_up_proj(post_attention_layernorm(x)))
    norm(x) ─▶ hidden [T, H];   compute_logits: hidden @ lm_head.T (or embed_tokens.T when tied)

Fused projections: q/k/v live in one ``qkv_proj`` and gate/up in one ``gate_up_proj`` (one
matmul each instead of three and two). Checkpoints keep HF's separate tensors;
``checkpoint_layout()`` says which rows of which fused parameter each HF name fills, and the
loader copies name for name into those rows:

    qkv_proj.weight  rows [0, q)        ◀─ q_proj.weight      q  = heads    * head_dim
                     rows [q, q+kv)     ◀─ k_proj.weight      kv = kv_heads * head_dim
                     rows [q+kv, q+2kv) ◀─ v_proj.weight
    gate_up_proj     rows [0, I) ◀─ gate_proj,  rows [I, 2I) ◀─ up_proj

Attention itself is the backend's job: a layer hands rotated q/k/v for the step's packed tokens
to ``attn.forward(layer_idx, q, k, v)`` and never sees a cache.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from turbine.engine.attention_api import AttentionBackend
from turbine.engine.models.config import ModelConfig
from turbine.engine.models.layers import (
    Linear,
    RMSNorm,
    RopeInputs,
    RotaryEmbedding,
    SiluAndMul,
    apply_rotary_qk,
    linear,
)

__all__ = ["LlamaForCausalLM", "ParamSlice"]


class ParamSlice(NamedTuple):
    """Rows ``[offset, offset + rows)`` of ``param`` hold one checkpoint tensor."""

    param: nn.Parameter
    offset: int
    rows: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows, *self.param.shape[1:])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.split = (cfg.q_size, cfg.kv_size, cfg.kv_size)
        self.qkv_proj = Linear(cfg.hidden_size, sum(self.split), bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, rope: RopeInputs, attn: AttentionBackend) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary_qk(q, k, rope)
        out = attn.forward(self.layer_idx, q, k, v)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope: RopeInputs,
                attn: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        """HF's ``x = x + attn(norm(x)); x = x + mlp(norm(x))`` with each residual add folded into
        the next norm: returns (this layer's mlp output, the residual stream before it)."""
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rope, attn)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The ``CausalLM`` of attention_api for every supported architecture."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        # Tied: no lm_head module at all, so nothing can untie it (meta build, .to(), to_empty).
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size,
                                                                         bias=False)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling,
                                      config.max_position_embeddings)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        """input_ids, positions: [T] int64 (packed tokens of the step) -> hidden [T, hidden_size]."""
        x = self.model.embed_tokens(input_ids)
        rope = self.rotary.inputs(positions, x.dtype)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, rope, attn)
        if residual is None:  # no layers
            return self.model.norm(x)
        return self.model.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden_size] -> float32 logits [N, vocab]; the matmul runs in the model dtype, as HF."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear(hidden, weight).float()

    def checkpoint_layout(self) -> dict[str, ParamSlice]:
        """HF tensor name -> where it goes; together the slices cover every parameter exactly once."""
        cfg = self.config
        layout = {"model.embed_tokens.weight": _whole(self.model.embed_tokens.weight),
                  "model.norm.weight": _whole(self.model.norm.weight)}
        if self.lm_head is not None:
            layout["lm_head.weight"] = _whole(self.lm_head.weight)
        q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
        for n, layer in enumerate(self.model.layers):
            p = f"model.layers.{n}."
            a, m = layer.self_attn, layer.mlp
            for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
                fused = getattr(a.qkv_proj, kind)
                layout[f"{p}self_attn.q_proj.{kind}"] = ParamSlice(fused, 0, q)
                layout[f"{p}self_attn.k_proj.{kind}"] = ParamSlice(fused, q, kv)
                layout[f"{p}self_attn.v_proj.{kind}"] = ParamSlice(fused, q + kv, kv)
            for kind in ("weight", "bias") if cfg.mlp_bias else ("weight",):
                fused = getattr(m.gate_up_proj, kind)
                layout[f"{p}mlp.gate_proj.{kind}"] = ParamSlice(fused, 0, inter)
                layout[f"{p}mlp.up_proj.{kind}"] = ParamSlice(fused, inter, inter)
                layout[f"{p}mlp.down_proj.{kind}"] = _whole(getattr(m.down_proj, kind))
            layout[f"{p}self_attn.o_proj.weight"] = _whole(a.o_proj.weight)
            if cfg.o_bias:
                layout[f"{p}self_attn.o_proj.bias"] = _whole(a.o_proj.bias)
            if a.q_norm is not None:
                layout[f"{p}self_attn.q_norm.weight"] = _whole(a.q_norm.weight)
                layout[f"{p}self_attn.k_norm.weight"] = _whole(a.k_norm.weight)
            layout[f"{p}input_layernorm.weight"] = _whole(layer.input_layernorm.weight)
            layout[f"{p}post_attention_layernorm.weight"] = _whole(layer.post_attention_layernorm.weight)
        return layout


def _whole(param: nn.Parameter) -> ParamSlice:
    return ParamSlice(param, 0, param.shape[0])
