"""small_m_linear (turbine/engine/models/gemv.py) against F.linear.

The kernel runs on CUDA, or on the CPU through Triton's interpreter with ``TRITON_INTERPRET=1``
(float16 only there: the interpreter's bfloat16 ``tl.dot`` is wrong); without either those tests
skip. Input validation runs everywhere: it raises before Triton is touched.
"""
from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from turbine.engine.models import gemv  # noqa: E402
from turbine.engine.models.gemv import GemvConfig, default_config, small_m_linear  # noqa: E402

pytestmark = pytest.mark.timeout(120)

_CUDA = torch.cuda.is_available()
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_kernel = pytest.mark.skipif(not ((_CUDA or _INTERPRET) and gemv.triton is not None),
                                  reason="the kernel needs CUDA and Triton (or TRITON_INTERPRET=1 on the CPU)")
DEV = "cuda" if _CUDA else "cpu"
DTYPES = [torch.float16] + ([torch.bfloat16] if _CUDA else [])

# (M, N, K, config): ragged N and K, split-K on and off, both paths, splits beyond K's tiles.
CASES = [
    (1, 256, 512, GemvConfig(block_n=32, block_k=128, split_k=1, dot=False)),
    (1, 100, 200, GemvConfig(block_n=32, block_k=64, split_k=3, dot=False)),
    (1, 96, 512, GemvConfig(block_n=32, block_k=64, split_k=2, dot=True)),
    (3, 100, 200, GemvConfig(block_n=32, block_k=64, split_k=1)),
    (3, 100, 200, GemvConfig(block_n=8, block_k=64, split_k=2, dot=False)),
    (8, 72, 512, GemvConfig(block_n=8, block_k=128, split_k=1, num_warps=4, dot=False)),
    (3, 100, 200, GemvConfig(block_n=32, block_k=64, split_k=3)),
    (16, 77, 300, GemvConfig(block_n=16, block_k=32, split_k=4)),
    (16, 128, 512, GemvConfig(block_n=64, block_k=128, split_k=2)),
    (5, 48, 64, GemvConfig(block_n=16, block_k=16, split_k=8)),
    (2, 40, 100, GemvConfig(block_n=16, block_k=32, split_k=3)),
    (7, 130, 1000, None),
]


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(m, k, device=DEV, generator=g).to(dtype)
    w = (torch.randn(n, k, device=DEV, generator=g) * 0.05).to(dtype)
    b = torch.randn(n, device=DEV, generator=g).to(dtype)
    return x, w, b


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref).abs().max() / ref.abs().max())


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"m{c[0]}n{c[1]}k{c[2]}")
def test_matches_linear(case, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    m, n, k, cfg = case
    x, w, b = _inputs(m, n, k, dtype)
    got = small_m_linear(x, w, config=cfg)
    assert got.shape == (m, n) and got.dtype == dtype
    assert _rel_err(got, F.linear(x.float(), w.float())) < 1e-2
    out = torch.full((m, n), float("nan"), device=DEV, dtype=dtype)  # an unwritten element fails
    small_m_linear(x, w, bias=b, out=out, config=cfg)
    assert _rel_err(out, F.linear(x.float(), w.float(), b.float())) < 1e-2


@needs_kernel
def test_out_slice_and_strided_x() -> None:
    """Writes exactly the given columns of a wider buffer; x may be a row-strided view."""
    x_wide, w, _ = _inputs(4, 64, 512, torch.float16)
    x = x_wide[:, :256]
    w = w[:, :256].contiguous()
    buf = torch.zeros(4, 100, device=DEV, dtype=torch.float16)
    small_m_linear(x, w, out=buf[:, 10:74], config=GemvConfig(block_n=16, block_k=64, split_k=2))
    assert _rel_err(buf[:, 10:74], F.linear(x.float(), w.float())) < 1e-2
    assert buf[:, :10].abs().max() == 0 and buf[:, 74:].abs().max() == 0


@needs_kernel
def test_split_k_is_deterministic() -> None:
    x, w, _ = _inputs(8, 96, 1024, torch.float16)
    cfg = GemvConfig(block_n=32, block_k=64, split_k=4)
    assert torch.equal(small_m_linear(x, w, config=cfg), small_m_linear(x, w, config=cfg))


@pytest.mark.skipif(not (_CUDA and gemv.triton is not None), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("split", [1, 4])
def test_cuda_graph_capture(split: int) -> None:
    """Captured once, replayed on new inputs: no host sync, nothing sized by data."""
    x, w, _ = _inputs(2, 512, 2048, torch.bfloat16)
    cfg = GemvConfig(block_n=64, block_k=128, split_k=split)
    small_m_linear(x, w, config=cfg)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = small_m_linear(x, w, config=cfg)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert _rel_err(y, F.linear(x.float(), w.float())) < 1e-2


@pytest.mark.skipif(not (_CUDA and gemv.triton is not None), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("cfg", [GemvConfig(block_n=16, block_k=256, num_warps=4, dot=False),
                                 GemvConfig(block_n=32, block_k=128, split_k=2)], ids=["reg", "dot-split"])
def test_chained_calls_in_a_graph_see_their_inputs(cfg: GemvConfig) -> None:
    """Each call reads the previous one's output: the early launch (PDL) must still wait for it."""
    x, w1, _ = _inputs(1, 2048, 2048, torch.bfloat16, seed=1)
    _, w2, _ = _inputs(1, 2048, 2048, torch.bfloat16, seed=2)
    small_m_linear(small_m_linear(x, w1, config=cfg), w2, config=cfg)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = x
        for i in range(6):
            y = small_m_linear(y, w1 if i % 2 == 0 else w2, config=cfg)  # kernel after kernel
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    ref = x.float()
    for i in range(6):
        ref = F.linear(ref, (w1 if i % 2 == 0 else w2).float()).to(torch.bfloat16).float()
    assert _rel_err(y, ref) < 3e-2


# -- validation and configs: no kernel, run everywhere ---------------------------------------------------
def _cpu(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype)


@pytest.mark.parametrize("args, kwargs, match", [
    ((_cpu(17, 64), _cpu(32, 64)), {}, "at most 16 rows"),
    ((_cpu(2, 64), _cpu(32, 48)), {}, "K=64"),
    ((_cpu(64), _cpu(32, 64)), {}, r"x \[M, K\]"),
    ((_cpu(2, 64, dtype=torch.float32), _cpu(32, 64, dtype=torch.float32)), {}, "bfloat16 or float16"),
    ((_cpu(2, 64), _cpu(32, 64, dtype=torch.bfloat16)), {}, "one dtype"),
    ((_cpu(2, 64), _cpu(64, 32).t()), {}, "contiguous weight"),
    ((_cpu(64, 2).t(), _cpu(32, 64)), {}, "last dimension contiguous"),
    ((_cpu(2, 64), _cpu(32, 64)), {"out": _cpu(2, 31)}, "out must be"),
    ((_cpu(2, 64), _cpu(32, 64)), {"out": _cpu(32, 2).t()}, "out needs"),
    ((_cpu(2, 64), _cpu(32, 64)), {"bias": _cpu(31)}, "bias must be"),
])
def test_rejects_bad_inputs(args, kwargs, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        small_m_linear(*args, **kwargs)


def test_rejects_cpu_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA tensors"):
        small_m_linear(_cpu(2, 64), _cpu(32, 64))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="register path tile"):
        GemvConfig(block_n=64, block_k=512, dot=False).validate(2)
    GemvConfig(block_n=8, block_k=128, dot=False).validate(8)
    with pytest.raises(ValueError, match="power of two"):
        GemvConfig(block_n=48).validate(1)
    with pytest.raises(ValueError, match=">= 16"):
        GemvConfig(block_n=8, dot=True).validate(1)
    GemvConfig(block_n=8, dot=False).validate(1)


def test_default_config_uses_tuned_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    one, few = GemvConfig(block_n=32, dot=False), GemvConfig(block_n=128, split_k=2)
    monkeypatch.setattr(gemv, "TUNED", {(4096, 4096): {1: one, 8: few}})
    assert default_config(1, 4096, 4096) == one
    assert default_config(3, 4096, 4096) == few and default_config(8, 4096, 4096) == few
    fallback = default_config(16, 4096, 4096)  # beyond every bound: the heuristic
    assert fallback.dot
    fallback.validate(16)
    assert default_config(16, 128256, 4096).split_k == 1
    for m, n, k in ((1, 4096, 4096), (1, 77, 40), (4, 77, 40), (16, 1024, 14336)):  # heuristics are valid configs
        default_config(m, n, k).validate(m)
