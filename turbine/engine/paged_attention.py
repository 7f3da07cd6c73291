"""Attention backends over the paged KV cache (the runner's side of ``attention_api``).

A step packs its sequences' new tokens, one-token sequences (decodes) first:

    tokens:          [ d0 | d1 | d2 | p0 p0 p0 p0 | p1 p1 ]      T = 9, S = 5, num_decodes = 3
    query_start_loc: [ 0, 1, 2, 3, 7, 9 ]
    context_lens:    [ 40, 17, 301, 4, 130 ]   KV tokens each sequence attends to after this step
    block_tables:    [S, max_blocks] block ids (padded with 0); token p of sequence s sits in
                     slot  block_tables[s, p // B] * B + p % B   (slot_mapping holds the new ones)

Every layer first writes the step's k/v at ``slot_mapping`` and then attends: query i of a
sequence with q new tokens and context c sees keys ``0 .. c - q + i`` (causal over its whole
context, cached prefix included).

- Decode group: one batched call. On CUDA a Triton kernel reads blocks in place, split along the
  context (flash-decoding) into pieces of ``decode_split_tokens`` tokens, one length for the whole
  step: a long sequence among short ones spreads over several programs instead of setting the
  step's critical path alone. Its grid depends only on the batch size and its bounds come from
  ``context_lens`` and the split length on the device, so it is CUDA-graph safe. Elsewhere: SDPA
  over gathered blocks.
- Prefills: on CUDA in 16-bit, ONE varlen flash-attention call per layer for all of them
  (``PrefillLayout``; bottom-right causal, grouped-query heads native; a cached prefix is
  gathered from the cache first). Elsewhere, or if that kernel is missing: one SDPA per sequence.
Lengths the host needs are host mirrors: a step never waits on the device to read its layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from turbine.engine.kv_cache import KVCache

try:  # the Triton decode kernel is an accelerator, never a requirement
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

__all__ = ["AttentionMetadata", "CausalAttention", "PagedAttention", "PrefillLayout", "decode_block_n",
           "decode_num_splits", "decode_split_tokens", "flash_varlen_available", "paged_decode_triton",
           "triton_available"]

_GATHER_BUDGET_BYTES = 256 << 20  # portable decode: gather at most this much K+V per chunk
_TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
_SDPA_GQA = _TORCH_VERSION >= (2, 5)
_MAX_SPLITS = 16
_WAVES = 4  # decode programs per SM the split policy aims for


@dataclass(frozen=True, slots=True)
class PrefillLayout:
    """The step's prefill sequences (after the decode group) packed for one varlen call."""

    cu_q: torch.Tensor  # [P + 1] int32: query offsets, relative to the first prefill token
    cu_k: torch.Tensor  # [P + 1] int32: key offsets in the packed K/V
    gather: torch.Tensor | None  # [cu_k[-1]] int64 flat slots of every context token; None: K/V are the step's own
    max_q: int
    max_k: int


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """One step's token layout, built once by the runner and shared by every layer."""

    slot_mapping: torch.Tensor  # [T] int64: flat cache slot of each new token
    query_start_loc: torch.Tensor  # [S + 1] int64
    context_lens: torch.Tensor  # [S] int64
    block_tables: torch.Tensor  # [S, max_blocks] int64
    num_decodes: int  # sequences 0 .. num_decodes-1 have exactly one new token
    query_lens_host: tuple[int, ...]
    context_lens_host: tuple[int, ...]
    prefill: PrefillLayout | None = None  # set when the varlen flash path serves the prefills
    # [1] int64 on the device: the decode group's context split length (``decode_split_tokens``);
    # None: the Triton kernel derives it from the lengths (a host sync; tests and benchmarks)
    decode_split: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_host)


def triton_available() -> bool:
    return triton is not None and torch.cuda.is_available()


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          causal: bool, scale: float) -> torch.Tensor:
    """q [B, H, Lq, D], k/v [B, Hkv, Lk, D].

    Grouped-query heads go to SDPA as they are only without a mask (flash attention takes
    them); with a mask they are expanded, so the memory-efficient kernel (which takes masks)
    serves it instead of the math fallback that materializes every score.
    """
    if q.shape[1] != k.shape[1]:
        if _SDPA_GQA and mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


