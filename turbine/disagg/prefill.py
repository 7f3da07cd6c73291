"""The prefill leg of a disaggregated request, and the frontend's disaggregation counters.

    plan(m, prompt) ─▶ "remote" ─▶ run(): route among prefill workers (their own KV overlap and
    load), send the prompt with max_tokens=1 and kv_transfer.hold_s, read the first token and the
    KvTransferParams of the held blocks
                   ─▶ anything else: None, and the decode worker prefills it itself

Any failure of the leg (the worker died, timed out, refused) is counted and answered with None:
the request then runs whole on a decode worker and the client sees a normal response.
``release()`` frees a held transfer nobody will pull (the request ended at its first token, or
the decode leg never started); it is best effort, the hold deadline frees the blocks anyway.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, NamedTuple

import msgspec

from turbine.disagg.decision import DECISIONS, Decision, DisaggConfig, decide
from turbine.frontend.errors import ApiError
from turbine.protocols.generate import GenerateDelta, GenerateRequest, StopConditions
from turbine.protocols.kv_transfer import KvTransferParams, KvTransferRequest
from turbine.runtime import tracing
from turbine.runtime.request_plane import RequestPlaneClient, RequestPlaneError
from turbine.runtime.tasks import cancel_and_wait
from turbine.transfer.base import send_release

log = logging.getLogger("turbine.disagg")

_decode_delta = msgspec.msgpack.Decoder(GenerateDelta).decode
_encode = msgspec.msgpack.Encoder().encode


class PrefillResult(NamedTuple):
    token_ids: list[int]  # the first generated token
    finish_reason: str  # of the leg: "length" (max_tokens=1) or "stop" (a stop token came first)
    cached_tokens: int  # the prefill worker's prefix-cache hit
    params: KvTransferParams | None  # None: the worker holds nothing (the decode side prefills)


class DisaggStats:
    def __init__(self) -> None:
        self.decisions: dict[str, int] = dict.fromkeys(DECISIONS, 0)
        self.prefill_failures = 0  # legs that failed: prefilled on the decode worker instead
        self.transfer_errors = 0  # decode workers that refused a transfer: prefilled there
        self.pulled_blocks = 0  # blocks decode workers pulled instead of computing
        self.releases = 0  # held transfers the frontend released itself


class PrefillLeg:
    def __init__(self, registry: Any, client: RequestPlaneClient, config: DisaggConfig | None = None) -> None:
        self.registry = registry
        self.client = client
        self.config = config or DisaggConfig()
        self.stats = DisaggStats()
        self._tasks: set[asyncio.Task[None]] = set()

    def plan(self, m: Any, prompt: list[int]) -> Decision | None:
        """None for a model without prefill workers (aggregated serving, nothing to count)."""
        if not self.registry.has_pool(m, "prefill"):
            return None
        try:
            prefill = self.registry.candidates(m, "prefill")
        except ApiError:
            prefill = []
        try:
            decode = self.registry.candidates(m)
        except ApiError:
            decode = []
        if not decode or all(m.role(w) == "prefill" for w in decode):
            prefill = []  # no decode worker: nothing to hand the KV to
        loads = m.prefill_router.loads.workers
        queued = [loads[w].prefill_tokens if w in loads else 0 for w in prefill]
        cached = m.router.best_overlap(decode, prompt) * m.router.block_size if prefill else 0
        decision = decide(len(prompt), cached, queued, self.config)
        self.stats.decisions[decision] += 1
        return decision

    async def run(self, m: Any, request_id: str, spec: Any, deadline: float | None,
                  span: tracing.Span = tracing.NOOP_SPAN) -> PrefillResult | None:
        """``span``: the request's trace span (the prefill worker's spans become its children)."""
        router = m.prefill_router
        prompt = spec.prompt_ids
        t_route = time.time_ns() if span.traceparent is not None else 0
        try:
            decision = router.route(request_id, self.registry.candidates(m, "prefill"), prompt)
        except ApiError:
            decision = None
        if decision is None:  # no prefill worker, or all at their queue limit: the decode worker prefills
            self.stats.prefill_failures += 1
            span.event("prefill_failed", error="no prefill worker could take it")
            return None
        if span.traceparent is not None:
            tracing.record_route(span, t_route, router, decision, 1, pool="prefill")
        worker = decision.worker_id
        inst = m.workers[worker]
        stop = spec.stop
        req = GenerateRequest(request_id=request_id, token_ids=prompt, sampling=spec.sampling,
                              stop=StopConditions(max_tokens=1, min_tokens=min(1, stop.min_tokens),
                                                  ignore_eos=stop.ignore_eos, stop_token_ids=stop.stop_token_ids),
                              kv_transfer=KvTransferRequest(hold_s=self.config.hold_s),
                              traceparent=span.traceparent)
        timeout = self.config.prefill_timeout_s
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
        tokens: list[int] = []
        cached = 0
        try:
            if timeout <= 0:
                raise TimeoutError("no time left for a prefill leg")
            async with asyncio.timeout(timeout):
                async for raw in self.client.stream(inst.address, "generate", _encode(req), timeout=timeout):
                    d = _decode_delta(raw)
                    if d.error:
                        raise RuntimeError(d.error)
                    if d.cached_tokens is not None:
                        cached = d.cached_tokens
                    tokens.extend(d.token_ids)
                    if d.finish_reason is not None:
                        if d.finish_reason not in ("length", "stop") or not tokens:
                            raise RuntimeError(f"the prefill ended with {d.finish_reason!r}")
                        router.first_token(request_id)
                        router.observe_actual(request_id, decision.overlap_blocks, cached)  # predicted vs actual hit
                        self.registry.mark_healthy(worker)
                        return PrefillResult(tokens, d.finish_reason, cached, d.kv_transfer)
            raise RuntimeError("the prefill worker closed the stream without finishing")
        except (RequestPlaneError, RuntimeError, TimeoutError, ValueError) as e:
            self.stats.prefill_failures += 1
            span.event("prefill_failed", worker=worker, error=str(e))
            self.registry.mark_suspect(worker)
            log.warning("prefill of %s on %s failed (%s): the decode worker prefills it", request_id, worker, e)
            return None
        finally:
            router.finished(request_id)

    def release(self, params: KvTransferParams) -> None:
        """Free a held transfer nobody will pull (in the background)."""
        self.stats.releases += 1
        t = asyncio.get_running_loop().create_task(self._release(params))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _release(self, params: KvTransferParams) -> None:
        await send_release(self.client, params)

    async def close(self) -> None:
        await cancel_and_wait(self._tasks)
