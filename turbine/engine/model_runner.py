"""Execute one scheduled step: pack every scheduled token into one forward, sample, return tokens.

    SchedulerOutput ──prepare()──▶ StepBatch = pack() (host: a PackedStep, every integer in one
                                   int64 buffer with named spans) + upload() (one host→device copy,
                                   views: input_ids / positions [T], slot mapping, block tables,
                                   context lengths, logits rows) + sampling parameters
                    ──launch()───▶ model.forward(input_ids, positions, PagedAttention)
                                   logits of each sequence's last token ─▶ sampler
                                   ─▶ LaunchedStep: tokens on the device, copy to the host queued
                    ──.wait()────▶ {request_id: token}   (the step's one wait for the device)

With async scheduling the next step is prepared while this one runs: a decode whose input is
the in-flight step's sampled token (a ``PLACEHOLDER`` on the host) reads it from that step's
device tensor (``StepBatch.fix``: two tiny gathers, no host round trip).

A decode-only step on CUDA replays a captured graph instead (``cuda_graphs.DecodeGraphs``):
``prepare`` pads it to the graph's batch size on the host (pad rows write their KV to a
reserved pad block), ``launch`` copies the packed integers into the graph's static inputs (two
device copies) and replays. Prefill and mixed steps run eagerly.

``prepare`` reads sequences (the caller holds the scheduler's lock); ``launch`` touches only the
batch, so requests can be added or aborted while the device works. Under tensor parallelism
(parallel/) rank 0's ``launch`` first publishes the ``PackedStep`` to the other ranks, which
``upload`` and ``launch`` it too: only rank 0 packs from sequences and samples. A sequence whose computed
count was reset by a preemption is simply packed from position 0 again; a prefix-cache hit
starts at its first uncached token. Either way the runner trusts ``num_computed_tokens`` and
``block_table``: it owns no per-request state.
"""
from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from turbine.engine.attention_api import CausalLM
from turbine.engine.cuda_graphs import DecodeGraphs, default_buckets
from turbine.engine.decode_kernel import decode_split_tokens, decode_tile_tokens
from turbine.engine.host_copy import HostStaging, PendingHost
from turbine.engine.kv_cache import KVCache
from turbine.engine.packed_step import PackedStep, Span, StepLayout, pack_ints
from turbine.engine.paged_attention import (
    AttentionMetadata,
    CausalAttention,
    PagedAttention,
    PrefillLayout,
)
from turbine.engine.piecewise_graphs import PiecewiseGraphs, default_token_buckets
from turbine.engine.sampler import Sampler, SamplingBatch
from turbine.engine.scheduler import SchedulerOutput
from turbine.engine.sequence import PLACEHOLDER
from turbine.protocols.generate import SamplingOptions

if TYPE_CHECKING:
    from turbine.engine.parallel.group import TPGroup

__all__ = ["LaunchedStep", "ModelRunner", "StepBatch", "profile_activation_bytes"]


@dataclass(frozen=True, slots=True)
class StepBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # [N] int64: the packed index of each sampling sequence's last token
    request_ids: tuple[str, ...]  # the N sampling sequences, in logits order
    sampling: SamplingBatch | None
    graph_batch: int = 0  # > 0: replay the decode graph of this (padded) batch size
    graph_ints: torch.Tensor | None = None  # [5, graph_batch]: ids | positions | slots | context lens | split
    logits_all_rows: bool = False  # logits_indices is arange(N): no gather needed
    piecewise: bool = False  # the forward replays the piecewise graphs (a step with prompt tokens)
    # (rows of input_ids, rows of the in-flight step's tokens): inputs still on the device
    fix: tuple[torch.Tensor, torch.Tensor] | None = None
    num_sampled: int = 0  # rows whose logits are computed (sampling is None on ranks other than 0)
    share_tokens: bool = False  # tensor parallelism: rank 0 broadcasts the sampled tokens
    packed: tuple[PackedStep, np.ndarray] | None = None  # the host data it was uploaded from

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


