"""The CUDA fast paths against the torch paths they replace.

Triton kernels (fused RMSNorm/residual, SiLU*up, RoPE in place, KV write, split-context paged
decode) run on CUDA, or on the CPU through Triton's interpreter with ``TRITON_INTERPRET=1``;
without either they are skipped. Each compares with the plain torch computation on fresh random
inputs, with outputs poisoned first so an unwritten element fails.
"""
from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.timeout(120)

_CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not (_CUDA or os.environ.get("TRITON_INTERPRET")),
                                  reason="Triton kernels need CUDA (or TRITON_INTERPRET=1 on the CPU)")
DEV = "cuda" if _CUDA else "cpu"
# The CPU interpreter has no bfloat16 arithmetic; CUDA checks it too.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if _CUDA else [])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_and_residual_match_torch(dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    from turbine.engine.models.layers import RMSNorm, rms_norm_triton

    g = _gen(0)
    norm = RMSNorm(96, 1e-5).to(DEV, dtype)
    norm.weight.data = torch.randn(96, device=DEV, generator=g).to(dtype)
    x = torch.randn(7, 96, device=DEV, generator=g).to(dtype) * 3
    r = torch.randn(7, 96, device=DEV, generator=g).to(dtype)
    with torch.no_grad():
        ref = norm._norm(x)
        got = rms_norm_triton(x, norm.weight, 1e-5)
        ref_out, ref_res = norm._norm(x + r), x + r
        out, res = rms_norm_triton(x, norm.weight, 1e-5, r)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    assert torch.equal(res, ref_res)  # the residual stream is one rounded add, bit for bit
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_torch(dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    import torch.nn.functional as F

    from turbine.engine.models.layers import silu_and_mul_triton

    x = (torch.randn(5, 2 * 1500, device=DEV, generator=_gen(1)) * 4).to(dtype)
    gate, up = x.chunk(2, dim=-1)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(silu_and_mul_triton(x), F.silu(gate) * up, rtol=tol, atol=tol)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_in_place_on_qkv_views_matches_apply_rotary(dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    from turbine.engine.models.config import RopeScaling
    from turbine.engine.models.layers import RotaryEmbedding, apply_rotary, rope_triton_

    hq, hk, d, t = 6, 2, 32, 9
    rot = RotaryEmbedding(d, 500000.0, RopeScaling(rope_type="llama3", factor=8.0,
                                                   original_max_position_embeddings=64), 4096).to(DEV)
    qkv = torch.randn(t, (hq + 2 * hk) * d, device=DEV, generator=_gen(2)).to(dtype)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q, k = q.view(t, hq, d), k.view(t, hk, d)
    positions = torch.tensor([0, 1, 2, 17, 100, 511, 2047, 3000, 4095], device=DEV)
    cos, sin = rot(positions, dtype)
    ref_q, ref_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    v_before = v.clone()
    tab_cos, tab_sin = rot(torch.arange(4096, device=DEV), dtype)
    rope_triton_(q, k, positions, tab_cos[:, 0].contiguous(), tab_sin[:, 0].contiguous())
    # Same rounding steps as torch: equal up to the odd last-bit difference of a fused multiply-add.
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(q, ref_q, rtol=tol, atol=tol)
    torch.testing.assert_close(k, ref_k, rtol=tol, atol=tol)
    assert torch.equal(v, v_before)


@needs_triton
def test_kv_write_kernel_matches_index_copy() -> None:
    pytest.importorskip("triton")
    from turbine.engine.kv_cache import write_kv_triton

    g = _gen(3)
    kv = torch.randn(6, 3 * 2 * 16, device=DEV, generator=g)
    k = kv[:, :32].view(6, 2, 16)[:, :, :]  # strided views, as the qkv projection hands them
    v = kv[:, 32:64].view(6, 2, 16)
    slots = torch.tensor([5, 0, 33, 12, 63, 40], device=DEV)
    kc, vc = torch.full((64, 2, 16), -7.0, device=DEV), torch.full((64, 2, 16), -7.0, device=DEV)
    write_kv_triton(k, v, kc, vc, slots)
    ek, ev = torch.full_like(kc, -7.0), torch.full_like(vc, -7.0)
    ek.index_copy_(0, slots, k)
    ev.index_copy_(0, slots, v)
    assert torch.equal(kc, ek) and torch.equal(vc, ev)


def _decode_case(dtype: torch.dtype, ctxs: list[int], seed: int, h: int = 8, hkv: int = 2, d: int = 32,
                 bs: int = 4, num_blocks: int = 1024):
    g = _gen(seed)
    kc = torch.randn(num_blocks, bs, hkv, d, device=DEV, generator=g).to(dtype)
    vc = torch.randn(num_blocks, bs, hkv, d, device=DEV, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, device=DEV, generator=g)
    width = max(-(-c // bs) for c in ctxs)
    tables = perm[:len(ctxs) * width].view(len(ctxs), width)
    q = torch.randn(len(ctxs), h, d, device=DEV, generator=g).to(dtype)
    ref = torch.empty(len(ctxs), h, d, dtype=torch.float64)
    for i, c in enumerate(ctxs):
        rows = tables[i, :-(-c // bs)]
        kk = kc[rows].flatten(0, 1)[:c].double().cpu().repeat_interleave(h // hkv, 1)
        vv = vc[rows].flatten(0, 1)[:c].double().cpu().repeat_interleave(h // hkv, 1)
        p = (torch.einsum("hd,khd->hk", q[i].double().cpu(), kk) * d ** -0.5).softmax(-1)
        ref[i] = torch.einsum("hk,khd->hd", p, vv)
    return q, kc, vc, tables, torch.tensor(ctxs, device=DEV), ref


@needs_triton
@pytest.mark.parametrize("splits", [1, 2, 8])
def test_split_context_decode_matches_reference(splits: int) -> None:
    pytest.importorskip("triton")
    from turbine.engine.decode_kernel import paged_decode_triton

    ctxs = [1, 3, 4, 5, 63, 64, 65, 130, 300]  # one token, partial blocks, tile edges, splits left empty
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 5e-3)):
        q, kc, vc, tables, lens, ref = _decode_case(dtype, ctxs, seed=splits)
        out = torch.full_like(q, float("nan"))
        paged_decode_triton(q, kc, vc, tables, lens, q.shape[-1] ** -0.5, out=out, num_splits=splits, block_n=16)
        torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol)
        # a row-slice output (the mixed-step layout) and the default split choice agree too
        big = torch.full((len(ctxs) + 3, *q.shape[1:]), float("nan"), dtype=dtype, device=DEV)
        paged_decode_triton(q, kc, vc, tables, lens, q.shape[-1] ** -0.5, out=big[:len(ctxs)])
        torch.testing.assert_close(big[:len(ctxs)].double().cpu(), ref, rtol=tol, atol=tol)


@needs_triton
def test_one_split_length_for_mixed_contexts_matches_reference() -> None:
    """A step's split length is shared: short contexts fit split 0 and write their rows
    directly, a long one spreads over every split and is merged; splits past a context stay
    empty. The split length arrives as a device tensor, as a CUDA graph passes it."""
    pytest.importorskip("triton")
    from turbine.engine.decode_kernel import paged_decode_triton

    ctxs = [700, 3, 16, 17, 48, 49, 200]
    q, kc, vc, tables, lens, ref = _decode_case(torch.float32, ctxs, seed=11, num_blocks=2048)
    for split in (176, 48, 16 * 44):  # the longest over 4, over ~15, in one split
        out = torch.full_like(q, float("nan"))
        paged_decode_triton(q, kc, vc, tables, lens, q.shape[-1] ** -0.5, out=out, num_splits=16, block_n=16,
                            split_tokens=torch.tensor([split], device=DEV))
        torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-4, atol=1e-4)


def test_decode_splits_cover_the_longest_context_and_balance_mixed_lengths() -> None:
    from turbine.engine.decode_kernel import decode_num_splits, decode_split_tokens

    cpu = torch.device("cpu")  # counts as 8 SMs: 32 programs wanted
    assert decode_num_splits(1, 2, cpu) == 16
    assert decode_num_splits(4, 2, cpu) == 4
    assert decode_num_splits(16, 2, cpu) == 1
    assert all(decode_num_splits(n, 8, cpu) in (1, 2, 4, 8, 16) for n in range(1, 300))
    # 3 sequences (grid of 4, 2 KV heads: 4 splits): one long context among short ones
    split = decode_split_tokens(4000, 4000 + 2 * 100, 4, 2, cpu, 64)
    assert split % 64 == 0 and 4 * split >= 4000
    assert split < 4000 // 2  # the long one spreads over more than two programs
    # the step's work sets a floor: no split shorter than an even share of it per program
    assert decode_split_tokens(4000, 10000, 3, 2, cpu, 64) >= 10000 * 2 / 32
    # even lengths a little over that share stay whole instead of leaving every sequence a stub
    assert decode_split_tokens(1100, 13 * 1100, 13, 2, cpu, 64) >= 1100


def test_two_kv_heads_a_program_only_once_the_batch_fills_the_gpu() -> None:
    from turbine.engine.decode_kernel import (
        decode_num_splits,
        decode_split_tokens,
        decode_tile_tokens,
        heads_per_program,
    )

    cpu = torch.device("cpu")  # 8 SMs: 32 programs wanted
    assert heads_per_program(8, 8, cpu) == 2  # 8 sequences x 4 head pairs fill it
    assert heads_per_program(8, 7, cpu) == 1  # 28 programs would not: one head a program, splits instead
    assert heads_per_program(3, 100, cpu) == 1  # 2 does not divide 3 KV heads
    assert heads_per_program(1, 100, cpu) == 1
    # the grid's programs and the split's tile follow the same choice
    assert decode_num_splits(8, 8, cpu) == 1 and decode_num_splits(7, 8, cpu) == 1
    assert decode_tile_tokens(16, 8, 8, cpu) == 32 and decode_tile_tokens(16, 8, 7, cpu) == 64
    assert decode_split_tokens(1000, 8 * 1000, 8, 8, cpu, 32) >= 1000  # one split covers each context


@needs_triton
def test_model_forward_with_fused_layers_matches_torch_layers(real_tiny_dir, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The decoder with every fused kernel on (forced on the CPU under the interpreter) computes
    the same logits as with the torch ops: the residual stream and the RoPE tables are wired right."""
    pytest.importorskip("triton")
    from turbine.engine.loader import load_model
    from turbine.engine.models import layers
    from turbine.engine.paged_attention import CausalAttention

    model, _ = load_model(real_tiny_dir, dtype=torch.float32, device=DEV)
    ids = torch.randint(0, 256, (2 * 11,), generator=torch.Generator().manual_seed(4)).to(DEV)
    pos = torch.cat([torch.arange(11), torch.arange(100, 111)]).to(DEV)
    with torch.inference_mode():
        monkeypatch.setattr(layers, "_FUSED", False)
        ref = model.compute_logits(model.forward(ids, pos, CausalAttention([11, 11])))
        monkeypatch.setattr(layers, "_FUSED", True)
        if not _CUDA:
            monkeypatch.setattr(layers, "_fused", lambda x: True)
        got = model.compute_logits(model.forward(ids, pos, CausalAttention([11, 11])))
    assert model.rotary._tables is not None  # the fused path ran
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
