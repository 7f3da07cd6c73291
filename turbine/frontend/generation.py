"""One choice of one request: route it, stream tokens from a worker, turn them into text.

If the worker's stream breaks (the process died, the connection dropped, or it shut down and
aborted the request), the choice migrates: the router picks another worker and the request
continues from the prompt plus the tokens generated so far, so the client sees one stream.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import NamedTuple

import msgspec

from turbine.frontend.detokenizer import IncrementalDetokenizer
from turbine.frontend.errors import ApiError
from turbine.frontend.metrics import ModelMetrics
from turbine.frontend.model_registry import ModelRegistry, ServedModel
from turbine.frontend.stop_strings import StopStringMatcher
from turbine.protocols.generate import GenerateDelta, GenerateRequest, SamplingOptions, StopConditions
from turbine.runtime.request_plane import (
    DeadlineExceeded,
    RemoteError,
    RequestPlaneClient,
    StreamBroken,
    UnknownEndpoint,
    WorkerUnavailable,
)

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


class Generation:
    """Shared by all requests of a frontend: the routing, transport and metric handles."""

    def __init__(self, registry: ModelRegistry, client: RequestPlaneClient,
                 request_timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S):
        self.registry = registry
        self.client = client
        self.request_timeout_s = request_timeout_s
        self.migrations = 0  # streams that had started, continued on another worker
        self.retries = 0  # requests a worker refused before starting them, sent to another

    async def stream_choice(self, m: ServedModel, spec: ChoiceSpec,
                            mm: ModelMetrics | None) -> AsyncIterator[str | ChoiceEnd]:
        """Yield text pieces as they become final, then one ChoiceEnd.

        ``mm`` (given for one choice per request) receives TTFT and inter-token latencies.
        """
        assert m.tokenizer is not None
        detok = IncrementalDetokenizer(m.tokenizer, prompt_ids=spec.prompt_ids, skip_special_tokens=True)
        matcher = StopStringMatcher(spec.stop_strings) if spec.stop_strings else None
        generated: list[int] = []
        cached = 0
        finish: str | None = None
        stop_hit = False
        router = m.router
        t_last = time.perf_counter()
        deadline = None if self.request_timeout_s is None else time.monotonic() + self.request_timeout_s
        first_token = True
        for attempt in range(MAX_MIGRATIONS + 1):
            tokens = spec.prompt_ids + generated if generated else spec.prompt_ids
            sub_id = f"{spec.request_id}.{attempt}" if attempt else spec.request_id
            decision = router.route(sub_id, self.registry.candidates(m), tokens)
            worker_id = decision.worker_id
            inst = m.workers[worker_id]
            req = GenerateRequest(
                request_id=sub_id, token_ids=tokens, sampling=spec.sampling,
                stop=StopConditions(
                    max_tokens=spec.stop.max_tokens - len(generated),
                    min_tokens=max(0, spec.stop.min_tokens - len(generated)),
                    ignore_eos=spec.stop.ignore_eos, stop_token_ids=spec.stop.stop_token_ids),
            )
            routed_first = observed = False
            stream = None
            try:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceeded("the request's deadline passed")
                try:
                    stream = self.client.stream(inst.address, "generate", _req_encoder.encode(req), timeout=remaining)
                except ValueError as e:  # an address this client cannot use
                    raise WorkerUnavailable(str(e)) from None
                async for raw in stream:
                    d = _delta_decoder.decode(raw)
                    if d.error:
                        raise ApiError(500, f"worker error: {d.error}")
                    if not routed_first:
                        routed_first = True
                        router.first_token(sub_id)
                        self.registry.mark_healthy(worker_id)
                    if d.cached_tokens is not None and not observed:
                        observed = True
                        router.observe_actual(sub_id, decision.overlap_blocks, d.cached_tokens)
                        if attempt == 0:
                            cached = d.cached_tokens
                    if d.token_ids:
                        now = time.perf_counter()
                        if mm is not None:
                            (mm.ttft if first_token else mm.itl).observe(now - t_last)
                        t_last = now
                        first_token = False
                        generated.extend(d.token_ids)
                        text = detok.push(d.token_ids)
                        if matcher is not None:
                            text, stopped = matcher.push(text)
                            if text:
                                yield text
                            if stopped:
                                finish, stop_hit = "stop", True
                                break
                        elif text:
                            yield text
                    if d.finish_reason is not None:
                        finish = d.finish_reason
                        break
            except (StreamBroken, WorkerUnavailable) as e:
                self.registry.mark_suspect(worker_id)
                if routed_first or isinstance(e, StreamBroken):
                    self.migrations += 1
                else:
                    self.retries += 1
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
                finish = None
                continue
            if finish is None:
                raise ApiError(502, "the worker closed the stream without finishing the request")
            break
        else:
            raise ApiError(503, f"the request failed on {MAX_MIGRATIONS + 1} workers in a row")
        if finish == "error":
            raise ApiError(500, "the worker failed while generating")
        if not stop_hit:
            tail = detok.flush()
            if matcher is not None:
                text, stopped = matcher.push(tail)
                tail = text if stopped else text + matcher.flush()
                if stopped:
                    finish = "stop"
            if tail:
                yield tail
        yield ChoiceEnd(finish, len(generated), cached)
