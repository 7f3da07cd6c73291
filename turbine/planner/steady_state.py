"""What a worker sustains, and at what latency, in steady state: the planner's static analysis.

No queueing here (that is what replaying the workload through `turbine.sim` adds): a worker is
assumed to hold ``batch`` requests at all times, each entering when another leaves.

Aggregated worker, ``b`` requests in flight, effective prompt ``p = ISL * (1 - prefix hit)``:

    every request needs p prompt tokens per OSL decode steps, so a step carries on average
    n = b * p / OSL prompt tokens beside its b decodes (chunked prefill mixes them)
    ITL   = step(n, b)                      tokens/s/user = 1 / ITL
    TTFT  = ITL / 2 (wait for the step in flight) + the chunks of one prompt, each a mixed step
            of min(p, budget - b) prompt tokens beside the b - 1 other decodes
    output tokens/s = b / ITL;  requests/s = b / (TTFT + (OSL - 1) * ITL)

Disaggregated unit, ``x`` prefill workers and ``y`` decode workers:

    prefill worker, k prompts per step:   TTFT = step(k * p) + KV transfer + one decode step
                                          requests/s = k / step(k * p)
    decode worker, b in flight:           ITL = step(0, b) at context ISL + OSL / 2
                                          requests/s = b / (OSL * ITL)
    the unit serves min(x * prefill rate, y * decode rate); tokens/s/GPU divides by its GPUs.

That is the model AIConfigurator draws its frontier with (rate matching, fixed lengths); the
planner then checks the winners against the real length and prefix distribution in the
simulator, where queueing, prefix caching and bursts show up.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from turbine.planner.perf_model import Parallel, PerfModel, Step


@dataclass(frozen=True)
class Workload:
    """Mean request shape; ``prefix_hit`` is the fraction of prompt tokens found cached."""

    isl: float
    osl: float
    prefix_hit: float = 0.0

    def __post_init__(self) -> None:
        if not (self.isl >= 1 and self.osl >= 1):
            raise ValueError(f"ISL and OSL must be >= 1, got {self.isl} and {self.osl}")
        if not 0 <= self.prefix_hit < 1:
            raise ValueError(f"prefix_hit must be in [0, 1), got {self.prefix_hit}")

    @property
    def new_prompt_tokens(self) -> float:
        return max(1.0, self.isl * (1 - self.prefix_hit))

    @property
    def cached_prompt_tokens(self) -> float:
        return self.isl * self.prefix_hit


@dataclass(frozen=True)
class Sla:
    """Targets per request: time to first token, and mean inter-token latency."""

    ttft_ms: float
    itl_ms: float

    def __post_init__(self) -> None:
        if not (self.ttft_ms > 0 and self.itl_ms > 0):
            raise ValueError(f"SLA targets must be positive, got TTFT {self.ttft_ms} ms, ITL {self.itl_ms} ms")

    def met(self, ttft_ms: float, itl_ms: float) -> bool:
        return ttft_ms <= self.ttft_ms and itl_ms <= self.itl_ms


@dataclass(frozen=True)
class Point:
    """One configuration at one batch size: a point of the throughput/latency plane."""

    mode: str  # "agg" or "disagg"
    decode: Parallel  # the aggregated worker's layout, or the decode workers'
    batch: int  # requests in flight per (decode) worker: its max_num_seqs
    ttft_ms: float
    itl_ms: float
    requests_per_s: float  # of the unit
    gpus: int  # of the unit
    osl: float
    prefill: Parallel | None = None
    prefill_workers: int = 0
    decode_workers: int = 1
    prefill_batch: int = 0  # prompts per prefill step (disaggregated)
    prefill_rps: float = 0.0  # one prefill worker's requests/s (disaggregated)

    @property
    def decode_rps(self) -> float:
        """One decode (or aggregated) worker's requests/s."""
        if self.mode == "agg":
            return self.requests_per_s
        return self.batch / (self.osl * self.itl_ms / 1e3)

    @property
    def tokens_per_s_user(self) -> float:
        return 1e3 / self.itl_ms

    @property
    def tokens_per_s_gpu(self) -> float:
        return self.requests_per_s * self.osl / self.gpus

    @property
    def label(self) -> str:
        if self.mode == "agg":
            return f"agg {self.decode.label} b{self.batch}"
        assert self.prefill is not None
        return (f"disagg {self.prefill_workers}x{self.prefill.label}(k{self.prefill_batch}) : "
                f"{self.decode_workers}x{self.decode.label} b{self.batch}")