# -- varlen flash attention (torch's bundled FlashAttention-2) ---------------------------------------
def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                  max_q: int, max_k: int, scale: float) -> torch.Tensor:
    """q [Tq, H, D], k/v [Tk, Hkv, D] packed; causal aligned bottom-right (a cached prefix is visible)."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False,
                                                   scale=scale)[0]


_FLASH_OK: dict[tuple[str, torch.dtype, int, int, int], bool] = {}


def flash_varlen_available(device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int,
                           head_dim: int) -> bool:
    """Whether the varlen flash kernel runs here AND computes our semantics: probed once per shape
    against SDPA with an explicit mask (a torch build without it, or with top-left causal
    alignment, falls back to per-sequence SDPA instead of computing something else)."""
    key = (str(device), dtype, num_heads, num_kv_heads, head_dim)
    if key in _FLASH_OK:
        return _FLASH_OK[key]
    ok = False
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        try:
            g = torch.Generator(device=device).manual_seed(0)
            qlens, clens = [5, 3, 33], [5, 19, 70]
            # strided views of one buffer, as a qkv projection hands them over
            qkv = torch.randn(sum(clens), (num_heads + 2 * num_kv_heads) * head_dim, device=device, dtype=dtype,
                              generator=g)
            q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
            q = q[:sum(qlens)].view(sum(qlens), num_heads, head_dim)
            k, v = (t.view(sum(clens), num_kv_heads, head_dim) for t in (k, v))
            cu = [torch.tensor([0, *torch.tensor(x).cumsum(0).tolist()], dtype=torch.int32, device=device)
                  for x in (qlens, clens)]
            scale = head_dim ** -0.5
            out = _flash_varlen(q, k, v, cu[0], cu[1], max(qlens), max(clens), scale).float()
            err, qs, ks = 0.0, 0, 0
            for n, c in zip(qlens, clens, strict=True):
                qh = q[qs:qs + n].float().transpose(0, 1)[None]
                kh = k[ks:ks + c].float().transpose(0, 1)[None].repeat_interleave(num_heads // num_kv_heads, 1)
                vh = v[ks:ks + c].float().transpose(0, 1)[None].repeat_interleave(num_heads // num_kv_heads, 1)
                mask = torch.arange(c, device=device)[None, :] <= torch.arange(c - n, c, device=device)[:, None]
                ref = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)[0].transpose(0, 1)
                err = max(err, float((out[qs:qs + n] - ref).abs().max() / ref.abs().max()))
                qs, ks = qs + n, ks + c
            ok = err < 2e-2
        except Exception:  # noqa: BLE001 - any failure means: not usable here
            ok = False
    _FLASH_OK[key] = ok
    return ok


class PagedAttention:
    """``AttentionBackend`` over a ``KVCache``; call ``set_metadata`` before each forward.

    ``decode_kernel``: "auto" (Triton on CUDA when it imports, else SDPA), "triton" or "torch".
    """

    def __init__(self, kv_cache: KVCache, num_heads: int, *, scale: float | None = None,
                 decode_kernel: str = "auto") -> None:
        spec = kv_cache.spec
        if num_heads % spec.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({spec.num_kv_heads})")
        if decode_kernel not in ("auto", "triton", "torch"):
            raise ValueError(f"decode_kernel must be auto, triton or torch, got {decode_kernel!r}")
        on_cuda = kv_cache.device.type == "cuda"
        if decode_kernel == "triton" and triton is None:
            raise ValueError("decode_kernel='triton' but triton is not installed")
        self.kv_cache = kv_cache
        self.num_heads = num_heads
        self.scale = scale if scale is not None else spec.head_dim ** -0.5
        self.use_triton = decode_kernel == "triton" or (decode_kernel == "auto" and on_cuda and triton is not None)
        self.meta: AttentionMetadata | None = None
        self._varlen: bool | None = None

    @property
    def varlen_prefill(self) -> bool:
        """True when prefills run as one varlen flash call (the runner then builds ``PrefillLayout``)."""
        if self._varlen is None:
            spec = self.kv_cache.spec
            self._varlen = flash_varlen_available(self.kv_cache.device, spec.dtype, self.num_heads,
                                                  spec.num_kv_heads, spec.head_dim)
        return self._varlen

    def set_metadata(self, meta: AttentionMetadata) -> None:
        self.meta = meta

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta = self.meta
        if meta is None:
            raise RuntimeError("PagedAttention.forward before set_metadata")
        cache = self.kv_cache
        cache.write(layer_idx, meta.slot_mapping, k, v)
        nd = meta.num_decodes
        only_decodes = nd == meta.num_seqs
        if only_decodes and self.use_triton:  # the CUDA-graph path: no host-side branching on lengths
            return paged_decode_triton(q, cache.key(layer_idx), cache.value(layer_idx), meta.block_tables,
                                       meta.context_lens, self.scale, split_tokens=meta.decode_split)
        if nd == 0 and meta.prefill is not None:
            return self._prefill_varlen(layer_idx, q, k, v, meta.prefill)
        out = torch.empty_like(q)
        if nd:
            k_cache, v_cache = cache.key(layer_idx), cache.value(layer_idx)
            if self.use_triton:
                paged_decode_triton(q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.context_lens[:nd],
                                    self.scale, out=out[:nd], split_tokens=meta.decode_split)
            else:
                out[:nd] = self._decode_torch(q[:nd], k_cache, v_cache, meta)
        if meta.prefill is not None:
            out[nd:] = self._prefill_varlen(layer_idx, q[nd:], k[nd:], v[nd:], meta.prefill)
            return out
        qlens, clens = meta.query_lens_host, meta.context_lens_host
        start = nd
        for s in range(nd, meta.num_seqs):
            n, c = qlens[s], clens[s]
            out[start:start + n] = self._prefill(layer_idx, s, q[start:start + n], k[start:start + n],
                                                 v[start:start + n], c)
            start += n
        return out

    # -- decode: one query per sequence, batched ----------------------------------------------------
    def _decode_torch(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata) -> torch.Tensor:
        bs = k_cache.shape[1]
        nd = q.shape[0]
        clens = meta.context_lens_host[:nd]
        per_token = 2 * q.shape[1] * q.shape[2] * k_cache.element_size()  # K and V, heads expanded
        out = torch.empty_like(q)
        i = 0
        while i < nd:  # chunks whose gathered K/V stay within the budget
            j, longest = i, 0
            while j < nd:
                longest2 = max(longest, clens[j])
                if j > i and (j + 1 - i) * longest2 * per_token > _GATHER_BUDGET_BYTES:
                    break
                longest, j = longest2, j + 1
            nb = -(-longest // bs)
            tables = meta.block_tables[i:j, :nb]
            kk = k_cache[tables].flatten(1, 2).transpose(1, 2)  # [n, Hkv, nb*bs, D]
            vv = v_cache[tables].flatten(1, 2).transpose(1, 2)
            pos = torch.arange(nb * bs, device=q.device)
            mask = (pos[None, :] < meta.context_lens[i:j, None])[:, None, None, :]
            o = _sdpa(q[i:j].unsqueeze(2), kk, vv, mask, False, self.scale)  # [n, H, 1, D]
            out[i:j] = o.squeeze(2)
            i = j
        return out

    # -- prefill: many queries per sequence ------------------------------------------------------------
    def _prefill_varlen(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        lay: PrefillLayout) -> torch.Tensor:
        if lay.gather is not None:  # some sequence has a cached prefix: its whole context from the cache
            k = self.kv_cache.key_slots(layer).index_select(0, lay.gather)
            v = self.kv_cache.value_slots(layer).index_select(0, lay.gather)
        return _flash_varlen(q, k, v, lay.cu_q, lay.cu_k, lay.max_q, lay.max_k, self.scale)

    def _prefill(self, layer: int, s: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 ctx: int) -> torch.Tensor:
        n = q.shape[0]
        qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if ctx == n:  # nothing cached before this chunk: the step's own k/v are the whole context
            kh = k.transpose(0, 1).unsqueeze(0)
            vh = v.transpose(0, 1).unsqueeze(0)
            o = _sdpa(qh, kh, vh, None, True, self.scale)
        else:
            cache = self.kv_cache
            bs = cache.block_size
            nb = -(-ctx // bs)
            table = self.meta.block_tables[s, :nb]  # type: ignore[union-attr]
            kh = cache.key(layer)[table].flatten(0, 1)[:ctx].transpose(0, 1).unsqueeze(0)
            vh = cache.value(layer)[table].flatten(0, 1)[:ctx].transpose(0, 1).unsqueeze(0)
            rows = torch.arange(ctx - n, ctx, device=q.device)
            mask = torch.arange(ctx, device=q.device)[None, :] <= rows[:, None]
            o = _sdpa(qh, kh.to(q.dtype), vh.to(q.dtype), mask, False, self.scale)
        return o.squeeze(0).transpose(0, 1)


class CausalAttention:
    """Attention over the step's own tokens only: every sequence starts at position 0, no cache.

    ``seq_lens`` splits the packed tokens into sequences. It serves as the dense reference in
    tests and as the memory-profiling pass (no KV cache exists yet then).
    """

    def __init__(self, seq_lens: list[int], *, scale: float | None = None) -> None:
        self.seq_lens = list(seq_lens)
        self.scale = scale

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
        outs, start = [], 0
        for n in self.seq_lens:
            qh, kh, vh = (t[start:start + n].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            outs.append(_sdpa(qh, kh, vh, None, True, scale).squeeze(0).transpose(0, 1))
            start += n
        if start != q.shape[0]:
            raise ValueError(f"seq_lens cover {start} tokens, the step has {q.shape[0]}")
        return torch.cat(outs)


# -- Triton decode kernel (CUDA) -------------------------------------------------------------------------
_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def decode_num_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """The most context splits per (sequence, KV head): a power of two up to 16, the fewest that
    give ``_WAVES`` programs per SM (1 once the batch alone does). Depends on the batch size
    only, so a CUDA graph captured for a batch size keeps a valid grid for any context lengths;
    how many splits a sequence really uses follows from ``decode_split_tokens``."""
    target = _WAVES * _sm_count(device)
    splits = 1
    while splits < _MAX_SPLITS and num_seqs * num_kv_heads * splits < target:
        splits *= 2
    return splits


def decode_block_n(block_size: int) -> int:
    """Tokens per tile of the decode kernel's loop (a few KV blocks)."""
    return max(16, min(64, (1 << max(0, block_size - 1).bit_length()) * 4))


