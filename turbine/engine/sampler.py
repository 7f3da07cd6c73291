"""Token sampling on the device for a step's last-token logits: one batched pass, no host sync.

    logits [N, V] ─ ban (min_tokens) ─▶ greedy rows: argmax
                                     └▶ others: / temperature ─ top-k ─ top-p ─ + Gumbel noise ─ argmax

Gumbel-max (``argmax(logits / T - log E)``, ``E ~ Exp(1)``) samples from the softmax without a
multinomial. A request with a seed draws its noise from a counter-based hash of
``(seed, output position, token id)``: its tokens depend on nothing else, so they are the same
whatever else shares the batch, and the same again after a preemption recomputes the sequence.
Unseeded rows draw from the sampler's own generator.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from turbine.protocols.generate import SamplingOptions

__all__ = ["Sampler", "SamplingBatch", "check_sampling_options", "hashed_uniform"]

_M32 = 0xFFFFFFFF
_NEG_INF = float("-inf")


def check_sampling_options(opts: SamplingOptions) -> None:
    """ValueError for options no sampler can honour (the request is refused up front)."""
    if not opts.temperature >= 0 or opts.temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0, got {opts.temperature}")
    if not 0.0 < opts.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {opts.top_p}")
    if opts.top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = disabled), got {opts.top_k}")


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (lowbias32) on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32  # int64 products wrap; their low 32 bits are exact
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def hashed_uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[n, vocab_size]`` float32 uniforms in (0, 1), a pure function of (seed, position, id).

    ``seeds`` holds 64-bit seeds as int64 (two's complement), ``positions`` int64.
    """
    lo = seeds & _M32
    hi = (seeds >> 32) & _M32
    key = _mix32(_mix32(_mix32(positions & _M32) ^ lo) ^ hi)
    cols = _mix32(torch.arange(vocab_size, device=seeds.device, dtype=torch.int64) ^ 0x9E3779B9)
    h = _mix32(key[:, None] ^ cols[None, :])
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def _to_i64(seed: int) -> int:
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


@dataclass(frozen=True, slots=True)
class SamplingBatch:
    """Per-row sampling parameters of one step, on the device, with host-side summary flags."""

    temperature: torch.Tensor  # [N] float32; 0 = greedy (empty when all_greedy)
    top_k: torch.Tensor  # [N] int64; vocab_size = disabled (empty when all_greedy)
    top_p: torch.Tensor  # [N] float32; 2.0 = disabled (empty when all_greedy)
    seeds: torch.Tensor  # [S] int64, seeded rows only
    positions: torch.Tensor  # [S] int64: output index each seeded row samples
    seeded_rows: torch.Tensor  # [S] int64
    banned_rows: torch.Tensor  # [B] int64 \ (row, token) pairs whose logit becomes -inf
    banned_ids: torch.Tensor  # [B] int64 /
    all_greedy: bool
    max_top_k: int  # 0: no row uses top-k
    any_top_p: bool

    @staticmethod
    def build(options: Sequence[SamplingOptions], output_positions: Sequence[int], *, vocab_size: int,
              device: torch.device | str, banned: Sequence[Sequence[int]] | None = None,
              stage: Callable[[torch.Tensor], torch.Tensor] | None = None) -> SamplingBatch:
        """Pack one step's rows; ``banned[i]`` lists token ids row i must not produce. ``stage``
        copies a host tensor to the device (the runner's pinned staging; default ``.to``)."""
        if all(o.temperature == 0 for o in options) and (banned is None or not any(banned)):
            return _greedy_batch(torch.device(device))  # the common greedy step: nothing to send
        n = len(options)
        temps = [o.temperature for o in options]
        top_k = [o.top_k if 0 < o.top_k < vocab_size else vocab_size for o in options]
        top_p = [o.top_p if o.top_p < 1.0 else 2.0 for o in options]
        sampled = [i for i in range(n) if temps[i] > 0]
        seeded = [i for i in sampled if options[i].seed is not None]
        b_rows: list[int] = []
        b_ids: list[int] = []
        if banned is not None:
            for i, ids in enumerate(banned):
                for t in ids:
                    if 0 <= t < vocab_size:
                        b_rows.append(i)
                        b_ids.append(t)
        enabled_k = [top_k[i] for i in sampled if top_k[i] < vocab_size]
        seeds = [_to_i64(options[i].seed) for i in seeded]  # type: ignore[arg-type]
        positions = [output_positions[i] for i in seeded]
        # One host->device copy for all integers (and one for the floats unless every row is
        # greedy): a step of 256 rows would otherwise pay eight small transfers.
        ints = [top_k, seeds, positions, seeded, b_rows, b_ids] if sampled else [[], [], [], [], b_rows, b_ids]
        sizes = [len(x) for x in ints]
        dev = torch.device(device)
        to_dev = stage if stage is not None else (lambda t: t.to(dev, non_blocking=True))
        flat = to_dev(torch.tensor([v for x in ints for v in x], dtype=torch.int64))
        t_k, t_seeds, t_pos, t_rows, t_brows, t_bids = torch.split(flat, sizes)
        if sampled:
            floats = to_dev(torch.tensor([temps, top_p], dtype=torch.float32))
            temperature, t_top_p = floats[0], floats[1]
        else:  # all greedy: the sampler never reads these
            temperature = t_top_p = torch.empty(0, dtype=torch.float32, device=dev)
        return SamplingBatch(
            temperature=temperature, top_k=t_k, top_p=t_top_p, seeds=t_seeds, positions=t_pos,
            seeded_rows=t_rows, banned_rows=t_brows, banned_ids=t_bids,
            all_greedy=not sampled,
            max_top_k=max(enabled_k, default=0),
            any_top_p=any(top_p[i] <= 1.0 for i in sampled),
        )


