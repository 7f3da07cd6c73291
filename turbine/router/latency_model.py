"""What a request would wait for on one worker: TTFT and the ITL it imposes, from a timing model.

The router knows, per worker, the prompt tokens still waiting for prefill (``queued``), the
sequences decoding (``decoding``) and the KV they hold. An engine with chunked prefill
(vLLM v1's scheduler, Turbine's, the mocker's) spends each step's token budget ``B`` on one
token per decoding sequence first and on waiting prompts (oldest first) with the rest. So the
request's ``n`` uncached tokens come out of the queue after

    chunk = B - decoding                               prompt tokens a step computes
    steps = ceil((queued + n) / chunk)
    TTFT  = (steps - 1) * step(chunk, decoding) + step(last chunk, decoding)

and while it prefills every step of the worker's running requests grows from
``step(0, decoding)`` to ``step(min(chunk, queued + n), decoding + 1)``: that step is the ITL
the request imposes. ``step`` is the worker's own timing model (``turbine.mocker.timing``: a
measured profile, or Dynamo's polynomial by default), the same one the mocker runs on, so the
predicted times are the simulated ones up to what the router cannot see (the step in flight,
requests other frontends routed since the worker's last load report).

Prefill-only times are tabulated once per block of tokens (``prefill_s``); the decode part of
a step depends on the worker's state and is computed once per state change, so predicting a
candidate costs a few arithmetic operations (``predict``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec

from turbine.mocker.timing import PolynomialTiming, ProfileTiming, TimingModel
from turbine.protocols.model_card import WorkerTiming

DEFAULT_BATCHED_TOKENS = 8192  # vLLM's and the mocker's max_num_batched_tokens


class Prediction(NamedTuple):
    ttft_s: float  # queued prefill ahead of it plus its own, step by step
    itl_s: float  # the step time its prefill imposes on the worker's running requests (0: none run)


@dataclass(slots=True)
class WorkerState:
    """One worker's load as the predictor needs it; ``decode_s``/``itl_s`` follow from it."""

    queued: int = 0  # prompt tokens waiting for prefill (this frontend's and, from reports, others')
    decoding: int = 0  # sequences past their prefill
    kv_blocks: int = 0  # blocks their KV holds
    decode_s: float = 0.0  # the decode part of a step now (0 when nothing decodes)
    imposed_decode_s: float = 0.0  # the decode part once this request decodes too


@dataclass
class LatencyModel:
    """One timing model, budget and block size: every worker configured alike shares one."""

    timing: TimingModel
    block_size: int
    total_blocks: int
    budget: int = DEFAULT_BATCHED_TOKENS  # tokens one step computes (decodes included)
    prefill_s: list[float] = field(init=False)  # prefill-only step time for k blocks of new tokens

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.total_blocks <= 0 or self.budget <= 0:
            raise ValueError("block size, total blocks and token budget must be positive")
        bs = self.block_size
        n = -(-self.budget // bs)
        self.prefill_s = [0.0] + [self.timing.step_seconds(min(k * bs, self.budget), 0, 0.0) for k in range(1, n + 1)]

    @classmethod
    def from_card(cls, timing: WorkerTiming | None, block_size: int, total_blocks: int) -> LatencyModel:
        """The model a worker announced in its card; Dynamo's polynomial at its defaults if none."""
        if timing is None:
            return cls(PolynomialTiming(), block_size, total_blocks)
        model: TimingModel = (ProfileTiming(timing.profile, timing.speedup_ratio) if timing.profile is not None
                              else PolynomialTiming(timing.speedup_ratio))
        return cls(model, block_size, total_blocks, timing.max_num_batched_tokens)

    def prefill_chunk_s(self, tokens: int) -> float:
        """A prefill-only step of ``tokens`` new tokens (rounded up to whole blocks, capped at the budget)."""
        k = -(-tokens // self.block_size)
        table = self.prefill_s
        return table[k] if k < len(table) else table[-1]

    def refresh(self, state: WorkerState) -> None:
        """Recompute the decode parts of ``state``'s steps (call after its counts change)."""
        b = state.decoding
        usage = min(1.0, state.kv_blocks / self.total_blocks)
        ctx = state.kv_blocks * self.block_size / b if b else 0.0
        state.decode_s = self.timing.step_seconds(0, b, usage, mean_decode_context=ctx) if b > 0 else 0.0
        state.imposed_decode_s = (self.timing.step_seconds(0, b + 1, usage, mean_decode_context=ctx)
                                  if b > 0 else 0.0)

    def predict(self, state: WorkerState, new_tokens: int) -> Prediction:
        """TTFT and imposed ITL of a request with ``new_tokens`` uncached tokens on this worker."""
        chunk = max(self.block_size, self.budget - state.decoding)
        work = state.queued + max(new_tokens, 1)  # an engine always computes the last token
        full, rem = divmod(work, chunk)
        d = state.decode_s
        step_full = self.prefill_chunk_s(chunk) + d
        ttft = full * step_full + (self.prefill_chunk_s(rem) + d if rem else 0.0)
        itl = self.prefill_chunk_s(min(chunk, work)) + state.imposed_decode_s if state.decoding else 0.0
        return Prediction(ttft, itl)


def model_key(timing: WorkerTiming | None, block_size: int, total_blocks: int) -> tuple[Any, ...]:
    """Workers whose cards agree on these share one LatencyModel (profiles compared by content)."""
    if timing is None:
        return (None, block_size, total_blocks)
    profile = None if timing.profile is None else msgspec.json.encode(timing.profile, order="sorted")
    return (timing.max_num_batched_tokens, timing.speedup_ratio, profile, block_size, total_blocks)


__all__ = ["DEFAULT_BATCHED_TOKENS", "LatencyModel", "Prediction", "WorkerState", "model_key"]
