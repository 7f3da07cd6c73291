"""Load generator for any OpenAI-compatible endpoint (`/v1/chat/completions` or `/v1/completions`).

Closed loop (fixed concurrency: C workers, each sends its next request when the last finishes)
or open loop (Poisson arrivals at a fixed rate, seeded, never waiting for responses). Every
request asks for exactly `max_tokens` tokens (`ignore_eos`, `min_tokens`), so runs against
different servers do the same work. Bodies are serialised once, up front, and sent as bytes:
aiohttp's `json=` path writes headers and body separately and meets ~40 ms Nagle/delayed-ACK
stalls on loopback.

    python -m turbine.bench.loadgen --url http://127.0.0.1:8000/v1 --concurrency 16 -n 200 \
        --prompt-tokens 500 --max-tokens 50 --pids frontend=1234

A run whose first requests all fail stops early (`AllFailed`) instead of sending all of them.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from time import perf_counter
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec

from turbine.bench.cpu import CpuMeter, Target, parse_pids
from turbine.bench.prompts import build_prompts
from turbine.bench.stats import LoadReport, RequestResult, format_table, summarize

if TYPE_CHECKING:  # imported where used: it takes ~0.25 s, and only a live run needs it
    import aiohttp

_HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}


@dataclass
class LoadConfig:
    """One load phase. Exactly one of `concurrency` (closed loop) or `rate` (open loop, req/s)."""

    url: str = "http://127.0.0.1:8000"  # http://h:p, http://h:p/v1 or a full endpoint; see endpoint_url
    model: str | None = None  # None: the first model listed by GET /v1/models
    num_requests: int = 200
    concurrency: int | None = 16
    rate: float | None = None
    prompt_tokens: int = 500
    shared_prefix_tokens: int = 0
    max_tokens: int = 50
    ignore_eos: bool = True
    stream: bool = True
    fresh_conn: bool = False  # a new TCP connection per request (Connection: close)
    completions: bool = False  # /v1/completions with "prompt" instead of chat "messages"
    warmup: int | None = None  # None: one request per concurrency slot (8 in open loop)
    seed: int = 0
    pids: Sequence[Target] | str = ()  # servers whose CPU time is measured; see cpu.parse_pids
    timeout_s: float = 300.0
    tokenizer: str | None = None  # tokenizer.json (or its dir) for exact prompt lengths
    prompts: Sequence[str] | None = None  # explicit prompts (cycled) instead of generated ones
    label: str = ""
    extra_body: dict[str, Any] = field(default_factory=dict)  # merged into every request body
    progress: bool = True  # a tqdm bar per phase on stderr (off for in-process benchmarks)

    def validate(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of concurrency (closed loop) or rate (open loop)")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests/s, got {self.rate}")
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.warmup is not None and self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.prompts is not None and not self.prompts:
            raise ValueError("prompts, when given, must not be empty")
        self.endpoint()  # raises on a URL we cannot place

    def endpoint(self) -> str:
        return endpoint_url(self.url, self.completions)

    def warmup_count(self) -> int:
        if self.warmup is not None:
            return self.warmup
        return self.concurrency if self.concurrency is not None else 8


# ---- URLs --------------------------------------------------------------------------------------
_CHAT, _COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def _split_url(url: str) -> tuple[str, str | None]:
    """(root, endpoint): `url` without its /v1 part, and the /v1 endpoint it names, if any.

    Users pass a bare ``http://h:p``, the ``http://h:p/v1`` that `turbine serve` prints, or a
    full endpoint URL; appending ``/v1/...`` to whatever was given posted to ``/v1/v1/...`` and
    failed every request. A prefix before /v1 (a reverse proxy) is kept; any other path is
    refused rather than guessed at.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"url must start with http:// or https://, got {url!r}")
    path, named = parts.path.rstrip("/"), None
    for endpoint in (_CHAT, _COMPLETIONS):
        if path.endswith(endpoint):
            path, named = path[: -len(endpoint)], endpoint
            break
    else:
        if path.endswith("/v1"):
            path = path[: -len("/v1")]
        elif path:
            raise ValueError(f"cannot use url path {parts.path!r}: give http://host:port, http://host:port/v1, "
                             f"or a full {_CHAT} or {_COMPLETIONS} URL")
    return f"{parts.scheme}://{parts.netloc}{path}", named