class LaunchedStep:
    """A step queued on the device: its sampled tokens (device) and their copy to the host."""

    __slots__ = ("_events", "_pending", "_rows", "request_ids", "tokens")

    def __init__(self, request_ids: tuple[str, ...], tokens: torch.Tensor | None,
                 pending: PendingHost | None = None,
                 events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None) -> None:
        self.request_ids = request_ids
        self.tokens = tokens  # [N] int64 on the device, in request_ids order (None: nothing sampled)
        self._pending = pending
        self._events = events  # (start, end) around the step's device work (ModelRunner.time_device)
        self._rows: dict[str, int] | None = None

    def device_ms(self) -> float | None:
        """Device time from the step's first kernel to its sampling (after ``wait``; None: untimed)."""
        if self._events is None:
            return None
        start, end = self._events
        end.synchronize()
        return start.elapsed_time(end)

    def row(self, request_id: str) -> int:
        """The row of ``request_id``'s token in ``tokens``."""
        if self._rows is None:
            self._rows = {rid: i for i, rid in enumerate(self.request_ids)}
        return self._rows[request_id]

    def wait(self) -> dict[str, int]:
        """``{request_id: token}``, once the device has sampled them."""
        if self._pending is None:
            return {}
        return dict(zip(self.request_ids, self._pending.get(), strict=True))


