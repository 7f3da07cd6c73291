"""One choice of one request: route it, stream tokens from a worker, turn them into text.

If the worker's stream breaks (the process died, the connection dropped, or it shut down and
aborted the request), the choice migrates: the router picks another worker and the request
continues from the prompt plus the tokens generated so far, so the client sees one stream.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import NamedTuple

import msgspec

from turbine.disagg import DisaggConfig, PrefillLeg
from turbine.frontend.detokenizer import IncrementalDetokenizer
from turbine.frontend.errors import ApiError
from turbine.frontend.metrics import ModelMetrics
from turbine.frontend.model_registry import ModelRegistry, ServedModel
from turbine.frontend.stop_strings import StopStringMatcher
from turbine.protocols.generate import GenerateDelta, GenerateRequest, SamplingOptions, StopConditions
from turbine.protocols.kv_transfer import KvTransferParams, KvTransferRequest
from turbine.runtime import tracing
from turbine.runtime.request_plane import (
    DeadlineExceeded,
    RemoteError,
    RequestPlaneClient,
    StreamBroken,
    UnknownEndpoint,
    WorkerUnavailable,
)

log = logging.getLogger("turbine.frontend")

MAX_MIGRATIONS = 3
DEFAULT_REQUEST_TIMEOUT_S = 600.0  # end to end, migrations included (the OpenAI client's own default)
_delta_decoder = msgspec.msgpack.Decoder(GenerateDelta)
_req_encoder = msgspec.msgpack.Encoder()


class ChoiceEnd(NamedTuple):
    finish_reason: str
    completion_tokens: int
    cached_tokens: int


class ChoiceSpec(NamedTuple):
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingOptions
    stop: StopConditions
    stop_strings: list[str]
    traceparent: str | None = None  # the caller's trace context (an HTTP traceparent header), when tracing


class _Text:
    """Tokens -> final text of one choice: detokenizer, stop strings, token timings."""

    __slots__ = ("detok", "matcher", "generated", "mm", "t_last", "first", "stop_hit")

    def __init__(self, m: ServedModel, spec: ChoiceSpec, mm: ModelMetrics | None) -> None:
        assert m.tokenizer is not None
        self.detok = IncrementalDetokenizer(m.tokenizer, prompt_ids=spec.prompt_ids, skip_special_tokens=True)
        self.matcher = StopStringMatcher(spec.stop_strings) if spec.stop_strings else None
        self.generated: list[int] = []
        self.mm = mm
        self.t_last = time.perf_counter()
        self.first = True
        self.stop_hit = False

    def push(self, token_ids: list[int]) -> str:
        """Text made final by these tokens; sets ``stop_hit`` when a stop string matched."""
        now = time.perf_counter()
        if self.mm is not None:
            (self.mm.ttft if self.first else self.mm.itl).observe(now - self.t_last)
        self.t_last = now
        self.first = False
        self.generated.extend(token_ids)
        text = self.detok.push(token_ids)
        if self.matcher is not None:
            text, self.stop_hit = self.matcher.push(text)
        return text

    def tail(self) -> tuple[str, bool]:
        """What the detokenizer held back, once the stream ended; (text, a stop string matched)."""
        tail = self.detok.flush()
        if self.matcher is None:
            return tail, False
        text, stopped = self.matcher.push(tail)
        return (text if stopped else text + self.matcher.flush()), stopped


class Generation:
    """Shared by all requests of a frontend: the routing, transport and metric handles."""

    def __init__(self, registry: ModelRegistry, client: RequestPlaneClient,
                 request_timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S,
                 disagg: DisaggConfig | None = None):
        self.registry = registry
        self.client = client
        self.request_timeout_s = request_timeout_s
        self.prefill = PrefillLeg(registry, client, disagg)
        self.migrations = 0  # streams that had started, continued on another worker
        self.retries = 0  # requests a worker refused before starting them, sent to another

    def stream_choice(self, m: ServedModel, spec: ChoiceSpec,
                      mm: ModelMetrics | None) -> AsyncIterator[str | ChoiceEnd]:
        """Yield text pieces as they become final, then one ChoiceEnd.

        ``mm`` (given for one choice per request) receives TTFT and inter-token latencies.
        A disaggregated model's prompt may first go to a prefill worker (turbine/disagg); the
        rest streams from a decode worker that pulls the prompt's KV. With tracing on, the choice
        is a ``turbine.request`` span; workers' spans are its children (runtime/tracing.py).
        """
        tracer = tracing.tracer()
        if not tracer.enabled:
            return self._stream_choice(m, spec, mm, tracing.NOOP_SPAN)
        span = tracer.start("turbine.request", spec.traceparent, attributes={
            "turbine.request_id": spec.request_id, "turbine.model": m.name,
            "turbine.prompt_tokens": len(spec.prompt_ids), "turbine.max_tokens": spec.stop.max_tokens})
        return _traced(self._stream_choice(m, spec, mm, span), span)

    async def _stream_choice(self, m: ServedModel, spec: ChoiceSpec, mm: ModelMetrics | None,
                             span: tracing.Span) -> AsyncIterator[str | ChoiceEnd]:
        traced = span.traceparent is not None
        text = _Text(m, spec, mm)
        generated = text.generated
        cached = 0
        finish: str | None = None
        deadline = None if self.request_timeout_s is None else time.monotonic() + self.request_timeout_s
        source: KvTransferParams | None = None  # a prefill worker holds the prompt's KV for the decode leg
        if self.prefill.plan(m, spec.prompt_ids) == "remote":
            pre = await self.prefill.run(m, spec.request_id + ".p", spec, deadline, span)
            if pre is not None:
                cached = pre.cached_tokens
                piece = text.push(pre.token_ids)
                if piece:
                    yield piece
                if text.stop_hit or pre.finish_reason == "stop" or spec.stop.max_tokens <= len(generated):
                    finish = "stop" if (text.stop_hit or pre.finish_reason == "stop") else "length"
                    if pre.params is not None:
                        self.prefill.release(pre.params)
                else:
                    source = pre.params
        router = m.router
        attempt = 0
        try:
            while finish is None:
                if attempt > MAX_MIGRATIONS:
                    raise ApiError(503, f"the request failed on {MAX_MIGRATIONS + 1} workers in a row")
                tokens = spec.prompt_ids + generated if generated else spec.prompt_ids
                sub_id = f"{spec.request_id}.{attempt}" if attempt else spec.request_id
                attempt += 1
                remote = source is not None
                t_route = time.time_ns() if traced else 0
                decision = router.route(sub_id, self.registry.candidates(m), tokens, remote_kv=remote)
                queued = decision is None
                if queued:  # every worker is at its queue limit: wait in line
                    decision = await m.queue.admit(
                        lambda: router.route(sub_id, self.registry.candidates(m), tokens, remote_kv=remote), deadline)
                worker_id = decision.worker_id
                inst = m.workers[worker_id]
                if traced:
                    tracing.record_route(span, t_route, router, decision, attempt, queued=queued)
                req = GenerateRequest(
                    request_id=sub_id, token_ids=tokens, sampling=spec.sampling,
                    stop=StopConditions(
                        max_tokens=spec.stop.max_tokens - len(generated),
                        min_tokens=max(0, spec.stop.min_tokens - len(generated)),
                        ignore_eos=spec.stop.ignore_eos, stop_token_ids=spec.stop.stop_token_ids),
                    kv_transfer=None if source is None else KvTransferRequest(source=source),
                    traceparent=span.traceparent,
                )
                routed_first = observed = False
                stream = None
                try:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise DeadlineExceeded("the request's deadline passed")
                    try:
                        stream = self.client.stream(inst.address, "generate", _req_encoder.encode(req),
                                                    timeout=remaining)
                    except ValueError as e:  # an address this client cannot use
                        raise WorkerUnavailable(str(e)) from None
                    async for raw in stream:
                        d = _delta_decoder.decode(raw)
                        if traced and not routed_first:
                            span.event("first_token" if attempt == 1 else "first_frame", worker=worker_id)
                        if d.error:
                            if source is not None and not routed_first:  # it refused the transfer
                                raise _TransferRefused(d.error)
                            raise ApiError(500, f"worker error: {d.error}")
                        if not routed_first:
                            routed_first = True
                            router.first_token(sub_id)
                            self.registry.mark_healthy(worker_id)
                            if source is not None:  # the decode worker pulled (or failed and prefilled): it released
                                source = None
                                self.prefill.stats.pulled_blocks += d.kv_pulled_blocks or 0
                        if d.cached_tokens is not None and not observed:
                            observed = True
                            router.observe_actual(sub_id, decision.overlap_blocks, d.cached_tokens)
                            if attempt == 1 and not generated:
                                cached = d.cached_tokens
                        if d.token_ids:
                            piece = text.push(d.token_ids)
                            if piece:
                                yield piece
                            if text.stop_hit:
                                finish = "stop"
                                break
                        if d.finish_reason is not None:
                            finish = d.finish_reason
                            break
                except _TransferRefused as e:
                    log.warning("worker %s refused the KV of %s (%s): it prefills the prompt itself", worker_id,
                                spec.request_id, e)
                    self.prefill.stats.transfer_errors += 1
                    assert source is not None
                    self.prefill.release(source)
                    source = None
                    self.retries += 1
                    continue
                except (StreamBroken, WorkerUnavailable) as e:
                    self.registry.mark_suspect(worker_id)
                    if routed_first:  # the stream had started: it continues elsewhere
                        self.migrations += 1
                    else:  # nothing came back yet (refused, or the connection went as it was sent)
                        self.retries += 1
                    span.event("migration" if routed_first else "retry", worker=worker_id, error=str(e))
                    continue
                except DeadlineExceeded:
                    raise ApiError(504, "the request timed out") from None
                except (RemoteError, UnknownEndpoint) as e:
                    raise ApiError(500, f"worker error: {e}") from None
                finally:
                    router.finished(sub_id)
                    if stream is not None:
                        with contextlib.suppress(Exception):
                            await stream.aclose()
                if finish == "abort":  # the worker shut down under us: continue elsewhere
                    self.registry.mark_suspect(worker_id)
                    self.migrations += 1
                    span.event("migration", worker=worker_id, error="the worker aborted the request")
                    finish = None
                    continue
                if finish is None:
                    raise ApiError(502, "the worker closed the stream without finishing the request")
        finally:
            if source is not None:  # the decode leg never took the held KV
                self.prefill.release(source)
        if finish == "error":
            raise ApiError(500, "the worker failed while generating")
        if not text.stop_hit:
            tail, stopped = text.tail()
            if stopped:
                finish = "stop"
            if tail:
                yield tail
        yield ChoiceEnd(finish, len(generated), cached)


async def _traced(inner: AsyncIterator[str | ChoiceEnd], span: tracing.Span) -> AsyncIterator[str | ChoiceEnd]:
    """``inner``'s items, with the request span closed (and its outcome set) when it ends."""
    try:
        async for item in inner:
            if isinstance(item, ChoiceEnd):
                span.set("turbine.finish_reason", item.finish_reason)
                span.set("turbine.completion_tokens", item.completion_tokens)
                span.set("turbine.cached_tokens", item.cached_tokens)
            yield item
    except ApiError as e:
        span.set("http.response.status_code", e.status)
        span.error(e.message)
        raise
    except (GeneratorExit, asyncio.CancelledError):
        span.set("turbine.cancelled", True)  # the client left
        raise
    except Exception as e:
        span.error(f"{type(e).__name__}: {e}")
        raise
    finally:
        await inner.aclose()  # type: ignore[attr-defined]
        span.end()


class _TransferRefused(Exception):
    """A decode worker refused a prefill's KV (another layout, stale or malformed parameters)."""
