"""The OpenAI endpoints: validate, preprocess, fan out choices, and write JSON or SSE."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec

from turbine.frontend.errors import ApiError
from turbine.frontend.generation import ChoiceEnd, ChoiceSpec, Generation
from turbine.frontend.http_server import HttpRequest, HttpResponse
from turbine.frontend.metrics import FrontendMetrics, ModelMetrics
from turbine.frontend.model_registry import ModelRegistry, ServedModel
from turbine.frontend.openai_protocol import (
    MAX_CHOICES,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatResponseMessage,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelInfo,
    ModelList,
    PromptTokensDetails,
    Usage,
    decode_request,
    model_named,
    stop_list,
    validate_chat,
    validate_completion,
)
from turbine.frontend.openapi import OpenApiRoute
from turbine.protocols.generate import SamplingOptions, StopConditions

log = logging.getLogger("turbine.frontend")

INLINE_TOKENIZE_CHARS = 8192  # longer prompts are tokenized on a thread, off the event loop
# Text longer than context_length * this cannot fit: real text averages 2-5 characters a token,
# so the bound refuses only prompts that would be refused after a long tokenization anyway.
MAX_CHARS_PER_TOKEN = 32
_json = msgspec.json.Encoder()
_DONE = b"data: [DONE]\n\n"
Route = Callable[[HttpRequest, HttpResponse], Awaitable[None]]


class OpenAIApi:
    def __init__(self, registry: ModelRegistry, generation: Generation, metrics: FrontendMetrics,
                 max_inflight: int = 0, api_keys: tuple[str, ...] = ()):
        self.registry = registry
        self.generation = generation
        self.metrics = metrics
        self.max_inflight = max_inflight
        self.api_keys = tuple(k.encode() for k in api_keys)
        self.inflight = 0
        # path -> method -> (handler, metrics label, needs the API key)
        self.routes: dict[str, dict[str, tuple[Route, str, bool]]] = {}
        # prefix -> method -> (handler, label, False): a subtree its handler routes and
        # authenticates itself (the dashboard); not part of the OpenAPI document
        self.mounts: dict[str, dict[str, tuple[Route, str, bool]]] = {}
        self.add_route("POST", "/v1/chat/completions", self.chat_completions, "chat")
        self.add_route("POST", "/v1/completions", self.completions, "completions")
        self.add_route("GET", "/v1/models", self.list_models, "models")
        self.add_route("GET", "/v1/models/{model}", self.get_model, "models")
        self.add_route("GET", "/health", self.health, "health", auth=False)
        self.add_route("GET", "/metrics", self.prometheus, "metrics")
        self.add_route("GET", "/openapi.json", OpenApiRoute(self), "openapi", auth=False)

    def add_route(self, method: str, path: str, handler: Route, label: str, *, auth: bool = True) -> None:
        """``path`` may end in one ``{name}`` segment: the handler reads it as ``req.path_arg``."""
        self.routes.setdefault(path, {})[method] = (handler, label, auth)

    def mount(self, prefix: str, handlers: dict[str, Route], label: str) -> None:
        """Hand ``prefix`` and every path under it to ``handlers`` (by method); the handler reads
        the rest of the path (after ``prefix/``) as ``req.path_arg`` and checks keys itself."""
        self.mounts[prefix] = {m: (h, label, False) for m, h in handlers.items()}

    def _match(self, path: str) -> tuple[dict[str, tuple[Route, str, bool]] | None, str]:
        methods = self.routes.get(path)
        if methods is not None:
            return methods, ""
        head, _, tail = path.rpartition("/")
        if tail:
            methods = self.routes.get(head + "/{" + "model}")
            if methods is not None:
                return methods, urllib.parse.unquote(tail)
        for prefix, methods in self.mounts.items():
            if path == prefix or path.startswith(prefix + "/"):
                return methods, path[len(prefix) + 1:]
        return None, ""

    # --- dispatch ------------------------------------------------------------------------------
    async def handle(self, req: HttpRequest, resp: HttpResponse) -> None:
        """Route, authenticate, run; every reply (4xx included) is counted in the request metrics."""
        methods, arg = self._match(req.path)
        label = "other"
        try:
            if methods is None:
                raise ApiError(404, f"no route {req.method} {req.path}")
            method = "GET" if req.method == "HEAD" else req.method
            allow = ", ".join(sorted({*methods, *(("HEAD",) if "GET" in methods else ()), "OPTIONS"}))
            if req.method == "OPTIONS":
                resp.send(204, b"", headers=[("allow", allow)])
                return
            route = methods.get(method)
            if route is None:
                raise ApiError(405, f"method {req.method} is not allowed on {req.path}", headers=[("allow", allow)])
            handler, label, auth = route
            if auth and self.api_keys:
                self._authenticate(req)
            req.path_arg = arg
            await handler(req, resp)
        except (asyncio.CancelledError, ConnectionError):
            resp.status = 499  # the client closed the request
            raise
        except ApiError as e:
            if not resp.started:
                resp.send(e.status, e.body(), headers=e.headers)
            elif not resp.finished:  # headers are out: report in-band, then end the stream
                resp.write_chunk(b"data: " + e.body() + b"\n\n" + _DONE)
                resp.end_stream()
        finally:
            if label not in ("health", "metrics"):  # a label only for models that exist: bounded
                known = req.model if req.model in self.registry.models else ""
                self.metrics.count(known, label, resp.status or 499)

    def authenticate(self, req: HttpRequest) -> None:
        """Raise the API's 401 unless the request carries one of its keys (none configured: pass)."""
        if self.api_keys:
            self._authenticate(req)

    def _authenticate(self, req: HttpRequest) -> None:
        header = req.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if not header:
            raise ApiError(401, "You didn't provide an API key. Provide it in the Authorization header "
                                "(Authorization: Bearer YOUR_KEY).", code="invalid_api_key",
                           headers=[("www-authenticate", "Bearer")])
        given = key.strip().encode("latin-1", "replace") if scheme.lower() == "bearer" else b""
        # compare against every key in full, so timing says nothing about which part matched
        ok = False
        for k in self.api_keys:
            ok |= hmac.compare_digest(given, k)
        if not ok:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key",
                           headers=[("www-authenticate", "Bearer")])

    async def list_models(self, req: HttpRequest, resp: HttpResponse) -> None:
        data = [self._model_info(m) for m in self.registry.served()]
        resp.send(200, _json.encode(ModelList("list", data)))

    async def get_model(self, req: HttpRequest, resp: HttpResponse) -> None:
        m = self.registry.models.get(req.path_arg)
        if m is None or not m.workers:
            raise ApiError(404, f"The model `{req.path_arg}` does not exist.", param="model",
                           code="model_not_found")
        resp.send(200, _json.encode(self._model_info(m)))

    @staticmethod
    def _model_info(m: ServedModel) -> ModelInfo:
        return ModelInfo(m.name, "model", m.created, "turbine")

    async def health(self, req: HttpRequest, resp: HttpResponse) -> None:
        served = self.registry.served()
        models = {m.name: sorted(m.workers) for m in served}
        workers = {i.instance_id: {"model": m.name, "address": i.address, **i.metadata}
                   for m in served for i in m.workers.values()}
        loading = sorted(m.name for m in served if m.tokenizer is None)  # registered, not servable yet (503)
        status = "ok" if len(loading) < len(served) else "loading" if served else "no_workers"
        resp.send(200, _json.encode({"status": status, "models": models, "loading": loading, "workers": workers,
                                     "inflight": self.inflight}))

    async def prometheus(self, req: HttpRequest, resp: HttpResponse) -> None:
        resp.send(200, self.metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")

    # --- the two generation endpoints --------------------------------------------------------
    async def chat_completions(self, req: HttpRequest, resp: HttpResponse) -> None:
        body: ChatCompletionRequest = self._decode(req, ChatCompletionRequest)
        validate_chat(body)
        m = self._model(body.model)
        assert m.tokenizer is not None
        chars = 0
        for x in body.messages:
            if isinstance(x.content, str):
                chars += len(x.content)
            elif x.content:
                chars += sum(len(part.get("text") or "") for part in x.content)
        self._check_prompt_chars(m, chars, "messages")
        messages = [msgspec.structs.asdict(x) for x in body.messages]
        for msg in messages:
            for k in [k for k, v in msg.items() if v is None and k != "content"]:
                del msg[k]
        try:
            prompt = m.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, **(body.chat_template_kwargs or {}))
        except ApiError:
            raise
        except Exception as e:  # jinja2 TemplateError and template-raised exceptions
            raise ApiError(400, f"cannot apply the chat template: {e}", param="messages") from None
        prompt_ids = await self._encode(m, prompt, add_special_tokens=False)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        await self._serve(req, resp, "chat", body, m, [prompt_ids], max_tokens, [""])

    async def completions(self, req: HttpRequest, resp: HttpResponse) -> None:
        body: CompletionRequest = self._decode(req, CompletionRequest)
        validate_completion(body)
        m = self._model(body.model)
        p = body.prompt
        n_prompts = 1 if isinstance(p, str) or isinstance(p[0], int) else len(p)
        if n_prompts * body.n > MAX_CHOICES:
            raise ApiError(400, f"{n_prompts} prompts x n={body.n} asks for {n_prompts * body.n} choices; at most "
                                f"{MAX_CHOICES} are allowed per request", param="n")
        for text in ([p] if isinstance(p, str) else p if isinstance(p[0], str) else ()):
            self._check_prompt_chars(m, len(text), "prompt")  # type: ignore[arg-type]
        if isinstance(p, str):
            prompts = [await self._encode(m, p, add_special_tokens=True)]
            texts = [p]
        elif isinstance(p[0], int):
            prompts, texts = [list(p)], [None]  # type: ignore[list-item]
        elif isinstance(p[0], str):
            prompts = [await self._encode(m, s, add_special_tokens=True) for s in p]  # type: ignore[arg-type]
            texts = list(p)  # type: ignore[arg-type]
        else:
            prompts, texts = [list(x) for x in p], [None] * len(p)  # type: ignore[union-attr, list-item]
        vocab = m.tokenizer.vocab_size if m.tokenizer else 0
        for ids in prompts:
            if any(t >= vocab for t in ids):
                raise ApiError(400, f"prompt token ids must be below the vocabulary size {vocab}", param="prompt")
        echo = [(t if t is not None else m.tokenizer.decode(ids, skip_special_tokens=False))  # type: ignore[union-attr]
                if body.echo else "" for t, ids in zip(texts, prompts, strict=True)]
        await self._serve(req, resp, "completions", body, m, prompts, body.max_tokens, echo)

    # --- shared ---------------------------------------------------------------------------------
    @staticmethod
    def _decode(req: HttpRequest, kind: type[Any]) -> Any:
        try:
            body = decode_request(req.body, kind)
        except ApiError:
            req.model = model_named(req.body)
            raise
        req.model = body.model
        return body

    def _model(self, name: str) -> ServedModel:
        m = self.registry.get(name)
        self.registry.candidates(m)  # 503 early, before any tokenizing, when nobody serves it
        if self.max_inflight and self.inflight >= self.max_inflight:
            raise ApiError(429, f"the server is at its in-flight limit of {self.max_inflight} requests; retry later")
        return m

    @staticmethod
    def _check_prompt_chars(m: ServedModel, chars: int, param: str) -> None:
        """Refuse, before tokenizing it, text too long to fit the context at any plausible density."""
        limit = m.card.context_length * MAX_CHARS_PER_TOKEN
        if chars > limit:
            raise ApiError(400, f"The prompt has {chars} characters; this model's maximum context length is "
                                f"{m.card.context_length} tokens, and prompts over {limit} characters are refused "
                                "without tokenizing them.", param=param, code="context_length_exceeded")

    async def _encode(self, m: ServedModel, text: str, add_special_tokens: bool) -> list[int]:
        tok = m.tokenizer
        assert tok is not None
        if len(text) <= INLINE_TOKENIZE_CHARS:
            return tok.encode(text, add_special_tokens=add_special_tokens)
        return await asyncio.to_thread(tok.encode, text, add_special_tokens=add_special_tokens)

    def _specs(self, body: Any, m: ServedModel, prompts: list[list[int]], max_tokens: int | None,
               rid: str) -> list[ChoiceSpec]:
        ctx = m.card.context_length
        stops = stop_list(body.stop)
        seed = body.seed
        specs = []
        for p_i, ids in enumerate(prompts):
            if len(ids) >= ctx:
                raise ApiError(400, f"This model's maximum context length is {ctx} tokens, but the prompt has "
                                    f"{len(ids)} tokens.", param="messages", code="context_length_exceeded")
            mt = max_tokens if max_tokens is not None else ctx - len(ids)
            if len(ids) + mt > ctx:
                raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                    f"{len(ids) + mt} tokens ({len(ids)} in the prompt, {mt} for the completion). "
                                    "Reduce the prompt or max_tokens.", param="max_tokens",
                               code="context_length_exceeded")
            if body.min_tokens > mt:
                raise ApiError(400, f"min_tokens ({body.min_tokens}) exceeds max_tokens ({mt})", param="min_tokens")
            stop = StopConditions(max_tokens=mt, min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
                                  stop_token_ids=tuple(body.stop_token_ids or ()))
            for j in range(body.n):
                k = p_i * body.n + j
                sampling = SamplingOptions(
                    temperature=1.0 if body.temperature is None else body.temperature,
                    top_p=1.0 if body.top_p is None else body.top_p,
                    top_k=0 if body.top_k in (None, -1) else body.top_k,
                    seed=None if seed is None else seed + k,
                )
                specs.append(ChoiceSpec(f"{rid}-{k}", ids, sampling, stop, stops))
        return specs

    async def _serve(self, req: HttpRequest, resp: HttpResponse, kind: str, body: Any, m: ServedModel,
                     prompts: list[list[int]], max_tokens: int | None, echo: list[str]) -> None:
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        specs = self._specs(body, m, prompts, max_tokens, rid)
        parent = req.headers.get("traceparent")
        if parent is not None:  # the client's trace context: the request's spans join its trace
            specs = [s._replace(traceparent=parent) for s in specs]
        mm = self.metrics.model(m.name)
        t0 = time.perf_counter()
        self.inflight += 1
        mm.inflight.inc()
        try:
            if body.stream:
                await self._stream(resp, kind, body, m, specs, rid, mm, echo)
            else:
                await self._unary(resp, kind, body, m, specs, rid, mm, echo)
        finally:
            self.inflight -= 1
            mm.inflight.dec()
            mm.e2e.observe(time.perf_counter() - t0)

    def _usage(self, specs: list[ChoiceSpec], ends: list[ChoiceEnd], mm: ModelMetrics) -> Usage:
        """Prompt tokens count once per prompt (n choices share it); completions add up."""
        per_prompt: dict[int, tuple[int, int]] = {}
        for s, e in zip(specs, ends, strict=True):
            n_prompt, cached = per_prompt.get(id(s.prompt_ids), (len(s.prompt_ids), 0))
            per_prompt[id(s.prompt_ids)] = (n_prompt, max(cached, e.cached_tokens))
        prompt = sum(p for p, _ in per_prompt.values())
        cached = sum(c for _, c in per_prompt.values())
        completion = sum(e.completion_tokens for e in ends)
        mm.prompt_tokens.inc(prompt)
        mm.output_tokens.inc(completion)
        mm.cached_tokens.inc(cached)
        return Usage(prompt, completion, prompt + completion, PromptTokensDetails(cached))

    async def _unary(self, resp: HttpResponse, kind: str, body: Any, m: ServedModel, specs: list[ChoiceSpec],
                     rid: str, mm: ModelMetrics, echo: list[str]) -> None:
        async def collect(i: int, spec: ChoiceSpec) -> tuple[str, ChoiceEnd]:
            parts: list[str] = [echo[i // body.n]] if echo[i // body.n] else []
            end: ChoiceEnd | None = None
            async for piece in self.generation.stream_choice(m, spec, mm if i == 0 else None):
                if isinstance(piece, str):
                    parts.append(piece)
                else:
                    end = piece
            assert end is not None
            return "".join(parts), end

        if len(specs) == 1:
            results = [await collect(0, specs[0])]
        else:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(collect(i, s)) for i, s in enumerate(specs)]
            results = [t.result() for t in tasks]
        usage = self._usage(specs, [e for _, e in results], mm)
        created = int(time.time())
        if kind == "chat":
            out: Any = ChatCompletion(rid, "chat.completion", created, m.name, [
                ChatChoice(i, ChatResponseMessage("assistant", text), None, end.finish_reason)
                for i, (text, end) in enumerate(results)], usage)
        else:
            out = Completion(rid, "text_completion", created, m.name, [
                CompletionChoice(i, text, None, end.finish_reason) for i, (text, end) in enumerate(results)], usage)
        resp.send(200, _json.encode(out))

    async def _stream(self, resp: HttpResponse, kind: str, body: Any, m: ServedModel, specs: list[ChoiceSpec],
                      rid: str, mm: ModelMetrics, echo: list[str]) -> None:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        head = b'data: {"id":"%s","object":"%s","created":%d,"model":%s,"choices":[{"index":' % (
            rid.encode(), b"chat.completion.chunk" if kind == "chat" else b"text_completion",
            int(time.time()), _json.encode(m.name))
        usage_tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"
        if kind == "chat":
            mid = b',"delta":{"content":'
            tail = b'},"logprobs":null,"finish_reason":null}]' + usage_tail
        else:
            mid = b',"text":'
            tail = b',"logprobs":null,"finish_reason":null}]' + usage_tail

        def content(i: int, text: str) -> bytes:
            return head + b"%d" % i + mid + _json.encode(text) + tail

        def finish(i: int, reason: str) -> bytes:
            if kind == "chat":
                return head + b'%d,"delta":{},"logprobs":null,"finish_reason":%s}]' % (i, _json.encode(reason)) + usage_tail
            return head + b'%d,"text":"","logprobs":null,"finish_reason":%s}]' % (i, _json.encode(reason)) + usage_tail

        # The first generated tokens decide the status: errors before them are plain 4xx/5xx.
        streams = [self.generation.stream_choice(m, s, mm if i == 0 else None) for i, s in enumerate(specs)]
        ends: list[ChoiceEnd | None] = [None] * len(specs)
        try:
            merged = streams[0] if len(streams) == 1 else _merge(streams)
            first = await _first(merged)
            resp.start_stream(200)
            for i in range(len(specs)):
                if kind == "chat":
                    resp.write_chunk(head + b'%d,"delta":{"role":"assistant","content":""},"logprobs":null,'
                                     b'"finish_reason":null}]' % i + usage_tail)
                elif echo[i // body.n]:
                    resp.write_chunk(content(i, echo[i // body.n]))
            pending = 0
            async for item in _chain(first, merged):
                i, piece = item if len(streams) > 1 else (0, item)
                if isinstance(piece, str):
                    resp.write_chunk(content(i, piece))
                    pending += 1
                    if pending >= 16:
                        pending = 0
                        await resp.drain()
                else:
                    ends[i] = piece
                    resp.write_chunk(finish(i, piece.finish_reason))
            if any(e is None for e in ends):
                raise ApiError(502, "a choice ended without a finish reason")
            usage = self._usage(specs, ends, mm)  # type: ignore[arg-type]
            if include_usage:
                resp.write_chunk(head[: head.index(b'"choices"')] + b'"choices":[],"usage":' + _json.encode(usage) + b"}\n\n")
            resp.write_chunk(_DONE)
            resp.end_stream()
        finally:
            for s in streams:
                with contextlib.suppress(Exception):
                    await s.aclose()  # type: ignore[attr-defined]


_EMPTY = object()


async def _first(it: AsyncIterator[Any]) -> Any:
    try:
        return await it.__anext__()
    except StopAsyncIteration:
        return _EMPTY


async def _chain(first: Any, it: AsyncIterator[Any]) -> AsyncIterator[Any]:
    if first is _EMPTY:
        return
    yield first
    async for x in it:
        yield x


async def _merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several choice streams as their pieces arrive (n > 1)."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue(maxsize=256)
    sentinel = object()

    async def pump(i: int, s: AsyncIterator[Any]) -> None:
        async for x in s:
            await queue.put((i, x))

    async def run_all() -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                for i, s in enumerate(streams):
                    tg.create_task(pump(i, s))
        except BaseExceptionGroup as eg:
            await queue.put((-1, eg.exceptions[0]))
            return
        await queue.put((-1, sentinel))

    runner = asyncio.get_running_loop().create_task(run_all())
    try:
        while True:
            i, x = await queue.get()
            if i < 0:
                if x is sentinel:
                    return
                raise x
            yield i, x
    finally:
        runner.cancel()
        with contextlib.suppress(BaseException):
            await runner
