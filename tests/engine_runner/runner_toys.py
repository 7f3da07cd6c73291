"""Helpers of the built-in engine tests: a toy causal LM following ``attention_api.CausalLM``
(attention-only, RoPE, grouped-query heads), a dense greedy reference, and a step-until-idle loop.

Its logits are sharp on purpose (unit-variance embeddings, a large random head), so greedy
argmaxes are never near-ties and "identical output" comparisons test the engine, not rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from turbine.engine.builtin_core import BuiltinCore
from turbine.engine.paged_attention import CausalAttention
from turbine.protocols.generate import GenerateRequest, SamplingOptions, StopConditions


@dataclass(frozen=True)
class ToyConfig:
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    hidden_size: int = 64
    vocab_size: int = 384
    max_position_embeddings: int = 1024
    eos_token_ids: tuple[int, ...] = (1,)


class ToyLM(torch.nn.Module):
    def __init__(self, cfg: ToyConfig, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        h, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.cfg = cfg
        self.embed = torch.nn.Parameter(torch.randn(cfg.vocab_size, h, generator=g))
        self.layers = torch.nn.ParameterList()
        for _ in range(cfg.num_hidden_layers):
            for shape in ((h, nh * hd), (h, nkv * hd), (h, nkv * hd), (nh * hd, h)):
                self.layers.append(torch.nn.Parameter(torch.randn(*shape, generator=g) / shape[0] ** 0.5))
        self.head = torch.nn.Parameter(torch.randn(cfg.vocab_size, h, generator=g) * 0.5)
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        self.register_buffer("inv_freq", inv, persistent=False)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        ang = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # [T, hd/2]
        cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)

    def forward(self, input_ids, positions, attn):  # type: ignore[no-untyped-def]
        cfg = self.cfg
        x = self.embed[input_ids]
        t = x.shape[0]
        for i in range(cfg.num_hidden_layers):
            wq, wk, wv, wo = self.layers[4 * i: 4 * i + 4]
            hn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
            q = self._rope((hn @ wq).view(t, cfg.num_attention_heads, cfg.head_dim), positions)
            k = self._rope((hn @ wk).view(t, cfg.num_key_value_heads, cfg.head_dim), positions)
            v = (hn @ wv).view(t, cfg.num_key_value_heads, cfg.head_dim)
            o = attn.forward(i, q, k, v)
            x = x + o.reshape(t, -1) @ wo
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)

    def compute_logits(self, hidden):  # type: ignore[no-untyped-def]
        return (hidden @ self.head.T).float()


def greedy(rid: str, prompt: list[int], max_tokens: int, **stop: object) -> GenerateRequest:
    return GenerateRequest(request_id=rid, token_ids=prompt, sampling=SamplingOptions(temperature=0.0),
                           stop=StopConditions(max_tokens=max_tokens, **stop))  # type: ignore[arg-type]


@torch.inference_mode()
def dense_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:  # type: ignore[no-untyped-def]
    """Reference: recompute the whole sequence every token, attention without any cache."""
    tokens = list(prompt)
    for _ in range(max_tokens):
        ids = torch.tensor(tokens)
        hidden = model.forward(ids, torch.arange(len(tokens)), CausalAttention([len(tokens)]))
        tokens.append(int(model.compute_logits(hidden[-1:]).argmax(-1)))
    return tokens[len(prompt):]


def run_to_completion(core: BuiltinCore, max_steps: int = 10_000) -> dict[str, list[int]]:
    """Step until idle; the tokens each request produced, and integrity after every step."""
    out: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not core.has_work():
            return out
        for o in core.step().outputs:
            if o.token_id is not None:
                out.setdefault(o.request_id, []).append(o.token_id)
        core.block_manager.check_integrity()
    raise AssertionError("the core did not finish")
