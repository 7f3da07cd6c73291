"""The per-sequence result of one engine step, shared by every core (no asyncio, no torch)."""
from __future__ import annotations

from typing import NamedTuple

from turbine.protocols.generate import FinishReason


class StepOutput(NamedTuple):
    """What one scheduled sequence produced in one step (every core reports these)."""

    request_id: str
    token_id: int | None  # None: a prefill chunk that produced no token yet
    finish_reason: FinishReason | None
    prompt_tokens: int
    cached_tokens: int  # prefix-cache hit at admission
    completion_tokens: int
