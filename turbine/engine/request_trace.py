"""The engine's spans of one traced request, from the times its Sequence and stream recorded.

    arrival ─engine.queue─▶ admitted ─engine.kv_transfer─▶ KV landed ─engine.prefill─▶ first token
                                     (engine.kv_onboard: blocks      ─engine.decode─▶ last token
                                      copied up from host/disk tiers)

Only a request that carries a traceparent while this process traces gets one (``StreamHub``);
the spans are children of the worker's span and are written when the stream ends, with the
times measured as they happened (the scheduler's clock is ``time.monotonic``, as here).
"""
from __future__ import annotations

import time
from typing import Any


class RequestTrace:
    __slots__ = ("arrival", "first_token", "request", "seq")

    def __init__(self, request: Any, seq: Any) -> None:
        self.request = request  # GenerateRequest (its traceparent is the parent of every span)
        self.seq = seq  # engine.sequence.Sequence: scheduled_time, pulled_time, token counts
        self.arrival = time.monotonic()
        self.first_token: float | None = None

    def saw_tokens(self) -> None:
        if self.first_token is None:
            self.first_token = time.monotonic()

    def emit(self, tracer: Any, finish_reason: str | None) -> None:
        end = time.monotonic()
        offset = time.time_ns() - time.monotonic_ns()

        def ns(t: float) -> int:
            return int(t * 1e9) + offset

        req, seq, parent = self.request, self.seq, self.request.traceparent
        rid = {"turbine.request_id": req.request_id}
        scheduled = seq.scheduled_time
        tracer.record("engine.queue", parent, ns(self.arrival), ns(scheduled if scheduled is not None else end),
                      {**rid, "turbine.prompt_tokens": seq.num_prompt_tokens,
                       "turbine.admitted": scheduled is not None})
        if scheduled is None:  # aborted (or refused) while waiting
            return
        prefill_from = scheduled
        if seq.pulled_time is not None:
            from_peer = req.kv_transfer is not None and req.kv_transfer.source is not None
            tracer.record("engine.kv_transfer" if from_peer else "engine.kv_onboard", parent, ns(scheduled),
                          ns(seq.pulled_time), {**rid, "turbine.kv.pulled_blocks": seq.num_pulled_blocks,
                                                "turbine.kv.ok": seq.num_pulled_blocks > 0})
            prefill_from = max(scheduled, seq.pulled_time)
        first = self.first_token if self.first_token is not None else end
        tracer.record("engine.prefill", parent, ns(prefill_from), ns(first),
                      {**rid, "turbine.prompt_tokens": seq.num_prompt_tokens,
                       "turbine.cached_tokens": seq.num_cached_tokens,
                       "turbine.preemptions": seq.num_preemptions})
        if self.first_token is not None and seq.num_output_tokens > 1:
            tracer.record("engine.decode", parent, ns(first), ns(end),
                          {**rid, "turbine.completion_tokens": seq.num_output_tokens,
                           "turbine.finish_reason": finish_reason})


__all__ = ["RequestTrace"]
