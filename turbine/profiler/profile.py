"""Sweeps that measure an engine's step time: the data behind the mocker's ``ProfileTiming``.

The profiler drives any synchronous core (``add_request`` / ``step`` / ``abort``: ``BuiltinCore``,
``MockerCore``) through its own scheduler, so every number is one real ``step()``:

    prefill[i][j]  one step computing new_tokens[i] uncached tokens of one request whose first
                   cached_tokens[j] tokens are a prefix-cache hit (a prefix request ran first;
                   the step must report that hit, or the point is redone)
    decode[i][j]   one step of batch_size[i] one-token decodes of mean length context_length[j]
                   (measured at meta.decode_mean_context, which drifts a token per step, and
                   moved onto the nominal context along the row's measured points)
    mixed[i][j]    one step computing mixed_new_tokens[i] fresh prompt tokens together with
                   mixed_batch_size[j] decodes of mean length about mixed.context_length (the
                   decode context nearest 1024); meta.mixed says how far ``prefill + decode`` is off

Timing: wall time of ``step()`` (``sync`` before and after, e.g. ``torch.cuda.synchronize``),
median of ``repeats`` after ``warmup`` untimed steps. ``clock="reported"`` uses the step's own
``duration_s`` instead (a mocker core: its modeled time; tests check the sweeps with it).
A pipelined core (``core.pipelined``: async scheduling, each call launches the next step and
completes the previous one) is timed without syncs: the call that completes a step waits for
exactly that step, so in steady state its wall time is the step's time as served, host work
hidden; results are matched to the step they report. A mixed step among decodes is timed as the
two calls around it less one decode step: whether the engine launches it ahead (its host work in
the first call) or stages it behind the decode (launch and wait in the second), the two calls
hold one decode step and the mixed step. The profile's meta.async_scheduling records the
pipelining, so the mocker replays it the same way.

Cells the engine cannot hold (KV blocks, context length, token budget) are filled from the
measured ones (see ``grid.fill_rows``) and listed in meta, so the table stays a full grid.
"""
from __future__ import annotations

import contextlib
import math
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from turbine.profiler.grid import (
    clip_axis,
    fill_rows,
    ints,
    mixed_table,
    regrid,
    round_ms,
)
from turbine.protocols.generate import GenerateRequest, SamplingOptions, StopConditions

__all__ = ["DEFAULT_GRID", "QUICK_GRID", "CoreLimits", "ProfileGrid", "Profiler", "SteppableCore", "profile_core"]


class ProfileGrid(msgspec.Struct, frozen=True, kw_only=True):
    """What to measure. Points the engine cannot run are dropped or filled (module docstring)."""

    prefill_new_tokens: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
    prefill_cached_tokens: tuple[int, ...] = (0, 1024, 4096, 8192)
    decode_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    decode_context_lengths: tuple[int, ...] = (128, 512, 1024, 2048, 4096, 8192)
    # between 256 and 2048 a step's cost climbs in the engine's piecewise-graph buckets: sample it densely
    mixed_new_tokens: tuple[int, ...] = (16, 64, 256, 512, 768, 1024, 1536, 2048, 4096)
    mixed_batch_sizes: tuple[int, ...] = (1, 8, 32, 128)  # measured at the decode context nearest 1024
    warmup: int = 1
    repeats: int = 5
    # Prompt tokens prefilled to set up one context's decode batches (bounds the profile's time).
    decode_setup_tokens: int = 300_000

    def __post_init__(self) -> None:
        for name in ("prefill_new_tokens", "decode_batch_sizes", "decode_context_lengths"):
            values = getattr(self, name)
            if not values or any(v < 1 for v in values) or list(values) != sorted(set(values)):
                raise ValueError(f"{name} must be positive, strictly increasing and non-empty, got {values}")
        cached = self.prefill_cached_tokens
        if not cached or cached[0] != 0 or list(cached) != sorted(set(cached)):
            raise ValueError(f"prefill_cached_tokens must start at 0 and increase strictly, got {cached}")
        if self.warmup < 0 or self.repeats < 1 or self.decode_setup_tokens < 1:
            raise ValueError("warmup must be >= 0, repeats and decode_setup_tokens >= 1")


