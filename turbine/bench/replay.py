"""Live trace replay: send a Mooncake trace to any OpenAI endpoint at its recorded times.

Each request goes to ``/v1/completions`` as a token-id prompt (`trace.TokenSynth`: shared hash
ids give shared prefixes, no tokenizer in the loop) asking for exactly ``output_length`` tokens
(``ignore_eos``, ``min_tokens``), streamed with usage so ``cached_tokens`` gives the prefix hit.
Request sending and SSE timing are the load generator's (`loadgen.send_request`); the summary is
`report.summarize_trace`, the same the fleet simulator produces.

    turbine bench --url http://127.0.0.1:8000 --trace trace.jsonl --speed 2 --json out.json
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import msgspec

from turbine.bench.loadgen import endpoint_url, first_model, send_request
from turbine.bench.report import (
    DEFAULT_SLO_ITL_MS,
    DEFAULT_SLO_TTFT_MS,
    PlotUnavailable,
    TraceReport,
    format_trace_table,
    plot_ttft_over_time,
    summarize_trace,
    try_plot,
)
from turbine.bench.stats import RequestResult
from turbine.bench.trace import (
    DEFAULT_VOCAB_SIZE,
    TokenSynth,
    TraceRequest,
    arrival_offsets_s,
    ideal_hit_rate,
    load_trace,
)


@dataclass
class ReplayConfig:
    url: str = "http://127.0.0.1:8000"  # http://h:p, http://h:p/v1 or the full .../v1/completions URL
    extra_urls: tuple[str, ...] = ()  # more frontends of the same fleet: request i goes to URL i % count
    speed: float = 1.0  # recorded arrival times are divided by this
    model: str | None = None  # None: the first model the server lists
    vocab_size: int = DEFAULT_VOCAB_SIZE
    seed: int = 0  # token synthesis seed (the simulator's default is 0 too)
    slo_ttft_ms: float = DEFAULT_SLO_TTFT_MS
    slo_itl_ms: float = DEFAULT_SLO_ITL_MS
    timeout_s: float = 600.0  # per request
    progress: bool = True
    meta: dict[str, Any] = field(default_factory=dict)  # copied into the JSON summary

    def validate(self) -> None:
        if not self.speed > 0:
            raise ValueError(f"speed must be positive, got {self.speed}")
        self.endpoint()  # raises on a URL we cannot place
        if not self.timeout_s > 0:
            raise ValueError(f"timeout must be positive, got {self.timeout_s}")

    def endpoint(self) -> str:
        return endpoint_url(self.url, completions=True)

    def endpoints(self) -> list[str]:
        return [self.endpoint(), *(endpoint_url(u, completions=True) for u in self.extra_urls)]


@dataclass
class ReplayResult:
    report: TraceReport
    results: list[RequestResult]  # trace order
    sent_at_s: list[float]  # when each request was sent, from the first send


def request_body(model: str, prompt: list[int], output_length: int) -> bytes:
    """One streaming completions request for exactly ``output_length`` tokens."""
    return msgspec.json.encode({
        "model": model, "prompt": prompt, "max_tokens": output_length, "min_tokens": output_length,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    })


async def replay(requests: Sequence[TraceRequest], cfg: ReplayConfig) -> ReplayResult:
    """Send every request at its (sped-up) arrival time without waiting for earlier ones."""
    cfg.validate()
    if not requests:
        raise ValueError("no requests to replay")
    from tqdm import tqdm

    url = cfg.endpoint()
    urls = cfg.endpoints()
    synth = TokenSynth(cfg.vocab_size, seed=cfg.seed)
    offsets = arrival_offsets_s(requests, cfg.speed)
    n = len(requests)
    results: list[RequestResult | None] = [None] * n
    sent = [0.0] * n
    ends = [0.0] * n
    import aiohttp  # here, not at the top: it takes ~0.25 s to import, and only a live run needs it

    connector = aiohttp.TCPConnector(limit=0)  # open loop: never queue behind a connection cap
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        model = cfg.model or await first_model(session, url)
        bar = tqdm(total=n, unit="req", disable=not cfg.progress, dynamic_ncols=True, desc="replay")
        errors = 0

        async def one(i: int, body: bytes, t0: float) -> None:
            nonlocal errors
            sent[i] = perf_counter() - t0
            r = await send_request(session, urls[i % len(urls)], body, True)
            ends[i] = perf_counter() - t0
            results[i] = r
            errors += not r.ok
            bar.update(1)
            if errors:
                bar.set_postfix(errors=errors, refresh=False)

        loop = asyncio.get_running_loop()
        start = loop.time()
        t0 = perf_counter()
        try:
            async with asyncio.TaskGroup() as tg:
                for i, (req, at) in enumerate(zip(requests, offsets)):
                    body = request_body(model, synth.prompt(req), req.output_length)  # before waiting
                    delay = start + at - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tg.create_task(one(i, body, t0))
        finally:
            bar.close()
    done = [r if r is not None else RequestResult(ok=False, error="not sent") for r in results]
    lag = max(s - at for s, at in zip(sent, offsets))
    meta = {"mode": "live", "url": url if len(urls) == 1 else urls, "model": model, "speed": cfg.speed, "max_send_lag_s": round(lag, 4),
            **cfg.meta}
    report = summarize_trace(done, max(max(ends), 1e-9), slo_ttft_ms=cfg.slo_ttft_ms, slo_itl_ms=cfg.slo_itl_ms,
                             ideal_hit_rate=ideal_hit_rate(requests), meta=meta)
    return ReplayResult(report, done, sent)


# ---- command line (`turbine bench --trace`) -----------------------------------------------------
def add_trace_args(p: argparse.ArgumentParser | argparse._ArgumentGroup, *, trace_required: bool = False) -> None:
    """Trace-replay options shared by `turbine bench --trace` and `turbine simulate`
    (--json and --seed come from the load generator's options or the caller)."""
    p.add_argument("--trace", default=None, required=trace_required, metavar="FILE",
                   help="Mooncake-format JSONL trace to replay")
    p.add_argument("--speed", type=float, default=1.0, help="divide the trace's arrival times by this")
    p.add_argument("--max-requests", type=int, default=None, metavar="N", help="replay only the first N requests")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a plot of TTFT over time")
    p.add_argument("--slo-ttft", type=float, default=DEFAULT_SLO_TTFT_MS, metavar="MS",
                   help=f"goodput SLO on time to first token (default {DEFAULT_SLO_TTFT_MS:g} ms)")
    p.add_argument("--slo-itl", type=float, default=DEFAULT_SLO_ITL_MS, metavar="MS",
                   help=f"goodput SLO on a request's mean inter-token latency (default {DEFAULT_SLO_ITL_MS:g} ms)")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                   help="the served model's vocabulary size: prompts use ids clear of its special tokens "
                   f"(default {DEFAULT_VOCAB_SIZE}, Turbine's tiny model)")