class ModelRunner:
    def __init__(self, model: CausalLM, kv_cache: KVCache, *, num_heads: int, vocab_size: int,
                 eos_token_ids: Seq[int] = (), sampler_seed: int | None = 0, decode_kernel: str = "auto",
                 max_model_len: int | None = None, pad_block: int | None = None,
                 tp: TPGroup | None = None) -> None:
        """``pad_block``: a KV block no sequence owns (the decode graphs' padding writes there);
        ``max_model_len``: the longest context, which sizes the RoPE tables and graph block tables;
        ``num_heads``: this rank's query heads; ``tp``: its tensor-parallel group (None: alone)."""
        self.model = model
        self.tp = tp if tp is not None and tp.size > 1 else None
        # Tensor parallelism: rank 0 hands each step's host data to the other ranks as it launches
        # it (set by the executor), and broadcasts sampled tokens when later steps read them on
        # the device (async scheduling: ``share_tokens``, set by the core).
        self.publish: Callable[[PackedStep, np.ndarray], None] | None = None
        self.share_tokens = False
        self.kv_cache = kv_cache
        self.device = kv_cache.device
        self.block_size = kv_cache.block_size
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.attn = PagedAttention(kv_cache, num_heads, decode_kernel=decode_kernel)
        self.sampler = Sampler(self.device, sampler_seed)
        self.staging = HostStaging(self.device)
        self.num_steps = 0
        self.max_model_len = max_model_len
        self.pad_block = pad_block
        self.graphs: DecodeGraphs | None = None
        self.piecewise: PiecewiseGraphs | None = None
        # CUDA events around each step's device work (LaunchedStep.device_ms): a diagnostic, off
        # in serving (two event records a step, no synchronization)
        self.time_device = False
        self._tables = _BlockTables(-(-max_model_len // self.block_size) if max_model_len else 64)
        rotary = getattr(model, "rotary", None)
        if max_model_len is not None and hasattr(rotary, "reserve"):
            rotary.reserve(max_model_len)

    def capture_graphs(self, max_num_seqs: int, buckets: Seq[int] | None = None) -> DecodeGraphs:
        """Capture the decode graphs (CUDA, Triton decode kernel, a pad block and max_model_len needed)."""
        if self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        if self.pad_block is None or self.max_model_len is None:
            raise ValueError("CUDA graphs need pad_block and max_model_len")
        graphs = DecodeGraphs(self.model, self.attn, buckets=buckets or default_buckets(max_num_seqs),
                              max_blocks=-(-self.max_model_len // self.block_size), pad_block=self.pad_block,
                              tensor_parallel=self.tp is not None)
        if self.device.index is not None:
            torch.cuda.set_device(self.device)
        graphs.capture()
        self.graphs = graphs
        return graphs

    def capture_piecewise(self, max_tokens: int, buckets: Seq[int] | None = None) -> PiecewiseGraphs:
        """Capture the piecewise graphs of steps with prompt tokens, up to ``max_tokens`` tokens
        (sharing the decode graphs' memory pool when they exist)."""
        if self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        spec = self.kv_cache.spec
        pool = self.graphs.pool if self.graphs is not None else None
        pw = PiecewiseGraphs(self.model, buckets=buckets or default_token_buckets(max_tokens),
                             num_heads=self.attn.num_heads, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                             dtype=spec.dtype, device=self.device, pool=pool)
        if self.device.index is not None:
            torch.cuda.set_device(self.device)
        pw.capture()
        self.piecewise = pw
        return pw

    # -- host side ----------------------------------------------------------------------------------
    def prepare(self, out: SchedulerOutput, prev: LaunchedStep | None = None) -> StepBatch:
        """Pack the step's tokens (one-token sequences first: the batched decode group), upload
        them and build the sampling rows. ``prev``: the step still in flight, whose sampled
        tokens some decodes take as input."""
        step, ints, samplers = self.pack(out, prev)
        batch = self.upload(step, ints)
        if not samplers:
            return batch
        seqs = [e.seq for e in samplers]
        sampling = SamplingBatch.build(
            [s.sampling for s in seqs], [s.num_output_tokens for s in seqs],
            vocab_size=self.vocab_size, device=self.device, banned=[self._banned(s) for s in seqs],
            stage=self.staging.to_device,
        )
        return replace(batch, request_ids=tuple(s.request_id for s in seqs), sampling=sampling)

    def pack(self, out: SchedulerOutput, prev: LaunchedStep | None = None) -> tuple[PackedStep, np.ndarray, list]:  # type: ignore[type-arg]
        """The step as host data (no device work): its ``PackedStep``, the int64 buffer, and
        the scheduled entries that sample, in logits order."""
        bs = self.block_size
        entries = [e for e in out.scheduled if e.num_new_tokens == 1]
        num_decodes = len(entries)
        entries += [e for e in out.scheduled if e.num_new_tokens > 1]
        if not entries:
            raise ValueError("an empty step has nothing to run")
        n_seqs = len(entries)
        seqs = [e.seq for e in entries]
        starts = np.fromiter((sq.num_computed_tokens for sq in seqs), np.int64, n_seqs)
        qlens = np.fromiter((e.num_new_tokens for e in entries), np.int64, n_seqs)
        clens = starts + qlens
        nblocks = -(-clens // bs)
        have = np.fromiter((len(sq.block_table) for sq in seqs), np.int64, n_seqs)
        if (nblocks > have).any():
            bad = int(np.argmax(nblocks > have))
            raise ValueError(f"sequence {seqs[bad].request_id!r}: {int(clens[bad])} tokens exceed its block table")
        if num_decodes == n_seqs:
            ids = [sq.token_ids[p] for sq, p in zip(seqs, starts.tolist(), strict=True)]
        else:
            ids = []
            for sq, p, n in zip(seqs, starts.tolist(), qlens.tolist(), strict=True):
                ids.extend(sq.token_ids[p:p + n])
        width = int(nblocks.max())
        graphs = self.graphs
        gb = 0
        if graphs is not None and num_decodes == n_seqs and width <= graphs.max_blocks:
            gb = graphs.bucket(n_seqs) or 0
        tables = self._tables.gather(seqs, width)  # [n_seqs, width]; columns past a sequence's blocks: 0
        if gb > n_seqs:  # a graph step pads to its bucket: rows n_seqs.. are pad rows
            tables = np.concatenate((tables, np.zeros((gb - n_seqs, width), dtype=np.int64)))
        qstart = np.zeros(n_seqs + 1, dtype=np.int64)
        np.cumsum(qlens, out=qstart[1:])
        n_tok = int(qstart[-1])
        seq_of_tok = np.repeat(np.arange(n_seqs), qlens)
        positions = np.arange(n_tok, dtype=np.int64) + np.repeat(starts - qstart[:-1], qlens)
        slots = tables[seq_of_tok, positions // bs] * bs + positions % bs

        samplers = [i for i, e in enumerate(entries) if e.produces_token]
        logits_idx = qstart[1:][samplers] - 1
        ids_arr = np.asarray(ids, dtype=np.int64)
        fix_dst = np.flatnonzero(ids_arr[:num_decodes] == PLACEHOLDER)
        fix_src = None
        if len(fix_dst):
            if prev is None:
                raise ValueError("a decode's input token is still on the device, but no step is in flight")
            fix_src = np.fromiter((prev.row(seqs[i].request_id) for i in fix_dst.tolist()), np.int64, len(fix_dst))
        split = self._decode_split(clens[:num_decodes], gb or num_decodes)
        ctx = clens
        if gb:  # pad rows: token 0 at position 0, KV to the pad block, context 1
            pad = gb - n_seqs
            tables[n_seqs:] = graphs.pad_block  # type: ignore[union-attr]
            ids_arr = np.concatenate((ids_arr, np.zeros(pad, dtype=np.int64)))
            positions = np.concatenate((positions, np.zeros(pad, dtype=np.int64)))
            slots = np.concatenate((slots, np.full(pad, graphs.pad_slot, dtype=np.int64)))  # type: ignore[union-attr]
            ctx = np.concatenate((clens, np.ones(pad, dtype=np.int64)))
        prefill = self._prefill_layout(entries[num_decodes:], qlens[num_decodes:], clens[num_decodes:],
                                       tables[num_decodes:n_seqs]) if not gb else None
        cu_q, cu_k, gather, max_q, max_k = prefill if prefill is not None else (None, None, None, 0, 0)
        # One host->device copy for every integer the step needs, sliced into views there.
        ints, spans = pack_ints([ids_arr, positions, slots, ctx, np.full(gb or 1, split, dtype=np.int64), logits_idx,
                                 tables.ravel(), qstart, cu_q, cu_k, gather,
                                 fix_dst if len(fix_dst) else None, fix_src], aligned=not gb)
        step = PackedStep(
            layout=StepLayout(*spans), table_rows=int(tables.shape[0]), table_width=width, num_decodes=num_decodes,
            query_lens=tuple(qlens.tolist()), context_lens=tuple(clens.tolist()), max_q=max_q, max_k=max_k,
            graph_batch=gb, aligned=not gb, logits_all_rows=len(samplers) == n_seqs and num_decodes == n_seqs,
            piecewise=not gb and self.piecewise is not None and n_tok <= self.piecewise.max_tokens,
            num_sampled=len(samplers), share_tokens=self.share_tokens and bool(samplers),
        )
        return step, ints, [entries[i] for i in samplers]

    def upload(self, step: PackedStep, ints: np.ndarray) -> StepBatch:
        """``ints`` in one host->device copy and the step's device views of it (no sampling rows:
        ``prepare`` adds them on the rank that samples).

        Eager steps pass views to Triton kernels, which compile a variant per pointer-alignment
        class: unaligned offsets that vary with the step's token count would make a new one appear
        mid-serving (~1 s under live requests), hence ``PackedStep.aligned``. A graph step copies
        its views into static buffers, and its [5, B] block must stay contiguous."""
        self.staging.begin_step()
        flat = self.staging.to_device(ints)
        lay = step.layout

        def view(span: Span) -> torch.Tensor:
            return flat[span.start:span.start + span.length]

        prefill = None
        if lay.cu_q is not None and lay.cu_k is not None:
            prefill = PrefillLayout(cu_q=view(lay.cu_q).to(torch.int32), cu_k=view(lay.cu_k).to(torch.int32),
                                    gather=view(lay.gather) if lay.gather is not None and lay.gather.length else None,
                                    max_q=step.max_q, max_k=step.max_k)
        meta = AttentionMetadata(
            slot_mapping=view(lay.slots), query_start_loc=view(lay.qstart), context_lens=view(lay.context_lens),
            block_tables=view(lay.tables).view(step.table_rows, step.table_width), num_decodes=step.num_decodes,
            query_lens_host=step.query_lens, context_lens_host=step.context_lens, prefill=prefill,
            decode_split=view(lay.split)[:1],
        )
        gb = step.graph_batch
        fix = None
        if lay.fix_dst is not None and lay.fix_src is not None:
            fix = (view(lay.fix_dst), view(lay.fix_src))
        return StepBatch(view(lay.ids), view(lay.positions), meta, view(lay.logits_idx), (), None,
                         graph_batch=gb, graph_ints=flat[:5 * gb].view(5, gb) if gb else None,
                         logits_all_rows=step.logits_all_rows, piecewise=step.piecewise, fix=fix,
                         num_sampled=step.num_sampled, share_tokens=step.share_tokens, packed=(step, ints))

    def _decode_split(self, clens: np.ndarray, grid_seqs: int) -> int:
        """The decode kernel's context split length for decodes of lengths ``clens`` in a grid of
        ``grid_seqs`` rows (see ``decode_split_tokens``; 0 when the step has no decodes)."""
        if not len(clens) or not self.attn.use_triton:
            return 0
        spec = self.kv_cache.spec
        return decode_split_tokens(int(clens.max()), int(clens.sum()), grid_seqs, spec.num_kv_heads, self.device,
                                   decode_tile_tokens(self.block_size, spec.num_kv_heads, grid_seqs, self.device))

    def _prefill_layout(self, entries, qlens: np.ndarray, clens: np.ndarray,  # type: ignore[no-untyped-def]
                        tables: np.ndarray):
        """Host arrays of ``PrefillLayout`` (cu_q, cu_k, gather slots, max_q, max_k), or None when
        the varlen flash path is off or the step has no prefill."""
        if not len(entries) or not self.attn.varlen_prefill:
            return None
        bs = self.block_size
        cu_q = np.zeros(len(entries) + 1, dtype=np.int64)
        np.cumsum(qlens, out=cu_q[1:])
        if bool((clens == qlens).all()):  # no cached prefix: K/V are the step's own tokens
            return cu_q, cu_q, np.zeros(0, dtype=np.int64), int(qlens.max()), int(qlens.max())
        cu_k = np.zeros(len(entries) + 1, dtype=np.int64)
        np.cumsum(clens, out=cu_k[1:])
        seq_of = np.repeat(np.arange(len(entries)), clens)
        pos = np.arange(int(cu_k[-1]), dtype=np.int64) - np.repeat(cu_k[:-1], clens)
        gather = tables[seq_of, pos // bs] * bs + pos % bs
        return cu_q, cu_k, gather, int(qlens.max()), int(clens.max())

    def _banned(self, seq) -> tuple[int, ...]:  # type: ignore[no-untyped-def]
        """Stop tokens cannot be sampled before ``min_tokens`` outputs exist."""
        stop = seq.stop
        if seq.num_output_tokens >= stop.min_tokens:
            return ()
        eos = () if stop.ignore_eos else self.eos_token_ids
        return (*eos, *stop.stop_token_ids)

    # -- device side ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, batch: StepBatch, prev: LaunchedStep | None = None) -> LaunchedStep:
        """Queue the forward and the sampling; the tokens come back through ``LaunchedStep.wait``.

        Under tensor parallelism every rank launches every step in the same order (rank 0
        publishes it first): the forward's all-reduces and the logits' all-gather meet across
        ranks; rank 0 samples, and with ``share_tokens`` broadcasts the tokens so that every
        rank holds them for the next step's ``fix``."""
        if self.publish is not None and batch.packed is not None:
            self.publish(*batch.packed)
        self.num_steps += 1
        if self.device.type == "cuda" and self.device.index is not None:  # this thread launches there
            torch.cuda.set_device(self.device)
        events = None
        if self.time_device and self.device.type == "cuda":
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        if batch.fix is not None:  # inputs sampled by the step in flight, gathered on the device
            if prev is None or prev.tokens is None:
                raise ValueError("the step needs the in-flight step's tokens")
            dst, src = batch.fix
            batch.input_ids.index_copy_(0, dst, prev.tokens.index_select(0, src))
        n = batch.num_sampled
        if batch.graph_batch:
            logits = self.graphs.replay(batch.graph_batch, batch.graph_ints,  # type: ignore[union-attr]
                                        batch.attn.block_tables)
            if batch.sampling is None:
                return self._other_rank_tokens(batch)
            logits = logits[:n] if batch.logits_all_rows else logits.index_select(0, batch.logits_indices)
        else:
            self.attn.set_metadata(batch.attn)
            if batch.piecewise:
                hidden = self.piecewise.forward(batch.input_ids, batch.positions, self.attn)  # type: ignore[union-attr]
            else:
                hidden = self.model.forward(batch.input_ids, batch.positions, self.attn)
            if not n:
                return LaunchedStep((), None)
            logits = self.model.compute_logits(hidden[batch.logits_indices])  # all-gathered under TP
            if batch.sampling is None:
                return self._other_rank_tokens(batch)
        tokens = self.sampler(logits, batch.sampling)
        if batch.share_tokens:
            self.tp.broadcast(tokens, 0)  # type: ignore[union-attr]
        if events is not None:
            events[1].record()
        return LaunchedStep(batch.request_ids, tokens, self.staging.to_host(tokens), events)

    def _other_rank_tokens(self, batch: StepBatch) -> LaunchedStep:
        """A tensor-parallel rank other than 0 samples nothing; it receives rank 0's tokens when
        a later step's inputs need them (and nothing else is ever read from its steps)."""
        if not batch.share_tokens:
            return LaunchedStep((), None)
        tokens = torch.empty(batch.num_sampled, dtype=torch.int64, device=self.device)
        return LaunchedStep((), self.tp.broadcast(tokens, 0))  # type: ignore[union-attr]


class _BlockTables:
    """Host mirror of the running sequences' block tables, one row each, updated by appends.

    Converting every table from Python ints each step costs ~0.4 ms at batch 256; a sequence's
    ``block_table`` list only grows (the block manager replaces it with a new list when it frees
    the sequence), so a row stays valid while it mirrors the same list object. Rows of
    sequences absent from a step are reclaimed when space runs out.
    """

    def __init__(self, max_blocks: int, rows: int = 64) -> None:
        self.data = np.zeros((rows, max(1, max_blocks)), dtype=np.int64)
        self.free = list(range(rows - 1, -1, -1))
        self.rows: dict[str, list] = {}  # request id -> [row, block_table list, mirrored count, step]
        self.step = 0

    def gather(self, seqs: list, width: int) -> np.ndarray:  # type: ignore[type-arg]
        self.step += 1
        if width > self.data.shape[1]:
            grown = np.zeros((self.data.shape[0], max(width, 2 * self.data.shape[1])), dtype=np.int64)
            grown[:, :self.data.shape[1]] = self.data
            self.data = grown
        idx = np.empty(len(seqs), dtype=np.int64)
        for i, sq in enumerate(seqs):
            ent = self.rows.get(sq.request_id)
            table = sq.block_table
            if ent is None or ent[1] is not table:
                if ent is None:
                    ent = self.rows[sq.request_id] = [self._take_row(), table, 0, 0]
                ent[1], ent[2] = table, 0
                self.data[ent[0]].fill(0)
            n = len(table)
            if n > ent[2]:
                if n > self.data.shape[1]:
                    return self.gather(seqs, n)  # grow, then start over
                self.data[ent[0], ent[2]:n] = table[ent[2]:]
                ent[2] = n
            ent[3] = self.step
            idx[i] = ent[0]
        return self.data[idx, :width]

    def _take_row(self) -> int:
        if not self.free:
            stale = [rid for rid, ent in self.rows.items() if ent[3] < self.step]
            for rid in stale:
                self.free.append(self.rows.pop(rid)[0])
        if not self.free:  # every row is in this step: grow
            old = self.data.shape[0]
            self.data = np.concatenate((self.data, np.zeros_like(self.data)))
            self.free = list(range(2 * old - 1, old - 1, -1))
        return self.free.pop()


@torch.inference_mode()
def profile_activation_bytes(model: CausalLM, *, num_tokens: int, num_seqs: int, vocab_size: int,
                             device: torch.device) -> int:
    """Peak device memory a step of ``num_tokens`` tokens (``num_seqs`` sampled rows) allocates
    beyond what is allocated now: the KV cache is sized from what remains after this."""
    if device.type != "cuda":
        raise ValueError("activation profiling needs a CUDA device")
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    pos = torch.arange(num_tokens, dtype=torch.int64, device=device)
    hidden = model.forward(ids, pos, CausalAttention([num_tokens]))
    rows = min(num_seqs, num_tokens)
    logits = model.compute_logits(hidden[-rows:]).float()
    opts = [SamplingOptions(temperature=1.0, top_p=0.9, top_k=50, seed=i) for i in range(rows)]
    batch = SamplingBatch.build(opts, [0] * rows, vocab_size=vocab_size, device=device)
    Sampler(device, 0)(logits, batch)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del ids, pos, hidden, logits
    torch.cuda.empty_cache()
    return int(peak)