DEFAULT_GRID = ProfileGrid()
QUICK_GRID = ProfileGrid(prefill_new_tokens=(16, 128, 1024), prefill_cached_tokens=(0, 512),
                         decode_batch_sizes=(1, 4, 16, 64), decode_context_lengths=(128, 1024),
                         mixed_new_tokens=(64,), mixed_batch_sizes=(1, 16), warmup=1, repeats=3,
                         decode_setup_tokens=65_536)


class _Output(Protocol):
    request_id: str
    token_id: int | None
    finish_reason: Any
    cached_tokens: int


class _Step(Protocol):
    duration_s: float
    outputs: Sequence[_Output]
    num_prefill_tokens: int
    num_decode_seqs: int


class SteppableCore(Protocol):
    """What the profiler needs of an engine: a synchronous step over its own scheduler."""

    vocab_size: int

    def add_request(self, request: GenerateRequest) -> None: ...

    def abort(self, request_id: str) -> bool: ...

    def has_work(self) -> bool: ...

    def step(self) -> _Step: ...


@dataclass(frozen=True)
class CoreLimits:
    block_size: int
    num_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    context_length: int

    @classmethod
    def of(cls, core: Any) -> CoreLimits:
        """Read the limits of a ``BuiltinCore`` or ``MockerCore`` (config + block manager)."""
        cfg = core.config
        ctx = getattr(core, "context_length", None) or cfg.context_length
        return cls(int(cfg.block_size), int(core.block_manager.num_blocks), int(cfg.max_num_seqs),
                   int(cfg.max_num_batched_tokens), int(ctx))


@dataclass
class _Table:
    rows: list[float]
    cols: list[float]
    ms: list[list[float | None]]