def decode_split_tokens(longest: int, total: int, grid_seqs: int, num_kv_heads: int, device: torch.device,
                        block_n: int) -> int:
    """Tokens per context split for one decode step (contexts: ``longest`` the longest, ``total``
    their sum), the same for every sequence: long enough that ``decode_num_splits(grid_seqs)`` splits cover the longest context, and that the step's
    work (all contexts, every KV head) fills ``_WAVES`` programs per SM, rounded up to tiles.
    A sequence of c tokens runs ceil(c / split) programs, so in a batch of mixed lengths the
    longest no longer runs alone on one SM while the rest finish (a per-sequence split would
    give every sequence the same count of programs, each as long as its context allows)."""
    splits = decode_num_splits(grid_seqs, num_kv_heads, device)
    per_program = -(-total * num_kv_heads // (_WAVES * _sm_count(device)))
    split = max(-(-longest // splits), per_program, 1)
    if 4 * longest <= 5 * split:  # within a quarter of one split: no context is cut for a stub
        split = longest
    return -(-split // block_n) * block_n


def paged_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float, *,
                        out: torch.Tensor | None = None, num_splits: int | None = None,
                        split_tokens: torch.Tensor | int | None = None, block_n: int | None = None,
                        num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """One query per sequence over its paged context, read in place (no gather).

    q [N, H, D] (D contiguous); k/v_cache [num_blocks, B, Hkv, D]; block_tables [N, max_blocks];
    context_lens [N] (>= 1 each). One program per (sequence, KV head, split) computes all query
    heads of its group with an online softmax over tiles of BLOCK_N tokens. Split s covers tokens
    [s * split_tokens, (s + 1) * split_tokens): a sequence within one split writes its output
    directly, longer ones leave partial results that a second kernel merges by their log-sum-exp.
    ``split_tokens`` (a [1] device tensor in a CUDA graph) times ``num_splits`` must cover the
    longest context; None derives it with ``decode_split_tokens`` from a host copy of the lengths.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    n, h, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    group = h // hkv
    if out is None:
        out = torch.empty((n, h, d), dtype=q.dtype, device=q.device)
    if n == 0:
        return out
    splits = num_splits or decode_num_splits(n, hkv, q.device)
    block_n = block_n or decode_block_n(bs)
    if splits > 1:
        part_o = torch.empty((n, h, splits, d), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((n, h, splits, 2), dtype=torch.float32, device=q.device)
        if split_tokens is None:
            lens = context_lens.tolist()
            split_tokens = max(decode_split_tokens(max(lens), sum(lens), n, hkv, q.device, block_n),
                               -(-max(lens) // splits))
        if isinstance(split_tokens, int):
            split_tokens = torch.full((1,), split_tokens, dtype=torch.int64, device=q.device)
    else:
        part_o = part_ml = out  # unused
        split_tokens = context_lens  # unused
    _paged_decode_kernel[(n, hkv, splits)](
        q, k_cache, v_cache, block_tables, context_lens, split_tokens, out, part_o, part_ml, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        NUM_HEADS=h, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=d,
        HEAD_PAD=max(16, triton.next_power_of_2(d)), BLOCK_SIZE=bs, BLOCK_N=block_n, NUM_SPLITS=splits,
        # fp32 caches get exact fp32 dots (Triton would use TF32 and lose ~3 digits); 16-bit use tensor cores.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    if splits > 1:
        _merge_splits_kernel[(n, h)](
            part_o, part_ml, context_lens, split_tokens, out, out.stride(0), out.stride(1), NUM_HEADS=h,
            NUM_SPLITS=splits, HEAD_DIM=d, HEAD_PAD=max(16, triton.next_power_of_2(d)), num_warps=1,
        )
    return out


if triton is not None:

    # The block-table row stride is the widest table of the step: eager (mixed) steps vary it step by
    # step, and Triton would compile a variant per divisibility class mid-serving (~1 s each).
    @triton.jit(do_not_specialize=["sbt_n"])
    def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, len_ptr, split_ptr, out_ptr, po_ptr, pml_ptr, scale,
                             sq_n, sq_h, sk_blk, sk_tok, sk_head, sbt_n, so_n, so_h,
                             NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                             HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                             BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr):
        seq = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        ctx = tl.load(len_ptr + seq).to(tl.int32)
        if NUM_SPLITS == 1:
            lo = 0
            hi = ctx
            per = ctx
        else:
            per = tl.load(split_ptr).to(tl.int32)
            lo = tl.minimum(split * per, ctx)  # a split past the context runs no tile and stores nothing
            hi = tl.minimum(lo + per, ctx)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_PAD)
        g_ok = g < GROUP
        d_ok = d < HEAD_DIM
        heads = kvh * GROUP + g
        q = tl.load(q_ptr + seq * sq_n + heads[:, None] * sq_h + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_PAD], tl.float32)
        qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
        for start in range(lo, hi, BLOCK_N):
            tok = start + tl.arange(0, BLOCK_N)
            t_ok = tok < hi
            blk = tl.load(bt_ptr + seq * sbt_n + tok // BLOCK_SIZE, mask=t_ok, other=0).to(tl.int64)
            row = blk * sk_blk + (tok % BLOCK_SIZE) * sk_tok + kvh * sk_head
            kv_mask = t_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION).to(tl.float32) * qk_scale  # [GROUP_PAD, BLOCK_N]
            s = tl.where(t_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION).to(tl.float32)
            m_i = m_new
        hd_ok = g_ok[:, None] & d_ok[None, :]
        whole = ctx <= per  # the context fits one split: split 0 holds it all and writes the output
        if whole:
            acc = acc / l_i[:, None]
            tl.store(out_ptr + seq * so_n + heads[:, None] * so_h + d[None, :],
                     acc.to(out_ptr.dtype.element_ty), mask=hd_ok & (split == 0))
        else:  # partial results: unnormalized acc, running max (log2 units) and sum
            part = (seq * NUM_HEADS + heads) * NUM_SPLITS + split
            used = lo < hi
            tl.store(po_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=hd_ok & used)
            tl.store(pml_ptr + part * 2, m_i, mask=g_ok & used)
            tl.store(pml_ptr + part * 2 + 1, l_i, mask=g_ok & used)

    @triton.jit
    def _merge_splits_kernel(po_ptr, pml_ptr, len_ptr, split_ptr, out_ptr, so_n, so_h, NUM_HEADS: tl.constexpr,
                             NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr):
        seq = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        ctx = tl.load(len_ptr + seq).to(tl.int32)
        per = tl.load(split_ptr).to(tl.int32)
        if ctx > per:  # else the decode kernel wrote this row itself
            sp = tl.arange(0, NUM_SPLITS)
            sp_ok = sp * per < ctx
            d = tl.arange(0, HEAD_PAD)
            d_ok = d < HEAD_DIM
            part = (seq * NUM_HEADS + head) * NUM_SPLITS + sp
            m = tl.load(pml_ptr + part * 2, mask=sp_ok, other=float("-inf"))
            lsum = tl.load(pml_ptr + part * 2 + 1, mask=sp_ok, other=0.0)
            m_max = tl.max(m, 0)  # finite: split 0 always holds a token
            w = tl.math.exp2(m - m_max)  # splits past the context: exp2(-inf) = 0
            o = tl.load(po_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=sp_ok[:, None] & d_ok[None, :],
                        other=0.0)
            acc = tl.sum(w[:, None] * o, 0) / tl.sum(w * lsum, 0)
            tl.store(out_ptr + seq * so_n + head * so_h + d, acc.to(out_ptr.dtype.element_ty), mask=d_ok)