def endpoint_url(url: str, completions: bool) -> str:
    """Where requests are posted, from any form `_split_url` accepts. An endpoint named in `url`
    must be the one the bodies are built for (chat messages vs. a completions prompt)."""
    root, named = _split_url(url)
    want = _COMPLETIONS if completions else _CHAT
    if named is not None and named != want:
        raise ValueError(f"url {url!r} names {named}, but these requests are for {want}: "
                         "give the base URL instead")
    return root + want


def models_url(url: str) -> str:
    """``GET /v1/models`` for any form `_split_url` accepts."""
    return _split_url(url)[0] + "/v1/models"


# ---- response shapes (unknown fields ignored; only what is measured is decoded) -------------
class _Details(msgspec.Struct):
    cached_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tokens_details: _Details | None = None


class _Delta(msgspec.Struct):
    content: str | None = None


class _Message(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None  # chat stream chunk
    message: _Message | None = None  # chat, no stream
    text: str | None = None  # completions


class _Body(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: Any = None


_decode_body = msgspec.json.Decoder(_Body).decode


def _has_content(body: _Body) -> bool:
    for c in body.choices:
        if c.text or (c.delta is not None and c.delta.content):
            return True
    return False


class SseStream:
    """Incremental parser of an OpenAI SSE stream: feed raw bytes with their arrival time.

    Events are blank-line separated; `data:` lines of one event are joined with newlines (SSE
    spec); `data: [DONE]` ends the stream. Every event carrying content is one timing point.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] = []
        self.content_times: list[float] = []
        self.usage: _Usage | None = None
        self.error: str | None = None
        self.done = False

    def feed(self, chunk: bytes, t: float) -> None:
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            line = line.rstrip(b"\r")
            if not line:
                self._dispatch(t)
            elif line.startswith(b"data:"):
                self._data.append(line[6:] if line[5:6] == b" " else line[5:])
            # comments (":...") and other fields (event:, id:, retry:) carry nothing we measure

    def _dispatch(self, t: float) -> None:
        if not self._data:
            return
        data, self._data = b"\n".join(self._data), []
        if data == b"[DONE]":
            self.done = True
            return
        try:
            body = _decode_body(data)
        except msgspec.DecodeError as e:
            self.error = self.error or f"bad SSE data: {e}"
            return
        if body.error is not None:
            self.error = self.error or f"error event: {str(body.error)[:200]}"
        if body.usage is not None:
            self.usage = body.usage
        if _has_content(body):
            self.content_times.append(t)


def _usage_fields(u: _Usage | None) -> dict[str, int | None]:
    if u is None:
        return {}
    details = u.prompt_tokens_details
    return {
        "prompt_tokens": u.prompt_tokens,
        "output_tokens": u.completion_tokens,
        "cached_tokens": details.cached_tokens if details is not None else None,
    }


async def send_request(
    session: aiohttp.ClientSession, url: str, body: bytes, stream: bool
) -> RequestResult:
    """Send one request and measure it; never raises (failures become an error result)."""
    import aiohttp

    t0 = perf_counter()
    try:
        async with session.post(url, data=body, headers=_HEADERS) as resp:
            if resp.status != 200:
                text = (await resp.text(errors="replace"))[:200]
                return RequestResult(ok=False, error=f"HTTP {resp.status}: {text}")
            if not stream:
                raw = await resp.read()
                e2e = perf_counter() - t0
                full = _decode_body(raw)
                if full.error is not None or not full.choices:
                    return RequestResult(ok=False, error=f"bad response: {raw[:200]!r}")
                return RequestResult(ok=True, e2e_s=e2e, **_usage_fields(full.usage))
            sse = SseStream()
            async for chunk in resp.content.iter_any():
                sse.feed(chunk, perf_counter() - t0)
            sse.feed(b"\n\n", perf_counter() - t0)  # flush a final event without blank line
            e2e = perf_counter() - t0
    except asyncio.TimeoutError:
        return RequestResult(ok=False, error="timeout")
    except (aiohttp.ClientError, OSError, msgspec.DecodeError, UnicodeDecodeError) as e:
        return RequestResult(ok=False, error=f"{type(e).__name__}: {e}"[:200])
    if sse.error is not None:
        return RequestResult(ok=False, error=sse.error)
    if not sse.done:
        return RequestResult(ok=False, error="stream ended without [DONE]")
    times = sse.content_times
    fields = _usage_fields(sse.usage)
    if fields.get("output_tokens") is None:
        fields["output_tokens"] = len(times)
    return RequestResult(
        ok=True,
        ttft_s=times[0] if times else None,
        itl_s=[b - a for a, b in zip(times, times[1:])],
        e2e_s=e2e,
        **fields,
    )


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Poisson arrivals: offsets (s) of ``n`` requests, the first at 0, exponential gaps."""
    rng = random.Random(seed)
    out, t = [], 0.0
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


Send = Callable[[bytes], Awaitable[RequestResult]]


async def closed_loop(send: Send, bodies: Sequence[bytes], concurrency: int) -> list[RequestResult]:
    """``concurrency`` workers share one queue of bodies; results keep the bodies' order."""
    results: list[RequestResult | None] = [None] * len(bodies)
    todo = iter(enumerate(bodies))

    async def worker() -> None:
        for i, body in todo:  # one shared iterator: each body goes to exactly one worker
            results[i] = await send(body)

    async with asyncio.TaskGroup() as tg:
        for _ in range(min(concurrency, len(bodies))):
            tg.create_task(worker())
    return [r for r in results if r is not None]


async def open_loop(send: Send, bodies: Sequence[bytes], rate: float, seed: int) -> list[RequestResult]:
    """Send each body at its Poisson arrival time, whether or not earlier ones have finished."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    async with asyncio.TaskGroup() as tg:
        for body, at in zip(bodies, arrival_times(len(bodies), rate, seed)):
            delay = start + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(tg.create_task(send(body)))
    return [t.result() for t in tasks]


def _load_tokenizer(path: str) -> Any:
    from tokenizers import Tokenizer

    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    return Tokenizer.from_file(path)


def build_bodies(cfg: LoadConfig, model: str, count: int) -> list[bytes]:
    """``count`` serialised request bodies; prompts are generated unless `cfg.prompts` is set."""
    if cfg.prompts is not None:
        prompts = [cfg.prompts[i % len(cfg.prompts)] for i in range(count)]
    else:
        tok = _load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
        prompts = build_prompts(count, cfg.prompt_tokens, shared_prefix_tokens=cfg.shared_prefix_tokens,
                                seed=cfg.seed, tokenizer=tok)
    base: dict[str, Any] = {"model": model, "max_tokens": cfg.max_tokens, "stream": cfg.stream}
    if cfg.ignore_eos:
        base.update(ignore_eos=True, min_tokens=cfg.max_tokens)
    if cfg.stream:
        base["stream_options"] = {"include_usage": True}
    base.update(cfg.extra_body)
    key = "prompt" if cfg.completions else "messages"
    enc = msgspec.json.Encoder()
    return [
        enc.encode({**base, key: p if cfg.completions else [{"role": "user", "content": p}]})
        for p in prompts
    ]


async def first_model(session: aiohttp.ClientSession, url: str) -> str:
    """The id of the first model the server lists (GET <base>/v1/models); `url` in any form."""
    async with session.get(models_url(url)) as resp:
        resp.raise_for_status()
        data = msgspec.json.decode(await resp.read()).get("data") or []
    if not data:
        raise ValueError(f"{url} lists no models; pass model explicitly")
    return str(data[0]["id"])


FAIL_FAST = 16  # a phase stops when its first this-many finished requests (fewer if n is) all failed


class AllFailed(RuntimeError):
    """The first requests of a phase all failed, so the run stopped early."""


class _Phase:
    """A phase's progress bar and fail-fast check, wrapped around its `send`.

    A wrong URL or model, or a dead server, fails every request: sending all n of them wastes
    minutes and ends in a 0% table. So when the first `k` finished requests all failed, `send`
    raises `AllFailed`, whose TaskGroup cancels the requests still outstanding. The check is a few
    integer operations per request; a phase with a success among its first k runs as before.
    """

    def __init__(self, send: Send, desc: str, n: int, progress: bool) -> None:
        from tqdm import tqdm

        self._send, self.desc, self.k = send, desc, min(FAIL_FAST, n)
        self.finished = self.failed = 0
        self.first_errors: list[str] = []
        self.bar = tqdm(total=n, unit="req", disable=not progress, dynamic_ncols=True, desc=desc)

    async def send(self, body: bytes) -> RequestResult:
        r = await self._send(body)
        self.finished += 1
        self.bar.update(1)
        if not r.ok:
            self.failed += 1
            err = r.error or "unknown error"
            if len(self.first_errors) < 3 and err not in self.first_errors:
                self.first_errors.append(err)
            self.bar.set_postfix(errors=self.failed, refresh=False)
        if self.finished == self.k and self.failed == self.k:
            errors = "".join(f"\n  error: {e}" for e in self.first_errors)
            raise AllFailed(f"stopped early: the first {self.k} {self.desc} requests all failed{errors}")
        return r

    async def run(self, loop: Awaitable[list[RequestResult]]) -> list[RequestResult]:
        """Await the phase's loop; `AllFailed` comes out bare, not in a TaskGroup's ExceptionGroup."""
        try:
            return await loop
        except* AllFailed as eg:
            raise eg.exceptions[0] from None
        finally:
            self.bar.close()


async def run_load(cfg: LoadConfig, results_out: list[RequestResult] | None = None) -> LoadReport:
    """Warm up (unmeasured), then run one measured phase and summarise it; ``results_out``
    receives the measured requests' results (for plots).

    Raises `AllFailed` when either phase's first requests all fail.
    """
    import aiohttp

    cfg.validate()
    targets = parse_pids(cfg.pids) if isinstance(cfg.pids, str) else list(cfg.pids)
    targets.append(Target("loadgen", os.getpid()))  # a saturated client skews every number
    url = cfg.endpoint()
    limit = cfg.concurrency if cfg.concurrency is not None else 0  # 0: no cap in open loop
    connector = aiohttp.TCPConnector(limit=limit, force_close=cfg.fresh_conn)
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        model = cfg.model or await first_model(session, url)
        n_warm = cfg.warmup_count()
        bodies = build_bodies(cfg, model, cfg.num_requests + n_warm)
        measured, warm = bodies[: cfg.num_requests], bodies[cfg.num_requests :]

        async def send(body: bytes) -> RequestResult:
            return await send_request(session, url, body, cfg.stream)

        if warm:
            phase = _Phase(send, "warm-up", n_warm, cfg.progress)
            await phase.run(closed_loop(phase.send, warm, cfg.concurrency or min(n_warm, 8)))
        phase = _Phase(send, "load", cfg.num_requests, cfg.progress)
        meter = CpuMeter(targets)
        meter.start()
        t0 = perf_counter()
        if cfg.rate is not None:
            results = await phase.run(open_loop(phase.send, measured, cfg.rate, cfg.seed))
        else:
            results = await phase.run(closed_loop(phase.send, measured, cfg.concurrency or 1))
        duration = perf_counter() - t0
        cpu = meter.stop()
    if results_out is not None:
        results_out.extend(results)
    return summarize(results, duration, cpu, label=cfg.label, concurrency=cfg.concurrency,
                     rate=cfg.rate, stream=cfg.stream, fresh_conn=cfg.fresh_conn)


# ---- command line ------------------------------------------------------------------------------
def add_loadgen_args(p: argparse.ArgumentParser) -> None:
    """Add the load generator's options to ``p`` (used by `turbine bench` and `-m` alike)."""
    p.add_argument("--url", default="http://127.0.0.1:8000", help="base URL or full endpoint URL")
    p.add_argument("--model", default=None, help="model name (default: first of /v1/models)")
    p.add_argument("-n", "--num-requests", type=int, default=200)
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("-c", "--concurrency", type=_levels(int), default=None, metavar="C[,C...]",
                       help="closed loop (default 16); several levels (1,4,16) run one after another: a sweep")
    shape.add_argument("--rate", type=_levels(float), default=None, metavar="R[,R...]",
                       help="open loop: Poisson arrivals, req/s; several levels: a sweep")
    p.add_argument("--prompt-tokens", type=int, default=500)
    p.add_argument("--shared-prefix-tokens", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=50)
    p.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS")
    p.add_argument("--no-stream", action="store_true")
    p.add_argument("--fresh-conn", action="store_true", help="new TCP connection per request")
    p.add_argument("--completions", action="store_true", help="use /v1/completions")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured requests first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pids", default="", help="CPU accounting: name=pid[,name=pid+] (+: with children)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or dir, for exact prompt length")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, s")
    p.add_argument("--label", default="")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", default=None, metavar="OUT",
                   help="write the report as JSON (a sweep: {\"sweep\": ..., \"runs\": [one report per level]})")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="write PNGs into DIR: TTFT and ITL CDFs, and latency vs load for a sweep (or a --trace "
                   "replay); needs matplotlib")


