"""Sampler: greedy, bans, seeded reproducibility whatever the batch, top-k/top-p bounds, distribution."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from turbine.engine.sampler import (
    Sampler,
    SamplingBatch,
    check_sampling_options,
    hashed_uniform,
)
from turbine.protocols.generate import SamplingOptions

V = 50


def logits_rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def sample(logits: torch.Tensor, opts: list[SamplingOptions], positions: list[int] | None = None,
           banned: list[list[int]] | None = None, sampler_seed: int = 0) -> list[int]:
    batch = SamplingBatch.build(opts, positions or [0] * len(opts), vocab_size=V, device="cpu", banned=banned)
    return Sampler("cpu", sampler_seed)(logits, batch).tolist()


def test_greedy_rows_take_the_argmax_and_banned_ids_are_never_sampled() -> None:
    logits = logits_rows(6)
    greedy = SamplingOptions(temperature=0.0)
    assert sample(logits, [greedy] * 6) == logits.argmax(-1).tolist()
    top = logits.argmax(-1).tolist()
    got = sample(logits, [greedy] * 6, banned=[[top[0]], [], [top[2], 999], [], [], []])
    second = logits.topk(2, -1).indices[:, 1].tolist()
    assert got[0] == second[0] and got[2] == second[2] and got[1] == top[1]
    # Banned ids stay banned under sampling too, whatever the noise.
    hot = [SamplingOptions(temperature=5.0, seed=s) for s in range(6)]
    for pos in range(30):
        assert not set(sample(logits, hot, [pos] * 6, banned=[list(range(25))] * 6)) & set(range(25))


def test_logits_in_the_model_dtype_sample_as_their_float32_copy() -> None:
    """The model hands bf16/fp16 logits over uncast: greedy rows (argmax of the 16-bit values) and
    seeded sampled rows (cast to float32 inside) give what the float32 copy gives, bans included."""
    for dtype in (torch.bfloat16, torch.float16):
        low = (logits_rows(6, seed=3) * 2).to(dtype)
        low[1, 7] = low[1, 9] = low[1].max() + 1  # a tie: the first index wins either way
        wide = low.float()
        greedy = [SamplingOptions(temperature=0.0)] * 6
        banned = [[int(wide[0].argmax())], [], [], [], [], []]
        assert sample(low, greedy, banned=banned) == sample(wide, greedy, banned=banned)
        assert sample(low, greedy)[1] == 7
        mixed = [SamplingOptions(temperature=0.0), SamplingOptions(temperature=0.8, seed=5, top_p=0.9)] * 3
        for pos in range(5):
            assert sample(low, mixed, [pos] * 6) == sample(wide, mixed, [pos] * 6)


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch() -> None:
    logits = logits_rows(8, seed=1)
    me = SamplingOptions(temperature=1.0, top_p=0.9, top_k=20, seed=1234)
    for pos in range(10):
        alone = sample(logits[3:4], [me], [pos], sampler_seed=1)[0]
        others = [SamplingOptions(temperature=0.7 + 0.1 * i, seed=i if i % 2 else None) for i in range(8)]
        others[5] = me
        rows = logits.clone()
        rows[5] = logits[3]
        batched = sample(rows, others, [7 * i for i in range(8)][:5] + [pos] + [1, 2], sampler_seed=99)
        assert batched[5] == alone
    # A different seed or position draws different noise.
    draws = {sample(logits[3:4], [SamplingOptions(temperature=5.0, seed=s)], [0])[0] for s in range(40)}
    assert len(draws) > 5
    # Big and negative seeds are folded into 64 bits, never an error.
    sample(logits[:2], [SamplingOptions(temperature=1.0, seed=-1), SamplingOptions(temperature=1.0, seed=1 << 70)])


def test_sampled_ids_stay_within_top_k() -> None:
    logits = logits_rows(4, seed=2)
    ks = [1, 3, 10, 0]
    opts = [SamplingOptions(temperature=10.0, top_k=k, seed=17 + i) for i, k in enumerate(ks)]
    seen: list[set[int]] = [set() for _ in ks]
    for pos in range(200):
        for i, t in enumerate(sample(logits, opts, [pos] * 4)):
            seen[i].add(t)
    for i, k in enumerate(ks[:3]):
        allowed = set(logits[i].topk(k).indices.tolist())
        assert seen[i] <= allowed
        assert len(seen[i]) == k  # hot enough to reach every allowed id in 200 draws
    assert len(seen[3]) > 10  # top_k 0 = disabled


def test_sampled_ids_stay_within_the_nucleus() -> None:
    logits = logits_rows(3, seed=3)
    ps = [0.3, 0.8, 1.0]
    opts = [SamplingOptions(temperature=1.5, top_p=p, seed=5 + i) for i, p in enumerate(ps)]
    seen: list[set[int]] = [set() for _ in ps]
    for pos in range(300):
        for i, t in enumerate(sample(logits, opts, [pos] * 3)):
            seen[i].add(t)
    for i, p in enumerate(ps[:2]):
        probs = (logits[i].double() / 1.5).softmax(-1)
        order = probs.argsort(descending=True).tolist()
        nucleus, mass = set(), 0.0
        for t in order:  # the smallest prefix whose mass reaches p
            nucleus.add(t)
            mass += float(probs[t])
            if mass >= p:
                break
        assert seen[i] <= nucleus
        assert len(seen[i]) >= min(2, len(nucleus))
    assert len(seen[2]) > len(seen[1])


def test_samples_follow_the_softmax_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-30.0] * (V - 4)])
    probs = logits[0, :4].softmax(-1)
    n = 4000
    counts = torch.zeros(V)
    opts = [SamplingOptions(temperature=1.0, seed=42)]
    batch_logits = logits.expand(n, V).contiguous()
    tokens = Sampler("cpu", 0)(batch_logits, SamplingBatch.build(opts * n, list(range(n)), vocab_size=V,
                                                                 device="cpu"))
    counts.index_add_(0, tokens, torch.ones(n))
    freq = counts[:4] / n
    assert (freq - probs).abs().max() < 0.03, (freq, probs)
    # Unseeded rows use the sampler's generator: the same sampler seed replays them.
    unseeded = [SamplingOptions(temperature=1.0)] * 64
    a = sample(logits.expand(64, V), unseeded, sampler_seed=7)
    assert a == sample(logits.expand(64, V), unseeded, sampler_seed=7)
    assert len(set(a)) > 1


def test_hashed_uniform_is_uniform_and_a_pure_function() -> None:
    seeds = torch.tensor([0, 1, -5, 1 << 40])
    pos = torch.tensor([0, 0, 3, 9])
    u = hashed_uniform(seeds, pos, 4096)
    assert u.shape == (4, 4096) and float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert torch.equal(u, hashed_uniform(seeds, pos, 4096))
    assert not torch.equal(u[0], u[1])
    assert not torch.equal(hashed_uniform(seeds[:1], pos[:1] + 1, 4096)[0], u[0])


@pytest.mark.parametrize("kw", [{"temperature": -0.1}, {"temperature": float("nan")}, {"top_p": 0.0},
                                {"top_p": 1.5}, {"top_k": -1}])
def test_invalid_options_are_refused(kw: dict) -> None:
    with pytest.raises(ValueError):
        check_sampling_options(SamplingOptions(**kw))
