"""`VllmEngine`: a stock vLLM ``AsyncLLM`` behind Turbine's ``Engine`` interface (imports vLLM).

    Worker ──generate(GenerateRequest)──▶ AsyncLLM.generate(TokensPrompt, SamplingParams(DELTA))
           ◀── GenerateDelta stream ───── RequestOutput deltas (token ids; vLLM never detokenizes)
    aclose()/cancel ───────────────────▶ AsyncLLM.abort(request_id)
    kv sink ◀── BlockMirror ◀── KvEventRelay ◀──ipc── vLLM's ZMQ KV event publisher (engine core)
    stats()  ◀── vLLM's scheduler stats (a stat logger: running, waiting, KV usage)
    /metrics, /health ◀── MetricsServer (optional port): vLLM's Prometheus registry, unchanged

The model card comes from the running engine's config (block size, KV blocks, max sequences,
max model length), so whatever vLLM decided (e.g. KV blocks sized from memory) is what the
router and frontend see. Tokenizing and detokenizing stay in Turbine's frontend: the prompt goes
in as token ids and tokens come back as ids.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from vllm import SamplingParams
from vllm.config import KVEventsConfig
from vllm.exceptions import VLLMClientError
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.metrics.loggers import StatLoggerBase
from vllm.v1.metrics.prometheus import get_prometheus_registry

from turbine.adapters.vllm_args import apply_env_defaults, parse_engine_args
from turbine.adapters.vllm_http import MetricsServer
from turbine.adapters.vllm_kv import BlockMirror, KvEventRelay
from turbine.adapters.vllm_plugin import ENV_WORKER_PID
from turbine.engine.base import EngineStats, KVEventSink
from turbine.protocols.generate import FinishReason, GenerateDelta, GenerateRequest
from turbine.protocols.kv_events import BlockStored, KVEvent
from turbine.protocols.model_card import ModelCard

__all__ = ["VllmEngine"]

log = logging.getLogger("turbine.adapters.vllm")

KV_TOPIC = "kv"
WATCH_INTERVAL_S = 0.5
_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort", "error": "error",
                                    "repetition": "stop"}


class _SchedulerView:
    """The latest scheduler stats vLLM reported (filled by ``_StatsLogger`` on the event loop)."""

    def __init__(self) -> None:
        self.num_running = 0
        self.num_waiting = 0
        self.kv_usage = 0.0


class _StatsLogger(StatLoggerBase):
    def __init__(self, vllm_config: Any, engine_index: int = 0, *, view: _SchedulerView) -> None:
        self.view = view

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        if scheduler_stats is not None:  # not a stable vLLM interface: read defensively
            v, s = self.view, scheduler_stats
            v.num_running = getattr(s, "num_running_reqs", 0)
            v.num_waiting = getattr(s, "num_waiting_reqs", 0) + getattr(s, "num_skipped_waiting_reqs", 0)
            v.kv_usage = getattr(s, "kv_cache_usage", 0.0)

    def log_engine_initialized(self) -> None:
        pass


class VllmEngine:
    def __init__(self, llm: AsyncLLM, *, view: _SchedulerView, ipc_dir: str | None = None,
                 metrics_port: int | None = None, metrics_host: str = "127.0.0.1",
                 on_fatal: Callable[[BaseException], None] | None = None) -> None:
        """Wrap an AsyncLLM built with a ZMQ KV event publisher (use ``create``)."""
        self.llm = llm
        cfg = llm.vllm_config
        self.block_size = int(cfg.cache_config.block_size)
        self.num_kv_blocks = int(cfg.cache_config.num_gpu_blocks or 0)
        self.max_num_seqs = int(cfg.scheduler_config.max_num_seqs)
        self.context_length = int(cfg.model_config.max_model_len)
        self.model_path = str(cfg.model_config.model)
        sources = llm.get_kv_event_sources()
        if not sources:
            raise ValueError("this AsyncLLM publishes no KV events: build it with VllmEngine.create")
        ev = sources[min(sources)]
        self.kv_endpoint: str = ev.endpoint
        self.kv_replay_endpoint: str | None = ev.replay_endpoint
        self.mirror = BlockMirror()
        self.relay = KvEventRelay(self.kv_endpoint, self._on_kv_events, replay_endpoint=self.kv_replay_endpoint,
                                  topic=ev.topic)
        self.metrics: MetricsServer | None = None
        self.metrics_url: str | None = None
        self._metrics_port = metrics_port
        self._metrics_host = metrics_host
        self._view = view
        self._ipc_dir = ipc_dir
        self._on_fatal = on_fatal
        self._sink: KVEventSink | None = None
        self._open: set[str] = set()
        self._running = False
        self._watch: asyncio.Task[None] | None = None

    @classmethod
    def create(cls, model_dir: str | os.PathLike[str], engine_args: Sequence[str] = (), *, host: str = "127.0.0.1",
               metrics_port: int | None = None, on_fatal: Callable[[BaseException], None] | None = None) -> VllmEngine:
        """Start vLLM on ``model_dir`` with its own CLI arguments (blocking: seconds to minutes).

        The KV event publisher is Turbine's: ZMQ over ``ipc://`` in a private temp directory,
        with a replay socket beside it. Raises ValueError for arguments vLLM rejects.
        """
        apply_env_defaults(host)
        os.environ[ENV_WORKER_PID] = str(os.getpid())  # the engine core exits with this process (vllm_plugin)
        args = parse_engine_args(Path(model_dir), engine_args)
        ipc_dir = tempfile.mkdtemp(prefix="turbine-vllm-")
        try:
            args.kv_events_config = KVEventsConfig(
                enable_kv_cache_events=True, publisher="zmq", endpoint=f"ipc://{ipc_dir}/kv",
                replay_endpoint=f"ipc://{ipc_dir}/kv-replay", topic=KV_TOPIC)
            if args.enable_prefix_caching is False:
                log.warning("vLLM prefix caching is off: it publishes no blocks, so kv routing sees no hits here")
            view = _SchedulerView()

            def stats_logger(vllm_config: Any, engine_index: int = 0) -> _StatsLogger:
                return _StatsLogger(vllm_config, engine_index, view=view)

            llm = AsyncLLM.from_engine_args(args, stat_loggers=[stats_logger])
        except BaseException:
            shutil.rmtree(ipc_dir, ignore_errors=True)
            raise
        return cls(llm, view=view, ipc_dir=ipc_dir, metrics_port=metrics_port, metrics_host=host, on_fatal=on_fatal)

    def model_card(self, model_name: str, tokenizer_source: str | os.PathLike[str] | None = None) -> ModelCard:
        return ModelCard(model_name=model_name, tokenizer_source=str(tokenizer_source or self.model_path),
                         block_size=self.block_size, total_kv_blocks=self.num_kv_blocks,
                         max_num_seqs=self.max_num_seqs, context_length=self.context_length, engine="vllm")

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._running:
            return
        await self.relay.start()
        if self._metrics_port is not None and self.metrics is None:
            self.metrics = MetricsServer(get_prometheus_registry(), self.llm.check_health,
                                         host=self._metrics_host, port=self._metrics_port)
            self.metrics_url = await self.metrics.start()
            log.info("vLLM metrics and health at %s/metrics, /health", self.metrics_url)
        self._running = True
        self._watch = asyncio.get_running_loop().create_task(self._watch_engine(), name="vllm-engine-watch")

    async def stop(self) -> None:
        """Abort what runs (streams end with "abort"), shut vLLM down, close the relay."""
        if not self._running and self._watch is None:
            return
        self._running = False
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(BaseException):
                await self._watch
            self._watch = None
        if self._open:
            with contextlib.suppress(Exception):
                await self.llm.abort(list(self._open))
        await asyncio.sleep(0)  # let aborted streams see their final outputs
        if self.metrics is not None:
            await self.metrics.stop()
            self.metrics = None
        handler = getattr(self.llm, "output_handler", None)
        if handler is not None:  # vLLM cancels it only after the core is gone: it would log the core's exit
            handler.cancel()
        await asyncio.to_thread(self.llm.shutdown)
        await self.relay.close()
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
            self._ipc_dir = None

    def set_kv_event_sink(self, sink: KVEventSink | None) -> None:
        self._sink = sink

    def stats(self) -> EngineStats:
        if not self._open:  # vLLM reports stats with outputs only: idle means idle
            return EngineStats(0, self.num_kv_blocks, 0, 0)
        v = self._view
        return EngineStats(round(v.kv_usage * self.num_kv_blocks), self.num_kv_blocks, v.num_running, v.num_waiting)

    def kv_snapshot(self) -> list[BlockStored]:
        """vLLM's prefix cache as the relay has seen it (exact unless events were lost: see vllm_kv)."""
        return self.mirror.snapshot()

    # -- requests ---------------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateDelta]:
        """Token deltas from vLLM; the first carries prompt and cached token counts, the last usage.

        Raises ValueError for a request vLLM rejects, RuntimeError if stopped. Closing or
        cancelling the stream aborts the vLLM request (its blocks are freed).
        """
        if not self._running:
            raise RuntimeError("VllmEngine is not running: await start() first")
        rid = request.request_id
        if rid in self._open:
            raise ValueError(f"request id {rid!r} is already streaming")
        if request.lora_name is not None:
            raise ValueError("LoRA adapters are not supported by Turbine's vLLM worker yet")
        params = self._sampling_params(request)
        prompt_len = len(request.token_ids)
        stream = self.llm.generate(TokensPrompt(prompt_token_ids=list(request.token_ids)), params, rid)
        self._open.add(rid)
        finished = False
        produced = 0
        cached: int | None = None
        try:
            try:
                async for out in stream:
                    comp = out.outputs[0] if out.outputs else None
                    tokens = list(comp.token_ids) if comp is not None else []
                    produced += len(tokens)
                    reason = comp.finish_reason if comp is not None else None
                    if out.finished and reason is None:
                        reason = "abort"
                    if reason is not None:
                        finished = True
                        yield GenerateDelta(token_ids=tokens, finish_reason=_FINISH.get(str(reason), "stop"),
                                            prompt_tokens=prompt_len, cached_tokens=out.num_cached_tokens or 0,
                                            completion_tokens=produced)
                        return
                    if not tokens:
                        continue
                    if cached is None:  # the first token tells the frontend the prefix hit
                        cached = out.num_cached_tokens or 0
                        yield GenerateDelta(token_ids=tokens, prompt_tokens=prompt_len, cached_tokens=cached)
                    else:
                        yield GenerateDelta(token_ids=tokens)
                finished = True  # vLLM ended the stream without a finish reason: aborted elsewhere
                yield GenerateDelta(finish_reason="abort", prompt_tokens=prompt_len, completion_tokens=produced)
            except VLLMClientError as e:
                if produced:
                    raise
                raise ValueError(str(e)) from None
            except EngineDeadError:
                finished = True  # nothing to abort; "abort" lets the frontend retry elsewhere
                yield GenerateDelta(finish_reason="abort", prompt_tokens=prompt_len, completion_tokens=produced)
            except Exception as e:
                finished = True
                log.exception("vLLM failed request %s", rid)
                yield GenerateDelta(finish_reason="error", error=f"vLLM: {e!r}", prompt_tokens=prompt_len,
                                    completion_tokens=produced)
        finally:
            self._open.discard(rid)
            if not finished:
                await stream.aclose()  # vLLM aborts the request on GeneratorExit
                with contextlib.suppress(Exception):
                    await self.llm.abort(rid)

    def _sampling_params(self, request: GenerateRequest) -> SamplingParams:
        s, stop = request.sampling, request.stop
        try:
            return SamplingParams(
                temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed,
                max_tokens=stop.max_tokens, min_tokens=stop.min_tokens, ignore_eos=stop.ignore_eos,
                stop_token_ids=list(stop.stop_token_ids) or None,
                output_kind=RequestOutputKind.DELTA, detokenize=False)
        except (ValueError, TypeError) as e:
            raise ValueError(f"vLLM rejects the sampling parameters: {e}") from None

    # -- events and health --------------------------------------------------------------------------
    def _on_kv_events(self, events: list[KVEvent]) -> None:
        forward = self.mirror.apply(events)
        if forward and self._sink is not None:
            try:
                self._sink(forward)
            except Exception:
                log.exception("KV event sink failed; events of this batch are lost")

    async def _watch_engine(self) -> None:
        """A dead engine core fails every request: say so once and hand over to ``on_fatal``."""
        while not self.llm.errored:
            await asyncio.sleep(WATCH_INTERVAL_S)
        err = self.llm.dead_error
        log.error("the vLLM engine died: %r", err)
        if self._on_fatal is not None:
            self._on_fatal(err)
