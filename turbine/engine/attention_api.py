"""The one seam between model code and KV-cache/attention code.

Models never see sequences, blocks or caches: each attention layer hands its projected,
rotated q/k/v for the step's packed tokens to an ``AttentionBackend`` and gets the output back.
The model runner supplies a paged backend (writes k/v into the block the block manager gave
each token, attends over each sequence's cached context); tests supply a dense one.

    step tokens (packed):  [ seq A: t5 t6 t7 | seq B: t0 .. t99 | seq C: t42 ]
    q:    [T, num_heads,    head_dim]
    k, v: [T, num_kv_heads, head_dim]
    out:  [T, num_heads,    head_dim]   causal within each sequence, over its whole context
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


class AttentionBackend(Protocol):
    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k/v of the step's tokens for layer ``layer_idx`` and return attention output."""
        ...


class CausalLM(Protocol):
    """What every model under turbine.engine.models provides to the runner."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        """input_ids, positions: [T] int64 -> hidden states [T, hidden_size]."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden_size] -> logits [N, vocab_size] in the model dtype (the sampler casts)."""
        ...
