"""Conditional disaggregation: a pure decision, per request, from what the router knows.

    no prefill worker alive                       -> "no_prefill_workers" (decode workers serve whole)
    prompt - decode worker's cached prefix < N    -> "local_short"  (a transfer costs more than it saves)
    every prefill worker has >= Q tokens queued   -> "local_saturated" (waiting there is worse)
    otherwise                                     -> "remote"

The thresholds are flags; their defaults come from the simulator's sweep (bench/disagg_sim.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Decision = Literal["remote", "local_short", "local_saturated", "no_prefill_workers"]
DECISIONS: tuple[Decision, ...] = ("remote", "local_short", "local_saturated", "no_prefill_workers")


@dataclass(frozen=True)
class DisaggConfig:
    min_remote_prefill_tokens: int = 512  # shorter effective prompts are prefilled on the decode worker
    max_prefill_queue_tokens: int = 32768  # a prefill pool this busy (its least loaded worker) is skipped
    hold_s: float = 30.0  # a prefill worker keeps the KV this long for the pull, at most
    prefill_timeout_s: float = 60.0  # a prefill leg that takes longer is abandoned (decode prefills)

    def __post_init__(self) -> None:
        if self.min_remote_prefill_tokens < 0 or self.max_prefill_queue_tokens < 1:
            raise ValueError("min_remote_prefill_tokens must be >= 0 and max_prefill_queue_tokens >= 1")
        if not self.hold_s > 0 or not self.prefill_timeout_s > 0:
            raise ValueError("hold_s and prefill_timeout_s must be positive")


def decide(prompt_tokens: int, decode_cached_tokens: int, prefill_queued_tokens: Sequence[int],
           config: DisaggConfig) -> Decision:
    """Where to prefill one prompt. ``prefill_queued_tokens``: per live prefill worker, the prompt
    tokens routed to it that have not produced their first token yet."""
    if not prefill_queued_tokens:
        return "no_prefill_workers"
    if prompt_tokens - decode_cached_tokens < config.min_remote_prefill_tokens:
        return "local_short"
    if min(prefill_queued_tokens) >= config.max_prefill_queue_tokens:
        return "local_saturated"
    return "remote"