def agg_point(model: PerfModel, par: Parallel, wl: Workload, batch: int, *, token_budget: int = 8192) -> Point:
    """An aggregated worker holding ``batch`` requests (see the module docstring)."""
    p = wl.new_prompt_tokens
    ctx = wl.isl + wl.osl / 2
    budget = max(1, token_budget - batch)
    n = min(budget, batch * p / wl.osl)
    seqs = max(1, math.ceil(n / p))
    itl = model.step_ms(Step(prefill_tokens=round(n), prefill_context=wl.cached_prompt_tokens, prefill_seqs=seqs,
                             decode_seqs=batch, decode_context=ctx), par)
    chunk = min(p, budget)
    chunks, done, ttft = math.ceil(p / chunk), 0.0, itl / 2
    for _ in range(chunks):
        size = min(chunk, p - done)
        ttft += model.step_ms(Step(prefill_tokens=round(size), prefill_context=wl.cached_prompt_tokens + done,
                                   prefill_seqs=1, decode_seqs=batch - 1, decode_context=ctx), par)
        done += size
    rate = batch / ((ttft + (wl.osl - 1) * itl) / 1e3)
    return Point(mode="agg", decode=par, batch=batch, ttft_ms=ttft, itl_ms=itl, requests_per_s=rate,
                 gpus=par.gpus, osl=wl.osl)


@dataclass(frozen=True)
class PrefillRate:
    par: Parallel
    prompts_per_step: int
    ttft_ms: float  # prefill step + transfer + the decode worker's first step
    requests_per_s: float  # one prefill worker


def prefill_rate(model: PerfModel, par: Parallel, wl: Workload, k: int, *, decode_step_ms: float,
                 transfer_gbps: float = 25.0, transfer_latency_ms: float = 0.5) -> PrefillRate:
    p = wl.new_prompt_tokens
    step = model.step_ms(Step(prefill_tokens=round(k * p), prefill_context=wl.cached_prompt_tokens, prefill_seqs=k), par)
    transfer = transfer_latency_ms + p * model.shape.kv_bytes_per_token / (transfer_gbps * 1e9) * 1e3
    # A request waits on average half a step for the one in flight, then its own.
    return PrefillRate(par=par, prompts_per_step=k, ttft_ms=step * 1.5 + transfer + decode_step_ms,
                       requests_per_s=k / (step / 1e3))


def decode_itl_ms(model: PerfModel, par: Parallel, wl: Workload, batch: int) -> float:
    return model.step_ms(Step(decode_seqs=batch, decode_context=wl.isl + wl.osl / 2), par)


def disagg_point(model: PerfModel, pre: PrefillRate, dec: Parallel, wl: Workload, batch: int, itl_ms: float,
                 x: int, y: int) -> Point:
    dec_rate = batch / (wl.osl * itl_ms / 1e3)
    rate = min(x * pre.requests_per_s, y * dec_rate)
    return Point(mode="disagg", decode=dec, batch=batch, ttft_ms=pre.ttft_ms, itl_ms=itl_ms, requests_per_s=rate,
                 gpus=x * pre.par.gpus + y * dec.gpus, osl=wl.osl, prefill=pre.par, prefill_workers=x,
                 decode_workers=y, prefill_batch=pre.prompts_per_step, prefill_rps=pre.requests_per_s)


def pareto_front(points: list[Point]) -> list[Point]:
    """The points no other beats on both tokens/s/user and tokens/s/GPU, by user speed."""
    front: list[Point] = []
    for pt in sorted(points, key=lambda q: (-q.tokens_per_s_user, -q.tokens_per_s_gpu)):
        if not front or pt.tokens_per_s_gpu > front[-1].tokens_per_s_gpu:
            front.append(pt)
    return front


__all__ = ["Point", "PrefillRate", "Sla", "Workload", "agg_point", "decode_itl_ms", "disagg_point",
           "pareto_front", "prefill_rate"]
