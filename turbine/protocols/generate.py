"""The generate contract: frontend -> worker -> engine, and the token stream back.

Stop *strings* never reach the worker: they need detokenized text, which only the frontend has.
The frontend watches the text and cancels the stream when one matches.
"""
from __future__ import annotations

from typing import Literal

import msgspec

from turbine.protocols.kv_transfer import KvTransferParams, KvTransferRequest

FinishReason = Literal["stop", "length", "abort", "error"]


class SamplingOptions(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    seed: int | None = None


class StopConditions(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    max_tokens: int
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()


class GenerateRequest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    request_id: str
    token_ids: list[int]
    sampling: SamplingOptions = SamplingOptions()
    stop: StopConditions
    lora_name: str | None = None
    # Router's predicted prefix overlap in blocks (for metrics: predicted vs actual).
    predicted_overlap_blocks: int | None = None
    kv_transfer: KvTransferRequest | None = None  # disaggregated serving (protocols/kv_transfer.py)
    # W3C trace context of the caller's span (runtime/tracing.py); None unless tracing is on
    traceparent: str | None = None


class GenerateDelta(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """One chunk of a response stream. Usage counts come with the final delta."""

    token_ids: list[int] = []
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    kv_transfer: KvTransferParams | None = None  # the last delta of a prefill-only request
    kv_pulled_blocks: int | None = None  # decode side, first delta: blocks pulled from the prefill worker