def _levels(kind: type) -> Any:
    """An argparse type: one value or a comma-separated list of them (a sweep), each positive."""
    def parse(text: str) -> list[Any]:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {kind.__name__} or a comma-separated list of them: {text!r}")
        if not values or any(not v > 0 for v in values):
            raise argparse.ArgumentTypeError(f"levels must be positive, got {text!r}")
        return values

    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse


def configs_from_args(a: argparse.Namespace) -> list[LoadConfig]:
    """One phase per load level (one, unless -c or --rate lists several)."""
    if a.rate is not None:
        return [config_from_args(a, rate=r) for r in a.rate]
    return [config_from_args(a, concurrency=c) for c in (a.concurrency or [16])]


def config_from_args(a: argparse.Namespace, *, concurrency: int | None = None, rate: float | None = None) -> LoadConfig:
    """The phase at one load level (the first listed unless given)."""
    if concurrency is None and rate is None:
        rate = a.rate[0] if a.rate else None
        concurrency = None if rate is not None else (a.concurrency or [16])[0]
    return LoadConfig(
        url=a.url, model=a.model, num_requests=a.num_requests, concurrency=concurrency, rate=rate,
        prompt_tokens=a.prompt_tokens, shared_prefix_tokens=a.shared_prefix_tokens,
        max_tokens=a.max_tokens, ignore_eos=not a.no_ignore_eos, stream=not a.no_stream,
        fresh_conn=a.fresh_conn, completions=a.completions, warmup=a.warmup, seed=a.seed,
        pids=a.pids, timeout_s=a.timeout, tokenizer=a.tokenizer, label=a.label,
        progress=not a.no_progress,
    )


