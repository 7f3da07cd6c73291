"""CUDA graphs of the decode-only forward: one per padded batch size, captured once at start-up.

A decode step of an 8B model is ~350 small and large kernels; launched one by one from Python
the launches, not the GPU, set the pace at small batch. A graph replays them all in one launch.

    static inputs (device, written before each replay)          per bucket b (1, 2, 4, ... max_num_seqs)
    ints   [5, B]:  input_ids | positions | slot_mapping | context_lens     graph_b reads ints[:, :b]
                    | decode split length (in column 0)
    tables [B, max_blocks]  block tables                                    and tables[:b]
    logits [b, vocab]  written by graph_b's replay (float32)

A step of n decodes runs in the smallest bucket b >= n; the runner pads rows n..b-1 with a token at
position 0 whose KV goes to a reserved pad block that no sequence owns (context length 1), so a
padded row is finite, harmless work. Attention reads its lengths from ``context_lens`` on the
device, its split length from ``ints[4, 0]`` (set per step by the runner) and its grid depends
only on b (``decode_num_splits``), so one capture serves every context length up to
``max_blocks * block_size``. Graphs share one memory pool (captured
largest first); replays are serialized by the step loop, so sharing is safe.

Batch sizes up to ``SMALL_M_ROWS`` are captured twice, with cuBLAS and with the weight-streaming
Triton kernel for the linear layers (models/gemv.py); both replays are timed and the faster graph
is kept (``small_m``: which way each bucket went). The choice is measured on the device at hand,
so a GPU or library where cuBLAS wins keeps cuBLAS.

Tensor parallelism: every rank captures the same buckets in the same order, and each graph holds
its rank's collectives (the all-reduces after o_proj and down_proj, the logits' all-gather:
NCCL kernels captured like any other), so replays on all ranks meet. The warm-up forward before
each capture runs those collectives eagerly, in lockstep too. The small-M second capture is
skipped there: its per-rank timing could pick different graphs, and a capture failing on one
rank only would leave the others waiting in a collective (the choice needs a cross-rank vote
that multi-GPU runs must first measure).
"""
from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence

import torch

from turbine.engine.attention_api import CausalLM
from turbine.engine.models import layers
from turbine.engine.paged_attention import AttentionMetadata, PagedAttention

__all__ = ["DecodeGraphs", "default_buckets"]

log = logging.getLogger(__name__)