def write_outputs(report: TraceReport, label: str, json_path: str | None, plot_path: str | None,
                  results: Sequence[RequestResult], sent_at_s: Sequence[float], plots_dir: str | None = None) -> None:
    """Print the table, write the JSON summary, the TTFT plot (a plot failure only warns) and the
    PNGs of ``plots_dir`` (CDFs, latency vs load over the run's windows, TTFT over time)."""
    print(format_trace_table([(label, report)]))
    for err in report.first_errors:
        print(f"  error: {err}", file=sys.stderr)
    if json_path:
        with open(json_path, "wb") as f:
            f.write(msgspec.json.format(msgspec.json.encode(report.to_dict()), indent=2) + b"\n")
    if plot_path:
        problem = try_plot(plot_ttft_over_time, results, sent_at_s, plot_path, title=f"TTFT over time: {label}")
        if problem:
            print(f"warning: no plot: {problem}", file=sys.stderr)
    if plots_dir:
        from turbine.bench.plots import trace_load_points, write_run_plots

        try:
            written = write_run_plots(plots_dir, {label: results}, load=trace_load_points(results, sent_at_s),
                                      load_label="arrival rate in the window (req/s)", connect=False,
                                      trace=(results, sent_at_s), title=label)
        except (OSError, ValueError) as e:
            print(f"error: could not write the plots: {e}", file=sys.stderr)
        else:
            print(f"plots: {', '.join(str(p) for p in written)}", file=sys.stderr)


def check_plots(plots_dir: str | None) -> None:
    """Before a run: PlotUnavailable without matplotlib, OSError when the directory cannot be made."""
    if plots_dir:
        from turbine.bench.plots import require_plots

        require_plots(plots_dir)


def main_from_args(a: argparse.Namespace) -> int:
    """`turbine bench --trace`: 0 if every request succeeded, 1 if any failed, 2 on bad input."""
    import aiohttp

    try:
        requests = load_trace(a.trace, a.max_requests)
        cfg = ReplayConfig(url=a.url, speed=a.speed, model=a.model, vocab_size=a.vocab_size, seed=a.seed,
                           slo_ttft_ms=a.slo_ttft, slo_itl_ms=a.slo_itl, timeout_s=a.timeout,
                           progress=not a.no_progress, meta={"trace": str(a.trace)})
        cfg.validate()
        TokenSynth(cfg.vocab_size)  # checks the vocabulary size before any request is sent
        check_plots(getattr(a, "plots", None))
        out = asyncio.run(replay(requests, cfg))
    except (ValueError, OSError, PlotUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except aiohttp.ClientError as e:
        print(f"error: cannot reach {a.url}: {e}", file=sys.stderr)
        return 2
    write_outputs(out.report, a.label or "live", a.json, a.plot, out.results, out.sent_at_s, getattr(a, "plots", None))
    return 0 if out.report.errors == 0 else 1


__all__ = ["ReplayConfig", "ReplayResult", "add_trace_args", "check_plots", "main_from_args", "replay",
           "request_body", "write_outputs"]
