"""The per-sequence result of one engine step, shared by every core (no asyncio, no torch)."""
from __future__ import annotations

from typing import Any, NamedTuple

from turbine.engine.sequence import SequenceStatus
from turbine.protocols.generate import FinishReason


class StepOutput(NamedTuple):
    """What one scheduled sequence produced in one step (every core reports these)."""

    request_id: str
    token_id: int | None  # None: a prefill chunk that produced no token yet
    finish_reason: FinishReason | None
    prompt_tokens: int
    cached_tokens: int  # prefix-cache hit at admission
    completion_tokens: int
    held_kv: Any = None  # scheduler.HeldKv: a prefill that finished holding its KV for a pull
    pulled_blocks: int = 0  # blocks this sequence's KV came in from a peer


def step_output(scheduler: Any, seq: Any, token: int | None, reason: FinishReason | None, n_out: int) -> StepOutput:
    """The StepOutput of one scheduler result (every core builds them the same way)."""
    held = scheduler.held_kv(seq) if seq.status is SequenceStatus.HELD else None
    return StepOutput(seq.request_id, token, reason, seq.num_prompt_tokens, seq.num_cached_tokens, n_out, held,
                      seq.num_pulled_blocks)