def default_buckets(max_num_seqs: int) -> list[int]:
    """Powers of two up to ``max_num_seqs``, and ``max_num_seqs`` itself."""
    sizes, b = [], 1
    while b < max_num_seqs:
        sizes.append(b)
        b *= 2
    sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    def __init__(self, model: CausalLM, attn: PagedAttention, *, buckets: Sequence[int], max_blocks: int,
                 pad_block: int, tensor_parallel: bool = False) -> None:
        if not buckets or min(buckets) < 1:
            raise ValueError(f"buckets must be positive batch sizes, got {list(buckets)}")
        if not attn.use_triton:
            raise ValueError("CUDA graphs need the Triton decode kernel (the torch path branches on host lengths)")
        self.model = model
        self.attn = attn
        self.tensor_parallel = tensor_parallel
        self.device = attn.kv_cache.device
        self.buckets = sorted({int(b) for b in buckets})
        self.max_batch = self.buckets[-1]
        self.max_blocks = int(max_blocks)
        self.pad_block = int(pad_block)
        self.pad_slot = self.pad_block * attn.kv_cache.block_size
        big = self.max_batch
        self.ints = torch.zeros((5, big), dtype=torch.int64, device=self.device)
        self.ints[2].fill_(self.pad_slot)
        self.ints[3].fill_(1)
        self.ints[4].fill_(max_blocks * attn.kv_cache.block_size)  # capture: one split covers any context
        self.tables = torch.full((big, self.max_blocks), self.pad_block, dtype=torch.int64, device=self.device)
        self._qstart = torch.arange(big + 1, dtype=torch.int64, device=self.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.small_m: dict[int, dict[str, float]] = {}  # bucket -> replay ms of each way, "triton" kept?
        self._pool: tuple[int, int] | None = None  # the graphs' shared memory pool (set by the first capture)

    @property
    def pool(self) -> tuple[int, int] | None:
        """The graphs' memory pool (None before the first capture)."""
        return self._pool

    def bucket(self, n: int) -> int | None:
        """The smallest captured batch size holding ``n`` decodes (None: too many)."""
        i = bisect.bisect_left(self.buckets, n)
        return self.buckets[i] if i < len(self.buckets) else None

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.ints[2, :b], query_start_loc=self._qstart[:b + 1], context_lens=self.ints[3, :b],
            block_tables=self.tables[:b], num_decodes=b, query_lens_host=(1,) * b, context_lens_host=(1,) * b,
            decode_split=self.ints[4, :1],
        )

    def _forward(self, b: int) -> torch.Tensor:
        self.attn.set_metadata(self._meta(b))
        hidden = self.model.forward(self.ints[0, :b], self.ints[1, :b], self.attn)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up (Triton compiles, cuBLAS picks kernels) and capture every bucket, largest first."""
        torch.cuda.synchronize(self.device)
        try_small_m = layers.small_m_linear_available() and self.attn.kv_cache.spec.dtype in (torch.bfloat16,
                                                                                          torch.float16)
        try_small_m = try_small_m and not self.tensor_parallel  # see the module docstring
        for b in reversed(self.buckets):
            graph, logits = self._capture(b, small_m=False)
            if try_small_m and b <= layers.SMALL_M_ROWS:
                try:
                    alt, alt_logits = self._capture(b, small_m=True)
                except Exception as ex:  # noqa: BLE001 - a kernel that fails here is not used; say so
                    log.warning("decode graph of batch %d: the Triton small-M linears failed (%r); cuBLAS kept", b, ex)
                    self.small_m[b] = {"error": repr(ex)[:200], "triton": 0.0}
                    try_small_m = False
                    self.graphs[b], self.logits[b] = graph, logits
                    continue
                ms_cublas, ms_triton = self._time(graph), self._time(alt)
                self.small_m[b] = {"cublas_ms": round(ms_cublas, 4), "triton_ms": round(ms_triton, 4),
                                   "triton": float(ms_triton < ms_cublas)}
                if ms_triton < ms_cublas:
                    graph, logits = alt, alt_logits
            self.graphs[b] = graph
            self.logits[b] = logits
        torch.cuda.synchronize(self.device)
        self.attn.meta = None

    def _capture(self, b: int, *, small_m: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        layers.set_small_m_linear(small_m)
        try:
            self._forward(b)  # eager warm-up of exactly this shape, outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._forward(b)
        finally:
            layers.set_small_m_linear(False)
        if self._pool is None:
            self._pool = graph.pool()
        return graph, logits

    def _time(self, graph: torch.cuda.CUDAGraph, reps: int = 10) -> float:
        """Median ms of a replay (the pad inputs: every replay rewrites the same pad KV)."""
        for _ in range(2):
            graph.replay()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(reps + 1)]
        events[0].record()
        for e in events[1:]:
            graph.replay()
            e.record()
        torch.cuda.synchronize(self.device)
        return sorted(a.elapsed_time(b) for a, b in zip(events, events[1:]))[reps // 2]

    def replay(self, b: int, ints: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """``ints`` [5, b] and ``tables`` [b, w] (already padded to the bucket) -> logits [b, vocab]."""
        if b not in self.graphs:
            raise ValueError(f"no graph captured for batch size {b}")
        w = tables.shape[1]
        if w > self.max_blocks:
            raise ValueError(f"block tables of width {w} exceed the captured {self.max_blocks}")
        self.ints[:, :b].copy_(ints)
        self.tables[:b, :w].copy_(tables)
        self.graphs[b].replay()
        return self.logits[b]
