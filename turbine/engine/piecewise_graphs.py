"""CUDA graphs of the forward of steps with prompt tokens, broken at attention ("piecewise").

A step that is not decode-only (new prompt tokens, maybe with decodes) cannot replay a decode
graph. Launched op by op from Python an 8B model's forward is ~350 launches, 18-30 ms of host
time, which for a few hundred tokens is 2-4x the device time (bench/eager_step_host.py).
Attention is the only part whose launches depend on the step's layout (sequence count, lengths,
the varlen flash arguments); everything between two attentions depends on the token count
alone. So for each token bucket T the forward is captured as ``num_layers + 1`` graphs:

    segment 0:  embedding, RoPE inputs, layer 0 up to its q/k/v    -> copied to static q, k, v
    attention 0 (eager, the step's own layout: KV write, decode and prefill kernels) -> static o
    segment 1:  layer 0's o_proj and MLP, layer 1 up to its q/k/v  -> static q, k, v
    ...
    segment L:  layer L-1's o_proj and MLP, the final norm         -> hidden [T, hidden_size]

A step of n tokens runs in the smallest bucket T >= n (``default_token_buckets``): its ids and positions are copied to the
front of the static inputs; rows n..T-1 keep what an earlier step left there (valid ids and
positions, so finite work, and row-independent until attention, which reads rows < n only).
The segments of every bucket share one memory pool and replay in capture order, one step at a
time on one stream, so a tensor that crosses a break (the residual stream, the RoPE inputs)
is still where the next segment expects it.

The model needs nothing for this: the break is an ``AttentionBackend`` (attention_api's seam)
that ends one capture and begins the next wherever the model calls attention.
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from turbine.engine.attention_api import AttentionBackend, CausalLM

__all__ = ["PiecewiseGraphs", "default_token_buckets"]

_FINE_FROM = 256  # below: powers of two (a step that small streams the weights: padding is free)
_FINE_STEP = 128  # above: every 128 tokens (compute-bound: a step pads by at most 128 tokens)


def default_token_buckets(max_tokens: int) -> list[int]:
    """Token counts to capture, up to ``max_tokens`` (included): 16, 32, .. 256, then every 128."""
    if max_tokens <= 0:
        return []
    small = [16 << i for i in range((_FINE_FROM // 16).bit_length())]
    fine = range(_FINE_FROM + _FINE_STEP, max_tokens, _FINE_STEP)
    return sorted({t for t in (*small, *fine) if t < max_tokens} | {max_tokens})


class _Break:
    """The attention backend the model sees while a bucket is warmed up or captured: each
    attention copies q/k/v out to the static buffers, ends the running segment and begins the
    next one, and hands back the static output the eager attention will fill at replay."""

    def __init__(self, owner: PiecewiseGraphs, t: int, pool: tuple[int, int] | None, capture: bool) -> None:
        self.owner, self.t, self.pool, self.capture = owner, t, pool, capture
        self.segments: list[torch.cuda.CUDAGraph] = []
        self.layers: list[int] = []
        self.graph: torch.cuda.CUDAGraph | None = None

    def begin(self) -> None:
        if self.capture:
            self.graph = torch.cuda.CUDAGraph()
            self.graph.capture_begin(pool=self.pool)

    def end(self) -> None:
        if self.capture and self.graph is not None:
            self.graph.capture_end()
            self.segments.append(self.graph)
            if self.pool is None:
                self.pool = self.graph.pool()

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        o, t = self.owner, self.t
        o.q[:t].copy_(q)
        o.k[:t].copy_(k)
        o.v[:t].copy_(v)
        self.layers.append(layer_idx)
        self.end()
        self.begin()
        return o.o[:t]


class PiecewiseGraphs:
    def __init__(self, model: CausalLM, *, buckets: Sequence[int], num_heads: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device,
                 pool: tuple[int, int] | None = None) -> None:
        """``pool``: a graph memory pool to share (the decode graphs'), else a new one."""
        if not buckets or min(buckets) < 1:
            raise ValueError(f"token buckets must be positive, got {list(buckets)}")
        if device.type != "cuda":
            raise ValueError("piecewise CUDA graphs need a CUDA device")
        self.model = model
        self.device = device
        self.buckets = sorted({int(b) for b in buckets})
        self.max_tokens = self.buckets[-1]
        big = self.max_tokens
        self.ids = torch.zeros(big, dtype=torch.int64, device=device)
        self.pos = torch.zeros(big, dtype=torch.int64, device=device)
        self.q = torch.zeros((big, num_heads, head_dim), dtype=dtype, device=device)
        self.k = torch.zeros((big, num_kv_heads, head_dim), dtype=dtype, device=device)
        self.v = torch.zeros((big, num_kv_heads, head_dim), dtype=dtype, device=device)
        self.o = torch.zeros((big, num_heads, head_dim), dtype=dtype, device=device)
        self.segments: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.layers: dict[int, list[int]] = {}  # bucket -> the layer index of each break, in order
        self.hidden: dict[int, torch.Tensor] = {}  # bucket -> the last segment's output
        self.pool = pool

    def bucket(self, n: int) -> int | None:
        """The smallest captured token count holding ``n`` tokens (None: too many)."""
        i = bisect.bisect_left(self.buckets, n)
        return self.buckets[i] if i < len(self.buckets) else None

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm each bucket up eagerly (kernels compile, cuBLAS picks) and capture it, largest first."""
        torch.cuda.synchronize(self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for t in reversed(self.buckets):
                self.model.forward(self.ids[:t], self.pos[:t], _Break(self, t, None, capture=False))
                stream.synchronize()
                brk = _Break(self, t, self.pool, capture=True)
                brk.begin()
                hidden = self.model.forward(self.ids[:t], self.pos[:t], brk)
                brk.end()
                self.pool = brk.pool
                self.segments[t], self.layers[t], self.hidden[t] = brk.segments, brk.layers, hidden
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        """The model's forward for the step's packed tokens (``attn``'s metadata already set):
        hidden [n, hidden_size], a view into the bucket's static output (valid until the next step)."""
        n = int(input_ids.shape[0])
        t = self.bucket(n)
        if t is None or t not in self.segments:
            raise ValueError(f"no piecewise graph holds {n} tokens (buckets {self.buckets})")
        self.ids[:n].copy_(input_ids)
        self.pos[:n].copy_(positions)
        segments = self.segments[t]
        segments[0].replay()
        for layer, seg in zip(self.layers[t], segments[1:], strict=True):
            self.o[:n].copy_(attn.forward(layer, self.q[:n], self.k[:n], self.v[:n]))
            seg.replay()
        return self.hidden[t][:n]