_GREEDY: dict[torch.device, SamplingBatch] = {}


def _greedy_batch(device: torch.device) -> SamplingBatch:
    """All rows greedy, nothing banned: one shared batch per device (its tensors are empty)."""
    batch = _GREEDY.get(device)
    if batch is None:
        e_i = torch.empty(0, dtype=torch.int64, device=device)
        e_f = torch.empty(0, dtype=torch.float32, device=device)
        batch = _GREEDY[device] = SamplingBatch(temperature=e_f, top_k=e_i, top_p=e_f, seeds=e_i, positions=e_i,
                                                seeded_rows=e_i, banned_rows=e_i, banned_ids=e_i, all_greedy=True,
                                                max_top_k=0, any_top_p=False)
    return batch


class Sampler:
    def __init__(self, device: torch.device | str, seed: int | None = None) -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """``logits [N, V]`` (the model dtype or float32) -> token ids ``[N]`` int64, still on the
        device. Greedy rows take the argmax of the logits as they come (a 16-bit value converts
        to float32 exactly, so the index is the one float32 would give); sampled rows compute in
        float32."""
        if batch.banned_rows.numel():
            logits = logits.index_put((batch.banned_rows, batch.banned_ids), logits.new_full((), _NEG_INF))
        greedy = logits.argmax(dim=-1)
        if batch.all_greedy:
            return greedy
        logits = logits.float()
        temp = batch.temperature
        is_greedy = temp == 0
        x = logits / torch.where(is_greedy, torch.ones_like(temp), temp)[:, None]
        if batch.max_top_k:
            x = _apply_top_k(x, batch.top_k, batch.max_top_k)
        if batch.any_top_p:
            x = _apply_top_p(x, batch.top_p)
        noise = torch.empty_like(x).exponential_(generator=self.generator)
        if batch.seeded_rows.numel():
            u = hashed_uniform(batch.seeds, batch.positions, x.shape[1])
            noise[batch.seeded_rows] = -torch.log(u)  # Exp(1) by inversion
        sampled = (x - noise.log()).argmax(dim=-1)
        return torch.where(is_greedy, greedy, sampled)


def _apply_top_k(x: torch.Tensor, top_k: torch.Tensor, max_k: int) -> torch.Tensor:
    """Keep each row's ``top_k`` largest values (rows with k = vocab keep everything)."""
    vocab = x.shape[1]
    vals = x.topk(max_k, dim=-1).values  # [N, max_k], descending
    kth = vals.gather(1, (top_k.clamp(max=max_k) - 1)[:, None])
    kth = torch.where((top_k < vocab)[:, None], kth, torch.full_like(kth, _NEG_INF))
    return x.masked_fill(x < kth, _NEG_INF)


def _apply_top_p(x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest prefix of tokens (by probability) whose mass reaches ``top_p``."""
    sorted_x, order = x.sort(dim=-1, descending=True)
    probs = sorted_x.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = before >= top_p[:, None]
    drop_sorted[:, 0] = False
    drop = torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted)
    return x.masked_fill(drop, _NEG_INF)