class Profiler:
    def __init__(self, core: SteppableCore, grid: ProfileGrid = DEFAULT_GRID, *, limits: CoreLimits | None = None,
                 sync: Callable[[], None] | None = None, clock: str = "wall", seed: int = 0,
                 progress: bool = True) -> None:
        if clock not in ("wall", "reported"):
            raise ValueError(f"clock must be 'wall' or 'reported', got {clock!r}")
        self.core = core
        self.grid = grid
        self.limits = limits or CoreLimits.of(core)
        self.pipelined = bool(getattr(core, "pipelined", False))
        self.sync = None if self.pipelined else sync
        self.clock = clock
        self.progress = progress
        self._rng = random.Random(seed)
        self._ids = 0
        self._bar: Any = None

    # -- helpers ------------------------------------------------------------------------------------
    def _request(self, tokens: list[int], max_tokens: int) -> GenerateRequest:
        self._ids += 1
        return GenerateRequest(request_id=f"profile-{self._ids}", token_ids=tokens,
                               sampling=SamplingOptions(temperature=0.0),
                               stop=StopConditions(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True))

    def _tokens(self, n: int) -> list[int]:
        """Fresh random ids: never a prefix-cache hit on anything measured before."""
        v = self.core.vocab_size
        return [self._rng.randrange(v) for _ in range(n)]

    def _step(self) -> tuple[_Step, float]:
        if self.sync is not None:
            self.sync()
        t0 = time.perf_counter()
        res = self.core.step()
        if self.sync is not None:
            self.sync()
        wall = time.perf_counter() - t0
        return res, 1e3 * (res.duration_s if self.clock == "reported" else wall)

    def _drain(self, limit: int = 100_000) -> None:
        for _ in range(limit):
            if not self.core.has_work():
                return
            self._step()
        raise RuntimeError("the core did not finish its requests")

    def _tick(self, what: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(what, refresh=False)
            self._bar.update(1)

    # -- the sweeps ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Warm up, sweep prefill, decode and mixed steps; the profile as a JSON-ready dict."""
        lim = self.limits
        t0 = time.perf_counter()
        new_axis = clip_axis(self.grid.prefill_new_tokens, lim.max_num_batched_tokens)
        cached_axis = sorted({c - c % lim.block_size for c in self.grid.prefill_cached_tokens
                              if c + new_axis[0] < lim.context_length and self._fits(c + new_axis[0])})
        batch_axis = clip_axis(self.grid.decode_batch_sizes, lim.max_num_seqs)
        plans = [(L, self._decode_plan(L, batch_axis, 0)) for L in self.grid.decode_context_lengths]
        plans = [(L, p) for L, p in plans if p is not None]
        if not plans:
            raise ValueError(f"no decode context of {self.grid.decode_context_lengths} fits this engine "
                             f"(context length {lim.context_length}, {lim.num_blocks} blocks of {lim.block_size})")
        mixed_ctx: int | None = min((L for L, _ in plans), key=lambda L: abs(math.log(L / 1024)))
        mixed_plan = self._decode_plan(mixed_ctx, batch_axis, len(self._mixed_points(batch_axis)))
        if mixed_plan is None:  # no room for the extra steps: no mixed points
            mixed_ctx = None
        plans = [(L, mixed_plan if L == mixed_ctx and mixed_plan else p) for L, p in plans]
        total = (sum(1 for c in cached_axis for n in new_axis if self._prefill_fits(n, c))
                 + sum(len(p[0]) for _, p in plans) + (len(self._mixed_points(mixed_plan[0])) if mixed_plan else 0))
        with _progress(total, self.progress) as bar:
            self._bar = bar
            self._warm_up()
            prefill = self._prefill_sweep(new_axis, cached_axis)
            decode = _Table([float(b) for b in batch_axis], [float(L) for L, _ in plans],
                            [[None] * len(plans) for _ in batch_axis])
            ctx = [[None] * len(plans) for _ in batch_axis]
            mixed: list[dict[str, float]] = []
            for j, (L, (measured, prompt, max_tokens)) in enumerate(plans):
                self._decode_column(j, measured, prompt, max_tokens, decode, ctx,
                                    mixed if L == mixed_ctx else None)
            self._drain()  # a pipelined core still holds the step launched before the last aborts
            self._bar = None
        return self._assemble(prefill, decode, ctx, mixed, mixed_ctx, time.perf_counter() - t0)

    def _fits(self, tokens: int) -> bool:
        return -(-(tokens + 1) // self.limits.block_size) <= self.limits.num_blocks

    def _prefill_fits(self, n: int, c: int) -> bool:
        return c + n < self.limits.context_length and self._fits(c + n)

    def _warm_up(self) -> None:
        """Compile kernels and fill allocator caches before anything is timed."""
        lim = self.limits
        n = min(lim.max_num_batched_tokens, 2048, lim.context_length - 8)
        for prompt, out in ((min(64, n), 4), (n, 2)):
            self.core.add_request(self._request(self._tokens(prompt), out))
            self._drain()

    def _prefill_sweep(self, new_axis: list[int], cached_axis: list[int]) -> _Table:
        table = _Table([float(n) for n in new_axis], [float(c) for c in cached_axis],
                       [[None] * len(cached_axis) for _ in new_axis])
        for j, c in enumerate(cached_axis):
            prefix: list[int] = []
            for i, n in enumerate(new_axis):
                if not self._prefill_fits(n, c):
                    continue
                times = []
                for k in range(self.grid.warmup + self.grid.repeats):
                    for _attempt in range(2):
                        if c and not prefix:
                            prefix = self._tokens(c)
                            self.core.add_request(self._request(prefix, 1))
                            self._drain()
                        req = self._request(prefix + self._tokens(n), 1)
                        self.core.add_request(req)
                        res, ms = self._step()
                        self._drain()
                        out = [o for o in res.outputs if o.request_id == req.request_id]
                        if res.num_prefill_tokens == n and res.num_decode_seqs == 0 and out \
                                and out[0].cached_tokens == c and out[0].finish_reason is not None:
                            break
                        prefix = []  # evicted or not hit: compute the prefix again
                    else:
                        raise RuntimeError(f"prefill of {n} tokens after {c} cached did not run as one step "
                                           f"with a {c}-token cache hit (got {res.num_prefill_tokens} tokens)")
                    if k >= self.grid.warmup:
                        times.append(ms)
                table.ms[i][j] = statistics.median(times)
                self._tick(f"prefill {n}+{c}c")
        return table

    def _decode_plan(self, context: int, batch_axis: list[int], n_mixed: int) -> tuple[list[int], int, int] | None:
        """The batch sizes measurable at ``context``, the prompt length and max_tokens per request
        (the prompt is shortened by half the steps the column will run, so lengths centre on it)."""
        lim, g = self.limits, self.grid
        # a pipelined core runs one more step per batch size and up to two per mixed point
        steps = (len(batch_axis) + 2 * n_mixed) * (g.warmup + g.repeats + 1) + 8
        b_cap = min(lim.max_num_seqs, max(1, g.decode_setup_tokens // context))
        setup = -(-b_cap * context // lim.max_num_batched_tokens)
        prompt = max(1, context - steps // 2 - setup // 4)
        max_tokens = steps + setup + 8
        if prompt + max_tokens >= lim.context_length:
            return None
        per_seq = -(-(prompt + max_tokens) // lim.block_size)
        b_max = min(b_cap, int(0.95 * lim.num_blocks) // per_seq)
        measured = [b for b in batch_axis if b <= b_max]
        return (measured, prompt, max_tokens) if measured else None

    def _mixed_points(self, batch_axis: list[int]) -> list[tuple[int, int]]:
        budget = self.limits.max_num_batched_tokens
        return [(b, n) for b in self.grid.mixed_batch_sizes if b in batch_axis
                for n in self.grid.mixed_new_tokens if n + b <= budget]

    def _decode_column(self, j: int, measured: list[int], prompt: int, max_tokens: int, table: _Table,
                       ctx: list[list[float | None]], mixed: list[dict[str, float]] | None) -> None:
        core = self.core
        reqs = [self._request(self._tokens(prompt), max_tokens) for _ in range(measured[-1])]
        for r in reqs:
            core.add_request(r)
        lengths = {r.request_id: prompt for r in reqs}  # current sequence lengths
        quiet = 0  # results in a row without prefill tokens (a pipelined core's next step is queued)
        while quiet < 1 + self.pipelined or core.stats().num_waiting:  # prefill every prompt
            res, _ = self._step()
            self._count(res, lengths)
            quiet = 0 if res.num_prefill_tokens else quiet + 1
        rows = {int(b): i for i, b in enumerate(table.rows)}
        live = [r.request_id for r in reqs]  # admission order; the earliest have drifted most
        mixed_points = self._mixed_points([int(b) for b in table.rows]) if mixed is not None else []
        for b in reversed(measured):
            for rid in live[: len(live) - b]:
                core.abort(rid)
                del lengths[rid]
            live = live[len(live) - b:]
            times, contexts = [], []
            warmup = max(self.grid.warmup, self.pipelined)
            for k in range(warmup + self.grid.repeats):
                mean_ctx = statistics.fmean(lengths.values())
                res, ms = self._step()
                self._count(res, lengths)
                if k < warmup:
                    continue  # a pipelined core first completes the step launched before the aborts
                if res.num_decode_seqs != b or res.num_prefill_tokens:
                    raise RuntimeError(f"decode step of batch {b} ran {res.num_decode_seqs} decodes and "
                                       f"{res.num_prefill_tokens} prefill tokens (preempted?)")
                times.append(ms)
                contexts.append(mean_ctx)
            table.ms[rows[b]][j] = statistics.median(times)
            ctx[rows[b]][j] = statistics.fmean(contexts)
            self._tick(f"decode b{b} L{table.cols[j]:g}")
            for mb, n in mixed_points:
                if mb == b and mixed is not None:
                    mixed.append(self._mixed_step(b, n, lengths, table.ms[rows[b]][j] or 0.0))
        for rid in live:
            core.abort(rid)

    def _mixed_step(self, batch: int, n: int, lengths: dict[str, int], decode_ms: float) -> dict[str, float]:
        """``n`` fresh prompt tokens (a one-token request) in the same step as ``batch`` decodes.
        ``decode_ms``: this batch's decode step just measured (a pipelined core's two calls
        around the mixed step hold one decode step too)."""
        times, contexts = [], []
        for k in range(self.grid.warmup + self.grid.repeats):
            mean_ctx = statistics.fmean(lengths.values())
            self.core.add_request(self._request(self._tokens(n), 1))
            res, ms = self._step()
            self._count(res, lengths)
            if self.pipelined and not res.num_prefill_tokens:  # that call completed the decode before it
                res, ms2 = self._step()
                self._count(res, lengths)
                ms = max(ms + ms2 - decode_ms, ms2)
            if res.num_prefill_tokens != n or res.num_decode_seqs != batch:
                raise RuntimeError(f"mixed step ran {res.num_prefill_tokens} prefill tokens and "
                                   f"{res.num_decode_seqs} decodes, expected {n} and {batch}")
            if k >= self.grid.warmup:
                times.append(ms)
                contexts.append(mean_ctx)
        self._tick(f"mixed b{batch}+{n}")
        return {"new_tokens": n, "batch_size": batch, "decode_context": round(statistics.fmean(contexts), 1),
                "ms": round(statistics.median(times), 4)}

    @staticmethod
    def _count(res: _Step, lengths: dict[str, int]) -> None:
        for o in res.outputs:
            if o.token_id is not None and o.request_id in lengths:
                lengths[o.request_id] += 1

    # -- the file -----------------------------------------------------------------------------------
    def _assemble(self, prefill: _Table, decode: _Table, ctx: list[list[float | None]],
                  mixed: list[dict[str, float]], mixed_ctx: int | None, seconds: float) -> dict[str, Any]:
        lim, g = self.limits, self.grid
        prefill_filled = fill_rows(prefill.ms, prefill.rows)
        regrid(decode.ms, ctx, decode.cols)
        decode_filled = fill_rows(decode.ms, decode.rows)
        profile: dict[str, Any] = {
            "version": 1,
            "meta": {
                "block_size": lim.block_size, "num_kv_blocks": lim.num_blocks, "max_num_seqs": lim.max_num_seqs,
                "max_num_batched_tokens": lim.max_num_batched_tokens, "context_length": lim.context_length,
                "clock": self.clock, "warmup": g.warmup, "repeats": g.repeats, "statistic": "median",
                "profile_s": round(seconds, 1),
                "prefill_filled": prefill_filled, "decode_filled": decode_filled,
                "decode_mean_context": [[None if v is None else round(v, 1) for v in row] for row in ctx],
            },
            "prefill": {"new_tokens": ints(prefill.rows), "cached_tokens": ints(prefill.cols),
                        "ms": round_ms(prefill.ms)},
            "decode": {"batch_size": ints(decode.rows), "context_length": ints(decode.cols), "ms": round_ms(decode.ms)},
        }
        profile["meta"]["async_scheduling"] = self.pipelined
        padding = getattr(self.core, "padding", None)  # the sizes the engine pads steps to (its graphs)
        if padding:
            profile["meta"]["padding"] = dict(padding)
        if mixed and mixed_ctx is not None:
            from turbine.profiler.fidelity import mixed_summary

            table = mixed_table(mixed)
            if table is not None:
                profile["mixed"] = table
            profile["meta"]["mixed"] = mixed_summary(profile, mixed, mixed_ctx)
        return profile


@contextlib.contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Any]:
    """A tqdm bar, or None when disabled (tqdm is then not even imported)."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc="profile", unit="pt", dynamic_ncols=True) as bar:
        yield bar


def profile_core(core: SteppableCore, grid: ProfileGrid = DEFAULT_GRID, **kw: Any) -> dict[str, Any]:
    """``Profiler(core, grid, **kw).run()``: the profile dict (``ProfileTiming`` reads it)."""
    return Profiler(core, grid, **kw).run()
