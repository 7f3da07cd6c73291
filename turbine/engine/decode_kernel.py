"""The Triton paged-decode kernel (CUDA): one query per sequence over its paged KV, read in place.

Flash-decoding: a sequence's context is cut into splits of one length for the whole step
(``decode_split_tokens``), each split one program per KV head computing all query heads of its
group with an online softmax; a second kernel merges the splits of a sequence by log-sum-exp. A
context within one split is written directly. One length per step, not per sequence: in a batch
of mixed lengths a long context spreads over several programs instead of setting every layer's
critical path alone (per-sequence splits give each sequence the same count of programs). The
grid depends on the batch size only (``decode_num_splits``) and the bounds come from device
tensors, so a CUDA graph captured for a batch size serves every context length.
"""
from __future__ import annotations

import torch

try:  # the Triton decode kernel is an accelerator, never a requirement
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

__all__ = ["HAS_TRITON", "decode_block_n", "decode_num_splits", "decode_split_tokens", "decode_tile_tokens",
           "heads_per_program", "paged_decode_triton"]

HAS_TRITON = triton is not None
_MAX_SPLITS = 16
_WAVES = 4  # decode programs per SM the split policy aims for
# Launch defaults (the benchmark's tuning sets them before graphs are captured).
NUM_WARPS = 4
NUM_STAGES = 3
HEADS_FASTEST = True  # launch order of the decode grid (see paged_decode_triton)
BLOCK_N: int | None = None  # tile rows (None: ``decode_block_n``'s choice for the block size)
# KV heads one program reads together once the batch alone fills the GPU: its loads cover that
# many neighbouring 256-byte head slices of each cache row (the cache is [block, token, head, dim]).
# H200, Llama-3-8B heads, ~1.1k context: 2 heads and the heads-fastest grid take batch 256's decode
# attention from 276 to 265 us a layer, the measured copy bandwidth (bench/gpu_perf.py --decode-only);
# smaller batches keep 1, since halving the programs there costs more splits than wider loads gain.
KV_HEADS_PER_PROGRAM = 2
_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def heads_per_program(num_kv_heads: int, num_seqs: int, device: torch.device) -> int:
    """KV heads per decode program for a grid of ``num_seqs`` sequences: ``KV_HEADS_PER_PROGRAM``
    (or the largest power of two below it dividing the KV heads) when the batch still gives
    ``_WAVES`` programs per SM without splits, else 1. Depends on the batch size only (graphs)."""
    h = max(1, KV_HEADS_PER_PROGRAM)
    while num_kv_heads % h:
        h //= 2
    if h > 1 and num_seqs * (num_kv_heads // h) < _WAVES * _sm_count(device):
        return 1
    return h


def decode_num_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """The most context splits per (sequence, KV head): a power of two up to 16, the fewest that
    give ``_WAVES`` programs per SM (1 once the batch alone does). Depends on the batch size
    only, so a CUDA graph captured for a batch size keeps a valid grid for any context lengths;
    how many splits a sequence really uses follows from ``decode_split_tokens``."""
    target = _WAVES * _sm_count(device)
    groups = num_kv_heads // heads_per_program(num_kv_heads, num_seqs, device)  # programs per (sequence, split)
    splits = 1
    while splits < _MAX_SPLITS and num_seqs * groups * splits < target:
        splits *= 2
    return splits


def decode_block_n(block_size: int) -> int:
    """Rows of a tile of the decode kernel's loop, (token, KV head) pairs: a few KV blocks' worth
    for one head. A program reading h heads together covers rows / h tokens a tile."""
    if BLOCK_N:
        return BLOCK_N
    return max(16, min(64, (1 << max(0, block_size - 1).bit_length()) * 4))


def decode_tile_tokens(block_size: int, num_kv_heads: int, num_seqs: int, device: torch.device) -> int:
    """Tokens per tile of the decode kernel for a grid of ``num_seqs`` (split lengths are multiples of it)."""
    return max(1, decode_block_n(block_size) // heads_per_program(num_kv_heads, num_seqs, device))


def decode_split_tokens(longest: int, total: int, grid_seqs: int, num_kv_heads: int, device: torch.device,
                        block_n: int) -> int:
    """Tokens per context split for one decode step (contexts: ``longest`` the longest, ``total``
    their sum), the same for every sequence: long enough that ``decode_num_splits(grid_seqs)`` splits cover the longest context, and that the step's
    work (all contexts, every KV head) fills ``_WAVES`` programs per SM, rounded up to tiles.
    A sequence of c tokens runs ceil(c / split) programs, so in a batch of mixed lengths the
    longest no longer runs alone on one SM while the rest finish (a per-sequence split would
    give every sequence the same count of programs, each as long as its context allows)."""
    splits = decode_num_splits(grid_seqs, num_kv_heads, device)
    groups = num_kv_heads // heads_per_program(num_kv_heads, grid_seqs, device)
    per_program = -(-total * groups // (_WAVES * _sm_count(device)))
    split = max(-(-longest // splits), per_program, 1)
    if 4 * longest <= 5 * split:  # within a quarter of one split: no context is cut for a stub
        split = longest
    return -(-split // block_n) * block_n


def paged_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float, *,
                        out: torch.Tensor | None = None, num_splits: int | None = None,
                        split_tokens: torch.Tensor | int | None = None, block_n: int | None = None,
                        num_warps: int | None = None, num_stages: int | None = None,
                        heads_fastest: bool | None = None, kv_heads_per_program: int | None = None) -> torch.Tensor:
    """One query per sequence over its paged context, read in place (no gather).

    q [N, H, D] (D contiguous); k/v_cache [num_blocks, B, Hkv, D]; block_tables [N, max_blocks];
    context_lens [N] (>= 1 each). One program per (sequence, KV head, split) computes all query
    heads of its group with an online softmax over tiles of BLOCK_N tokens. Split s covers tokens
    [s * split_tokens, (s + 1) * split_tokens): a sequence within one split writes its output
    directly, longer ones leave partial results that a second kernel merges by their log-sum-exp.
    ``split_tokens`` (a [1] device tensor in a CUDA graph) times ``num_splits`` must cover the
    longest context; None derives it with ``decode_split_tokens`` from a host copy of the lengths.
    ``heads_fastest``: launch a sequence's KV-head programs next to each other (grid (Hkv, N, S)),
    so the programs running at once read neighbouring 256-byte slices of the same cache rows.
    ``kv_heads_per_program`` (h): one program reads h neighbouring KV heads of each token, a tile
    of ``block_n`` (token, head) rows, and computes their h query groups at once; scores across
    heads are masked, so with h * group <= 16 query rows it does no more tensor work than h = 1.
    None for ``num_warps``, ``num_stages``, ``heads_fastest`` or ``kv_heads_per_program``: the
    module's defaults above.
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
    hpp = heads_per_program(hkv, n, q.device) if kv_heads_per_program is None else kv_heads_per_program
    if hkv % hpp or block_n % hpp:
        raise ValueError(f"{hpp} KV heads per program must divide the KV heads ({hkv}) and the tile ({block_n})")
    tile_tokens = block_n // hpp
    if splits > 1:
        part_o = torch.empty((n, h, splits, d), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((n, h, splits, 2), dtype=torch.float32, device=q.device)
        if split_tokens is None:
            lens = context_lens.tolist()
            split_tokens = max(decode_split_tokens(max(lens), sum(lens), n, hkv, q.device, tile_tokens),
                               -(-max(lens) // splits))
        if isinstance(split_tokens, int):
            split_tokens = torch.full((1,), split_tokens, dtype=torch.int64, device=q.device)
    else:
        part_o = part_ml = out  # unused
        split_tokens = context_lens  # unused
    heads_fastest = HEADS_FASTEST if heads_fastest is None else heads_fastest
    num_warps = num_warps or NUM_WARPS
    num_stages = num_stages or NUM_STAGES
    groups = hkv // hpp
    _paged_decode_kernel[(groups, n, splits) if heads_fastest else (n, groups, splits)](
        q, k_cache, v_cache, block_tables, context_lens, split_tokens, out, part_o, part_ml, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        NUM_HEADS=h, GROUP=group, HEADS=hpp, QROWS=max(16, triton.next_power_of_2(group * hpp)), HEAD_DIM=d,
        HEAD_PAD=max(16, triton.next_power_of_2(d)), BLOCK_SIZE=bs, TILE_TOKENS=tile_tokens, NUM_SPLITS=splits,
        # fp32 caches get exact fp32 dots (Triton would use TF32 and lose ~3 digits); 16-bit use tensor cores.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", HEADS_FASTEST=heads_fastest,
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
                             NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEADS: tl.constexpr, QROWS: tl.constexpr,
                             HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                             TILE_TOKENS: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                             HEADS_FASTEST: tl.constexpr):
        if HEADS_FASTEST:
            seq = tl.program_id(1).to(tl.int64)
            kvg = tl.program_id(0)
        else:
            seq = tl.program_id(0).to(tl.int64)
            kvg = tl.program_id(1)
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
        kvh0 = kvg * HEADS  # this program's KV heads: kvh0 .. kvh0 + HEADS - 1
        g = tl.arange(0, QROWS)  # query rows: heads kvh0 * GROUP + g, GROUP of them per KV head
        d = tl.arange(0, HEAD_PAD)
        g_ok = g < GROUP * HEADS
        d_ok = d < HEAD_DIM
        heads = kvh0 * GROUP + g
        row_head = tl.minimum(g // GROUP, HEADS - 1)  # padding rows (q = 0) ride with the last head
        q = tl.load(q_ptr + seq * sq_n + heads[:, None] * sq_h + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([QROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([QROWS], tl.float32)
        acc = tl.zeros([QROWS, HEAD_PAD], tl.float32)
        qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
        r = tl.arange(0, TILE_TOKENS * HEADS)  # tile rows in cache order: token r // HEADS, KV head r % HEADS
        r_tok = r // HEADS
        r_head = r % HEADS
        same_head = row_head[:, None] == r_head[None, :]
        for start in range(lo, hi, TILE_TOKENS):
            tok = start + r_tok
            t_ok = tok < hi
            blk = tl.load(bt_ptr + seq * sbt_n + tok // BLOCK_SIZE, mask=t_ok, other=0).to(tl.int64)
            row = blk * sk_blk + (tok % BLOCK_SIZE) * sk_tok + (kvh0 + r_head) * sk_head
            kv_mask = t_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION).to(tl.float32) * qk_scale  # [QROWS, rows]
            s = tl.where(t_ok[None, :] & same_head, s, float("-inf"))
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
