"""PagedAttention equals dense causal attention over each sequence's whole context."""
from __future__ import annotations

import os
import random

import pytest

torch = pytest.importorskip("torch")

from turbine.engine.kv_cache import KVCache, KVCacheSpec, num_blocks_for_bytes
from turbine.engine.paged_attention import (
    AttentionMetadata,
    CausalAttention,
    PagedAttention,
)

pytestmark = pytest.mark.timeout(60)

H, HKV, D, BS = 4, 2, 16, 4


def build_step(cache: KVCache, seqs: list[tuple[int, int]], layer: int, seed: int):
    """Write each sequence's cached prefix into random blocks; return metadata and the dense truth.

    ``seqs``: (cached, new) token counts; one-token sequences must come first (decode group).
    """
    g = torch.Generator().manual_seed(seed)
    free = list(range(cache.num_blocks))
    random.Random(seed).shuffle(free)
    qs, ks, vs, expected, slots, tables, clens = [], [], [], [], [], [], []
    for cached, new in seqs:
        total = cached + new
        table = [free.pop() for _ in range(-(-total // BS))]
        q = torch.randn(total, H, D, generator=g, dtype=torch.float64)
        k = torch.randn(total, HKV, D, generator=g, dtype=torch.float64)
        v = torch.randn(total, HKV, D, generator=g, dtype=torch.float64)
        seq_slots = torch.tensor([table[p // BS] * BS + p % BS for p in range(total)])
        cache.write(layer, seq_slots[:cached], k[:cached], v[:cached])
        # Dense truth in float64: query i of the new tokens sees keys 0 .. cached + i.
        kr, vr = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
        scores = torch.einsum("qhd,khd->hqk", q[cached:], kr) * D ** -0.5
        allowed = torch.arange(total)[None, :] <= torch.arange(cached, total)[:, None]
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        expected.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vr))
        qs.append(q[cached:])
        ks.append(k[cached:])
        vs.append(v[cached:])
        slots.append(seq_slots[cached:])
        tables.append(table)
        clens.append(total)
    width = max(len(t) for t in tables)
    qlens = [n for _, n in seqs]
    qstart = [0]
    for n in qlens:
        qstart.append(qstart[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots),
        query_start_loc=torch.tensor(qstart),
        context_lens=torch.tensor(clens),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        num_decodes=sum(1 for n in qlens if n == 1),
        query_lens_host=tuple(qlens),
        context_lens_host=tuple(clens),
    )
    dt = cache.spec.dtype
    return meta, torch.cat(qs).to(dt), torch.cat(ks).to(dt), torch.cat(vs).to(dt), torch.cat(expected)


def new_cache(num_blocks: int = 128, layers: int = 2, dtype=torch.float32) -> KVCache:  # type: ignore[no-untyped-def]
    return KVCache(KVCacheSpec(num_layers=layers, num_kv_heads=HKV, head_dim=D, block_size=BS, dtype=dtype),
                   num_blocks, "cpu")


# decodes (context 1, partial and exact blocks), a fresh prefill, prefills over a cached prefix
MIXED = [(0, 1), (6, 1), (7, 1), (16, 1), (30, 1), (0, 9), (8, 5), (13, 3), (3, 17)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paged_attention_matches_dense_reference(seed: int) -> None:
    cache = new_cache()
    attn = PagedAttention(cache, H, decode_kernel="torch")
    meta, q, k, v, expected = build_step(cache, MIXED, layer=1, seed=seed)
    attn.set_metadata(meta)
    out = attn.forward(1, q, k, v)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    # The step's k/v landed in their slots of layer 1 only.
    assert torch.equal(cache._k_slots[1][meta.slot_mapping], k)
    assert torch.equal(cache._v_slots[1][meta.slot_mapping], v)
    assert not cache.key(0).any()


def test_decode_batch_is_chunked_under_the_gather_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    import turbine.engine.paged_attention as pa

    monkeypatch.setattr(pa, "_GATHER_BUDGET_BYTES", 2000)  # about one sequence per chunk
    seqs = [(c, 1) for c in (3, 40, 9, 17, 0, 22)]
    cache = new_cache()
    attn = PagedAttention(cache, H, decode_kernel="torch")
    meta, q, k, v, expected = build_step(cache, seqs, layer=0, seed=5)
    attn.set_metadata(meta)
    torch.testing.assert_close(attn.forward(0, q, k, v).double(), expected, rtol=1e-4, atol=1e-5)


def test_causal_attention_is_the_uncached_special_case() -> None:
    cache = new_cache()
    seqs = [(0, 7), (0, 12)]
    _, q, k, v, expected = build_step(cache, seqs, layer=0, seed=3)
    out = CausalAttention([7, 12]).forward(0, q, k, v)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="cover"):
        CausalAttention([7]).forward(0, q, k, v)


def test_kv_cache_layout_and_sizing() -> None:
    spec = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=8, block_size=16, dtype=torch.bfloat16)
    assert spec.bytes_per_token == 3 * 2 * 2 * 8 * 2
    assert spec.bytes_per_block == spec.bytes_per_token * 16
    assert num_blocks_for_bytes(spec, spec.bytes_per_block * 5 + 1) == 5
    assert num_blocks_for_bytes(spec, -10) == 0
    cache = KVCache(spec, 5, "cpu")
    assert cache.key(2).shape == (5, 16, 2, 8) and cache.nbytes == 5 * spec.bytes_per_block
    # One block of one layer is contiguous: what a transfer copies.
    assert cache.key(1)[3].is_contiguous()
    k = torch.ones(2, 2, 8)
    cache.write(2, torch.tensor([3 * 16 + 5, 17]), k, 2 * k)
    assert cache.key(2)[3, 5].eq(1).all() and cache.value(2)[1, 1].eq(2).all()
    assert int(cache.data.ne(0).sum()) == 4 * 16
    with pytest.raises(ValueError):
        KVCache(spec, 0, "cpu")
    with pytest.raises(ValueError):
        KVCacheSpec(num_layers=0, num_kv_heads=2, head_dim=8, block_size=16, dtype=torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        PagedAttention(new_cache(), 3)


@pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET") and not torch.cuda.is_available(),
                    reason="the Triton kernel needs CUDA (or TRITON_INTERPRET=1 to run on the CPU)")
def test_triton_decode_kernel_matches_torch() -> None:
    pytest.importorskip("triton")
    from turbine.engine.decode_kernel import paged_decode_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = [(torch.float32, 1e-4), (torch.float16, 5e-3)]
    if device == "cuda":  # the CPU interpreter has no bfloat16
        cases.append((torch.bfloat16, 2e-2))
    for dtype, tol in cases:
        cache = new_cache(dtype=dtype)
        seqs = [(c, 1) for c in (0, 3, 4, 15, 64, 101, 7)]
        meta, q, k, v, expected = build_step(cache, seqs, layer=0, seed=11)
        cache.write(0, meta.slot_mapping, k, v)
        if device == "cuda":
            cache.data = cache.data.cuda()
        kc, vc = cache.data[0, 0], cache.data[0, 1]
        # either launch order, one KV head per program or both read together (cross-head scores masked),
        # whole contexts or cut in 8-token splits merged by log-sum-exp: the same attention
        for heads_fastest, per_program, splits in ((False, 1, None), (True, 1, None), (False, 2, None),
                                                   (True, 2, None), (False, 2, 16), (True, 1, 16)):
            cut = {"num_splits": 16, "split_tokens": 8} if splits else {}
            out = paged_decode_triton(q.to(device), kc, vc, meta.block_tables.to(device),
                                      meta.context_lens.to(device), D ** -0.5, heads_fastest=heads_fastest,
                                      kv_heads_per_program=per_program, **cut)
            torch.testing.assert_close(out.double().cpu(), expected, rtol=tol, atol=tol)
