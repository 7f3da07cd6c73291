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

Tensor parallelism (``tp``, see parallel.py): each rank builds the same decoder over its share
(its heads, KV heads, MLP rows and vocabulary rows); o_proj and down_proj all-reduce, the
embedding all-reduces and the logits are all-gathered. ``checkpoint_layout()`` then names the
slice of each HF tensor the rank reads (rows or columns), so a rank never reads the others'.
"""
from __future__ import annotations

from typing import Any, NamedTuple

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
from turbine.engine.models.parallel import (
    Collectives,
    RowParallelLinear,
    TPShape,
    VocabParallelEmbedding,
    gather_logits,
)

__all__ = ["LlamaForCausalLM", "ParamSlice"]


class ParamSlice(NamedTuple):
    """Rows ``[offset, offset + rows)`` of ``param`` hold one checkpoint tensor, or this rank's
    slice of it: indices ``[start, start + n)`` along the tensor's dimension ``dim`` (n: ``rows``
    along dim 0, the parameter's columns along dim 1). ``full`` is the checkpoint tensor's shape
    when the rank holds a slice (None: the whole tensor)."""

    param: nn.Parameter
    offset: int
    rows: int
    dim: int = 0
    start: int = 0
    full: tuple[int, ...] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The checkpoint tensor's shape."""
        return self.full if self.full is not None else (self.rows, *self.param.shape[1:])

    def read(self, f: Any, name: str) -> torch.Tensor:
        """This slice's part of tensor ``name`` from an open safetensors file (``get_slice``
        reads only those bytes)."""
        if self.full is None:
            return f.get_tensor(name)
        part = f.get_slice(name)
        if self.dim == 0:
            return part[self.start:self.start + self.rows]
        return part[:, self.start:self.start + self.param.shape[1]]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, shard: TPShape, tp: Collectives | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = shard.num_heads, shard.num_kv_heads, cfg.head_dim
        q, kv = shard.num_heads * cfg.head_dim, shard.num_kv_heads * cfg.head_dim
        self.split = (q, kv, kv)
        self.qkv_proj = Linear(cfg.hidden_size, sum(self.split), bias=cfg.qkv_bias)  # column-parallel
        self.o_proj = RowParallelLinear(q, cfg.hidden_size, bias=cfg.o_bias, tp=tp)
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
    def __init__(self, cfg: ModelConfig, shard: TPShape, tp: Collectives | None = None) -> None:
        super().__init__()
        inter = shard.intermediate
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * inter, bias=cfg.mlp_bias)  # column-parallel
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, bias=cfg.mlp_bias, tp=tp)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, shard: TPShape, tp: Collectives | None = None) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx, shard, tp)
        self.mlp = MLP(cfg, shard, tp)
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
    def __init__(self, cfg: ModelConfig, shard: TPShape, tp: Collectives | None = None) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp=tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, shard, tp) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """The ``CausalLM`` of attention_api for every supported architecture."""

    def __init__(self, config: ModelConfig, tp: Collectives | None = None) -> None:
        """``tp``: this rank's tensor-parallel group (None: the whole model on one device)."""
        super().__init__()
        self.config = config
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.shard = TPShape.of(config, 0, 1) if self.tp is None else TPShape.of(config, tp.rank, tp.size)
        self.model = DecoderModel(config, self.shard, self.tp)
        # Tied: no lm_head module at all, so nothing can untie it (meta build, .to(), to_empty).
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, self.shard.vocab_per_rank,
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
        """hidden [N, hidden_size] -> logits [N, vocab] in the model dtype, as HF's lm_head computes them.
        Not cast to float32 here: greedy sampling takes the argmax of these (bf16 -> fp32 is exact,
        so the index is the same) and skips a [N, vocab] float32 copy, ~0.1 ms a batch-256 step."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return gather_logits(linear(hidden, weight), self.tp, self.config.vocab_size)

    def checkpoint_layout(self) -> dict[str, ParamSlice]:
        """HF tensor name -> where it goes (and, under tensor parallelism, which slice of it this
        rank reads); at TP=1 the slices cover every parameter exactly once, under TP every
        parameter but the vocabulary padding of the last shard."""
        cfg, sh = self.config, self.shard
        d = cfg.head_dim
        tp = self.tp is not None
        vocab = (cfg.vocab_size, cfg.hidden_size)

        def part(param: nn.Parameter, offset: int, rows: int, start: int, full: tuple[int, ...]) -> ParamSlice:
            return ParamSlice(param, offset, rows, 0, start, full) if tp else ParamSlice(param, offset, rows)

        def cols(param: nn.Parameter, start: int, full: tuple[int, ...]) -> ParamSlice:
            return ParamSlice(param, 0, param.shape[0], 1, start, full) if tp else _whole(param)

        layout = {"model.embed_tokens.weight": part(self.model.embed_tokens.weight, 0, sh.vocab_rows,
                                                    sh.vocab_start, vocab),
                  "model.norm.weight": _whole(self.model.norm.weight)}
        if self.lm_head is not None:
            layout["lm_head.weight"] = part(self.lm_head.weight, 0, sh.vocab_rows, sh.vocab_start, vocab)
        q, kv, inter = sh.num_heads * d, sh.num_kv_heads * d, sh.intermediate
        q0, kv0, i0 = sh.head_start * d, sh.kv_head_start * d, sh.rank * inter
        h = cfg.hidden_size
        for n, layer in enumerate(self.model.layers):
            p = f"model.layers.{n}."
            a, m = layer.self_attn, layer.mlp
            for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
                fused = getattr(a.qkv_proj, kind)
                tail = (h,) if kind == "weight" else ()
                layout[f"{p}self_attn.q_proj.{kind}"] = part(fused, 0, q, q0, (cfg.q_size, *tail))
                layout[f"{p}self_attn.k_proj.{kind}"] = part(fused, q, kv, kv0, (cfg.kv_size, *tail))
                layout[f"{p}self_attn.v_proj.{kind}"] = part(fused, q + kv, kv, kv0, (cfg.kv_size, *tail))
            for kind in ("weight", "bias") if cfg.mlp_bias else ("weight",):
                fused = getattr(m.gate_up_proj, kind)
                tail = (h,) if kind == "weight" else ()
                layout[f"{p}mlp.gate_proj.{kind}"] = part(fused, 0, inter, i0, (cfg.intermediate_size, *tail))
                layout[f"{p}mlp.up_proj.{kind}"] = part(fused, inter, inter, i0, (cfg.intermediate_size, *tail))
            layout[f"{p}mlp.down_proj.weight"] = cols(m.down_proj.weight, i0, (h, cfg.intermediate_size))
            if cfg.mlp_bias:
                layout[f"{p}mlp.down_proj.bias"] = _whole(m.down_proj.bias)
            layout[f"{p}self_attn.o_proj.weight"] = cols(a.o_proj.weight, q0, (h, cfg.q_size))
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