def _run(coro: Awaitable[LoadReport]) -> LoadReport:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)  # type: ignore[arg-type]


def main_from_args(a: argparse.Namespace) -> int:
    """Run one phase per load level from parsed args, print their table (and JSON file, PNGs);
    1 if a level had no success (or stopped early), 2 on bad input, missing matplotlib for
    --plots, or when the model list cannot be fetched."""
    import aiohttp

    from turbine.bench.plots import PlotUnavailable, require_plots

    plots = getattr(a, "plots", None)
    try:
        cfgs = configs_from_args(a)
        for cfg in cfgs:
            cfg.validate()
        if plots:
            require_plots(plots)  # before the run: a missing matplotlib fails now, not after it
    except (ValueError, PlotUnavailable, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    reports: list[LoadReport] = []
    results: list[list[RequestResult]] = []
    try:
        for cfg in cfgs:
            results.append([])
            reports.append(_run(run_load(cfg, results[-1])))
    except AllFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except aiohttp.ClientError as e:  # only GET /v1/models raises: send_request turns these into results
        print(f"error: cannot list models at {models_url(a.url)}: {e}", file=sys.stderr)
        return 2
    print(format_table(reports))
    for report in reports:
        for err in report.first_errors:
            print(f"  error: {err}", file=sys.stderr)
    if a.json:
        doc: Any = reports[0].to_dict() if len(reports) == 1 else {
            "sweep": "rate" if a.rate is not None else "concurrency", "runs": [r.to_dict() for r in reports]}
        with open(a.json, "wb") as f:
            f.write(msgspec.json.format(msgspec.json.encode(doc), indent=2) + b"\n")
    if plots:
        _write_plots(plots, cfgs, reports, results)
    return 0 if all(r.ok for r in reports) else 1


def _write_plots(plots: str, cfgs: list[LoadConfig], reports: list[LoadReport],
                 results: list[list[RequestResult]]) -> None:
    from turbine.bench.plots import sweep_load_point, write_run_plots

    by_rate = cfgs[0].rate is not None
    levels = [c.rate if by_rate else c.concurrency for c in cfgs]
    name = "req/s" if by_rate else "concurrent"
    runs = {f"{lv:g} {name}": res for lv, res in zip(levels, results, strict=True)}
    load = [sweep_load_point(float(lv), res) for lv, res in zip(levels, results, strict=True)]  # type: ignore[arg-type]
    try:
        written = write_run_plots(plots, runs, load=load, title=cfgs[0].label or "turbine bench",
                                  load_label="request rate (req/s)" if by_rate else "concurrency (closed loop)")
    except OSError as e:
        print(f"error: could not write the plots: {e}", file=sys.stderr)
        return
    print(f"plots: {', '.join(str(p) for p in written)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m turbine.bench.loadgen", description=__doc__.split("\n")[0])
    add_loadgen_args(p)
    return main_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
