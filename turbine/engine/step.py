"""The result of one engine step, per sequence and whole, shared by every core (the built-in
engine's and the mocker's; no asyncio, no torch)."""
from __future__ import annotations

from typing import Any, NamedTuple

from turbine.engine.sequence import SequenceStatus
from turbine.protocols.generate import FinishReason
from turbine.protocols.kv_events import KVEvent


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


class StepResult(NamedTuple):
    """One completed step of a core (``BuiltinCore.step``, ``MockerCore.step``)."""

    duration_s: float  # wall time of the call (the mocker: the modelled step time)
    outputs: list[StepOutput]  # one per sequence of the completed step still running at its end
    kv_events: list[KVEvent]  # in order; the caller numbers them
    num_prefill_tokens: int  # of the completed step
    num_decode_seqs: int
    num_preempted: int
    pulls: list[Any] = []  # scheduler.PullOrder, admission ordered (disaggregation): the caller runs them
    host_s: float = 0.0  # of duration_s, the time not spent waiting for the device (built-in engine)
    device_s: float | None = None  # the step's device time (CUDA events; None unless enable_device_timing)


def step_output(scheduler: Any, seq: Any, token: int | None, reason: FinishReason | None, n_out: int) -> StepOutput:
    """The StepOutput of one scheduler result (every core builds them the same way)."""
    held = scheduler.held_kv(seq) if seq.status is SequenceStatus.HELD else None
    return StepOutput(seq.request_id, token, reason, seq.num_prompt_tokens, seq.num_cached_tokens, n_out, held,
                      seq.num_pulled_blocks)
