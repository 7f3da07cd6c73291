"""Tensor parallelism inside the model: which rows and columns of each weight a rank holds, and
the collectives that join the shards (Megatron's layout).

    rank r of P holds                                       after its matmul
    qkv_proj   column-parallel: q rows of heads             attention over its own heads, its
               [r*H/P, (r+1)*H/P), k/v rows of its KV heads  own slice of the paged KV cache
    o_proj     row-parallel: the columns of those heads     partial sums ──▶ all-reduce
    gate_up    column-parallel: rows [r*I/P, (r+1)*I/P)      SiLU(gate) * up of its slice
               of gate and of up
    down_proj  row-parallel: columns [r*I/P, (r+1)*I/P)      partial sums ──▶ all-reduce
    embedding  vocab-parallel: rows [r*Vp, (r+1)*Vp),        zeros for other ids ──▶ all-reduce
               Vp = ceil(V/P), the last shard zero-padded
    lm_head    the same vocabulary rows (tied: the           logits [N, Vp] ──▶ all-gather
               embedding's own shard)                        ──▶ [N, P*Vp][:, :V]
    norms, q/k norms, o_proj and down_proj biases: whole on every rank (a row-parallel bias
    is added by rank 0 only, inside its matmul, so the all-reduce counts it once)

KV heads: with K >= P KV heads, rank r holds KV heads [r*K/P, (r+1)*K/P); with K < P (P a
multiple of K) each rank holds one KV head, kv head ``r*K // P``, replicated on P/K ranks. Either
way rank r's query heads use exactly the KV heads it holds (query head h reads KV head
h // (H/K)), so attention needs no communication.

At ``size == 1`` (or ``tp=None``) every layer is the plain one: no collective, no padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from turbine.engine.models.layers import Linear, linear

if TYPE_CHECKING:
    from turbine.engine.models.config import ModelConfig

__all__ = ["Collectives", "RowParallelLinear", "Shard", "TPShape", "VocabParallelEmbedding", "gather_logits"]


class Collectives(Protocol):
    """What the model needs of a tensor-parallel group (``turbine.engine.parallel.TPGroup``)."""

    rank: int
    size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; returns ``x``."""
        ...

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, n]`` on each rank -> ``[N, size * n]``, rank r's columns at ``[r*n, (r+1)*n)``."""
        ...


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``size`` without a process group: enough to build and load a shard
    (the loader, tests); a forward that needs a collective raises."""

    rank: int
    size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this shard has no process group: it can be loaded, not run")

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this shard has no process group: it can be loaded, not run")


@dataclass(frozen=True)
class TPShape:
    """One rank's share of a model's heads, MLP and vocabulary (validated for the model)."""

    rank: int
    size: int
    num_heads: int  # query heads on this rank
    num_kv_heads: int  # KV heads on this rank (1 when replicated)
    kv_head_start: int  # the first KV head this rank holds
    intermediate: int  # MLP rows on this rank
    vocab_per_rank: int  # Vp: embedding / lm_head rows on every rank (the last one zero-padded)
    vocab_size: int

    @classmethod
    def of(cls, cfg: ModelConfig, rank: int = 0, size: int = 1) -> TPShape:
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"rank {rank} of {size} is not a tensor-parallel rank")
        h, k, i = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
        if h % size:
            raise ValueError(f"tensor_parallel_size {size} must divide num_attention_heads ({h})")
        if k % size and size % k:
            raise ValueError(f"tensor_parallel_size {size} must divide num_key_value_heads ({k}) or be a "
                             "multiple of it (KV heads are then replicated)")
        if i % size:
            raise ValueError(f"tensor_parallel_size {size} must divide intermediate_size ({i})")
        if k >= size:
            kv, kv_start = k // size, rank * (k // size)
        else:
            kv, kv_start = 1, rank * k // size
        return cls(rank=rank, size=size, num_heads=h // size, num_kv_heads=kv, kv_head_start=kv_start,
                   intermediate=i // size, vocab_per_rank=-(-cfg.vocab_size // size), vocab_size=cfg.vocab_size)

    @property
    def head_start(self) -> int:
        return self.rank * self.num_heads

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_per_rank

    @property
    def vocab_rows(self) -> int:
        """Real vocabulary rows on this rank (``vocab_per_rank`` but on the last, padded shard)."""
        return max(0, min(self.vocab_size, self.vocab_start + self.vocab_per_rank) - self.vocab_start)


def _active(tp: Collectives | None) -> Collectives | None:
    return tp if tp is not None and tp.size > 1 else None


class RowParallelLinear(Linear):
    """A linear layer over this rank's input columns; the ranks' partial outputs are summed
    (all-reduce). The bias, whole on every rank, is added by rank 0 only."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, tp: Collectives | None) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.tp = _active(tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tp = self.tp
        if tp is None:
            return linear(x, self.weight, self.bias)
        return tp.all_reduce(linear(x, self.weight, self.bias if tp.rank == 0 else None))


class VocabParallelEmbedding(nn.Module):
    """``embedding(ids)`` with this rank's vocabulary rows; other ids give zeros, and the
    all-reduce adds the one rank that holds each id (exact: the others add zeros)."""

    def __init__(self, vocab_size: int, hidden_size: int, *, tp: Collectives | None) -> None:
        super().__init__()
        self.tp = _active(tp)
        self.size = 1 if self.tp is None else self.tp.size
        self.rows = -(-vocab_size // self.size)
        self.start = 0 if self.tp is None else self.tp.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside[:, None], 0)
        return self.tp.all_reduce(out)


def gather_logits(logits: torch.Tensor, tp: Collectives | None, vocab_size: int) -> torch.Tensor:
    """This rank's vocabulary columns ``[N, Vp]`` -> the whole vocabulary ``[N, V]`` (every rank)."""
    tp = _active(tp)
    if tp is None:
        return logits
    return tp.all_gather(logits.contiguous())[:, :vocab_size]
