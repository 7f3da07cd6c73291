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

- Decode group: one batched call. On CUDA the Triton kernel of decode_kernel.py reads blocks in
  place, split along the context by one length for the whole step (``AttentionMetadata.
  decode_split``); CUDA-graph safe. Elsewhere: SDPA over gathered blocks.
- Prefills: on CUDA in 16-bit, ONE varlen flash-attention call per layer for all of them
  (``PrefillLayout``; bottom-right causal, grouped-query heads native; a cached prefix is
  gathered from the cache first). Elsewhere, or if that kernel is missing: one SDPA per sequence.
Lengths the host needs are host mirrors: a step never waits on the device to read its layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from turbine.engine.decode_kernel import HAS_TRITON, paged_decode_triton
from turbine.engine.kv_cache import KVCache

__all__ = ["AttentionMetadata", "CausalAttention", "PagedAttention", "PrefillLayout", "flash_varlen_available",
           "triton_available"]

_GATHER_BUDGET_BYTES = 256 << 20  # portable decode: gather at most this much K+V per chunk
_TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
_SDPA_GQA = _TORCH_VERSION >= (2, 5)


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
    return HAS_TRITON and torch.cuda.is_available()


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
        if decode_kernel == "triton" and not HAS_TRITON:
            raise ValueError("decode_kernel='triton' but triton is not installed")
        self.kv_cache = kv_cache
        self.num_heads = num_heads
        self.scale = scale if scale is not None else spec.head_dim ** -0.5
        self.use_triton = decode_kernel == "triton" or (decode_kernel == "auto" and on_cuda and HAS_TRITON)
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
