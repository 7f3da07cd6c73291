"""A reference ``AttentionBackend``: one sequence, contiguous per-layer K/V, torch SDPA.

For tests and parity checks, not serving. Each call appends the step's k/v to the layer's
cache, then the step's queries attend causally over everything cached so far:

    layer l:  k_cache [L, num_kv_heads, head_dim]   (L = tokens fed so far, in order)
    query i of a T-token step sits at context position L - T + i and sees keys 0 .. L - T + i

So prefill-at-once, chunked prefill and token-by-token decode all compute the same thing, and
``greedy_generate`` can be compared with ``transformers``' ``generate(do_sample=False)``.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from turbine.engine.attention_api import CausalLM

__all__ = ["DenseAttention", "greedy_generate"]


class DenseAttention:
    """K/V of one sequence; feed its tokens in order (``reset()`` to start another)."""

    def __init__(self) -> None:
        self._k: dict[int, torch.Tensor] = {}
        self._v: dict[int, torch.Tensor] = {}

    @property
    def num_tokens(self) -> int:
        """Tokens cached so far (by layer 0)."""
        return 0 if 0 not in self._k else self._k[0].shape[0]

    def reset(self) -> None:
        self._k.clear()
        self._v.clear()

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if layer_idx in self._k:
            k = torch.cat((self._k[layer_idx], k))
            v = torch.cat((self._v[layer_idx], v))
        self._k[layer_idx], self._v[layer_idx] = k, v
        t, num_heads, _ = q.shape
        total = k.shape[0]
        rep = num_heads // k.shape[1]
        qh = q.transpose(0, 1)  # [H, T, D]
        kh = k.transpose(0, 1).repeat_interleave(rep, dim=0)  # [H, L, D]
        vh = v.transpose(0, 1).repeat_interleave(rep, dim=0)
        if t == total:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
        else:
            query_pos = torch.arange(total - t, total, device=q.device)
            mask = torch.arange(total, device=q.device)[None, :] <= query_pos[:, None]  # [T, L]
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
        return out.transpose(0, 1)  # [T, H, D]


@torch.inference_mode()
def greedy_generate(
    model: CausalLM,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    eos_token_ids: Iterable[int] = (),
    prefill_chunk: int | None = None,
    device: torch.device | str = "cpu",
) -> list[int]:
    """Greedy continuation of ``prompt`` (new tokens only; the EOS token is kept when it ends it).

    ``prefill_chunk`` feeds the prompt in chunks of that many tokens, exercising attention of a
    step over a cached prefix.
    """
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    eos = set(eos_token_ids)
    attn = DenseAttention()
    chunk = prefill_chunk or len(prompt)
    ids = torch.tensor(list(prompt), dtype=torch.long, device=device)
    for start in range(0, len(prompt), chunk):
        positions = torch.arange(start, min(start + chunk, len(prompt)), device=device)
        hidden = model.forward(ids[positions], positions, attn)
    out: list[int] = []
    pos = len(prompt)
    while len(out) < max_new_tokens:
        token = int(model.compute_logits(hidden[-1:]).argmax(dim=-1).item())
        out.append(token)
        if token in eos or len(out) == max_new_tokens:
            break
        positions = torch.tensor([pos], device=device)
        hidden = model.forward(torch.tensor([token], device=device), positions, attn)
        pos += 1
    return out
