"""The built-in engine's step logic: the shared scheduler and block manager, a real forward pass.

Synchronous like ``MockerCore`` (no asyncio, no clock), but thread-safe: ``BuiltinEngine`` runs
``step()`` on a dedicated thread while the event loop adds and aborts requests.

Async scheduling (the default) keeps one step in flight: the host plans and launches step k+1
while the device still runs step k, then reads step k's tokens. Host work (scheduling, packing
inputs, stop checks) hides behind device time instead of adding to it, behind decode steps and
prefill steps alike (``overlap_prefill_steps=False``: behind decode-only steps only).

    step():  [lock]  schedule k+1 ─▶ prepare ─▶ advance    (k+1's decodes take k's tokens on the device)
             [free]  launch k+1: forward + sample         (queued; add/abort may run meanwhile)
             [free]  wait for step k's tokens             (the device finishes k; k+1 is queued behind it)
             [lock]  complete k ─▶ take KV events          (fill tokens, stop checks, free finished)

A step with prompt tokens replays the piecewise graphs (piecewise_graphs.py: graphs between the
layers' attentions, attention eager) when it has at most ``piecewise_graph_tokens`` tokens, and
launches ahead like a decode graph. A fully eager step (more tokens, or no graphs) is different:
launching it kernel by kernel costs ~20 ms of host time on an 8B model (bench/eager_step_host.py),
and launched ahead it would hold back the tokens of the step in flight that long. So unless the
step in flight is itself long on the device (``eager_overlap_min_tokens`` prompt tokens or more),
the call prepares the eager step, completes the one in flight and returns its tokens; the next
call launches the eager step first ("staged").

Each call returns the results of the step it completed. A sequence that stops on a sampled stop
token has one more token computed in the step behind it, which is dropped; a sequence that
reaches max_tokens is not scheduled again. With ``async_scheduling=False`` each call schedules,
launches and completes one step. An abort frees a sequence's blocks at once; any step that
reuses them is queued behind the steps that still write them.
"""
from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from turbine.engine.attention_api import CausalLM
from turbine.engine.base import EngineStats
from turbine.engine.block_manager import KVBlockManager
from turbine.engine.model_runner import LaunchedStep, StepBatch
from turbine.engine.runner_setup import (
    build_runner,
    kv_spec,
    local_num_blocks,
    piecewise_tokens,
    rank_device,
    resolve_device,
)
from turbine.engine.sampler import check_sampling_options
from turbine.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from turbine.engine.sequence import Sequence
from turbine.engine.step import StepOutput, StepResult, step_output
from turbine.kvbm.tiered import TieredCache
from turbine.protocols.kv_transfer import KvLayout
from turbine.protocols.generate import GenerateRequest
from turbine.protocols.kv_events import BlockStored

if TYPE_CHECKING:
    from turbine.engine.models import ModelConfig
    from turbine.engine.parallel.executor import TPExecutor

__all__ = ["BuiltinConfig", "BuiltinCore", "StepOutput", "StepResult", "resolve_device"]

from turbine.engine.builtin_config import BuiltinConfig  # noqa: E402  (torch-free: the CLI builds it)


class _InFlight(NamedTuple):
    out: SchedulerOutput
    slots: list[int]  # placeholder index of each scheduled entry (Scheduler.advance)
    launched: LaunchedStep


class _Staged(NamedTuple):
    """A step scheduled, packed and advanced but not launched yet."""

    out: SchedulerOutput
    slots: list[int]
    batch: StepBatch
    prev: LaunchedStep | None  # the step in flight when it was packed (its decodes' input tokens)


class BuiltinCore:
    def __init__(self, model: CausalLM, model_config: ModelConfig, config: BuiltinConfig | None = None, *,
                 executor: TPExecutor | None = None) -> None:
        """``model`` already on its device. Of ``model_config`` the core reads the shapes
        (layers, heads, KV heads, head_dim, vocab), ``max_position_embeddings`` and ``eos_token_ids``.
        ``executor``: tensor parallelism, ``model`` being rank 0's shard (see ``load``)."""
        config = config if config is not None else BuiltinConfig()
        self.config = config
        self.model = model
        self.model_config = model_config
        self.executor = executor
        tp = executor.group if executor is not None else None
        self.device, self.dtype = resolve_device(config.device, config.dtype)
        if tp is not None:
            self.device = tp.device
        mc = model_config
        self.vocab_size = int(mc.vocab_size)
        self.context_length = int(config.context_length or mc.max_position_embeddings)
        self.eos_token_ids: tuple[int, ...] = tuple(mc.eos_token_ids)
        spec = kv_spec(mc, config, self.dtype, tp)
        self.piecewise_tokens = piecewise_tokens(config, self.device)
        num_blocks = local_num_blocks(model, spec, config, self.device, self.vocab_size)
        if executor is not None:  # every rank sized its own cache: all take the smallest
            num_blocks = executor.agree_num_blocks(num_blocks)
        self.runner = build_runner(model, mc, config, device=self.device, spec=spec, num_blocks=num_blocks, tp=tp)
        self.kv_cache = self.runner.kv_cache
        if executor is not None:
            executor.wait_ready(self.runner)
        self.block_manager = KVBlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        host_blocks = int(config.host_kv_gb * 1e9 // spec.bytes_per_block)
        disk_blocks = int(config.disk_kv_gb * 1e9 // spec.bytes_per_block)
        self.tiers = (TieredCache(host_blocks, disk_blocks, config.block_size, self.block_manager.emit)
                      if host_blocks or disk_blocks else None)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                            enable_chunked_prefill=config.enable_chunked_prefill,
                            long_prefill_token_threshold=config.long_prefill_token_threshold,
                            eos_token_ids=self.eos_token_ids, max_model_len=self.context_length),
            self.block_manager,
            tiers=self.tiers,
        )
        self.num_steps = 0
        self._lock = threading.Lock()
        self.tier_store = None
        if self.tiers is not None:
            from turbine.kvbm.store import TierStore

            self.tier_store = TierStore(self.kv_cache.data, self.kv_layout, self.tiers, self._lock, config.disk_kv_dir)
        self._inflight: _InFlight | None = None
        self._staged: _Staged | None = None

    @classmethod
    def load(cls, model_dir: str | os.PathLike[str], config: BuiltinConfig | None = None) -> BuiltinCore:
        """Load an HF-format checkpoint with Turbine's loader onto the configured device; with
        ``tensor_parallel_size`` N > 1, start ranks 1..N-1 (parallel/executor.py), which load
        their shards meanwhile, and load rank 0's shard here."""
        from turbine.engine.loader import load_model

        config = config if config is not None else BuiltinConfig()
        device, dtype = resolve_device(config.device, config.dtype)
        if config.tensor_parallel_size == 1:
            model, model_config = load_model(model_dir, dtype=dtype, device=str(device))
            return cls(model, model_config, config)
        from turbine.engine.models import ModelConfig
        from turbine.engine.models.parallel import TPShape
        from turbine.engine.parallel.executor import TPExecutor

        TPShape.of(ModelConfig.from_dir(model_dir), 0, config.tensor_parallel_size)  # a bad split fails before any spawn
        executor = TPExecutor.start(model_dir, config, rank_device(device, 0, config.tensor_parallel_size))
        try:
            model, model_config = load_model(model_dir, dtype=dtype, device=executor.group.device, tp=executor.group)
            return cls(model, model_config, config, executor=executor)
        except BaseException as e:
            err = executor.explain(e)  # before close: it reads what the other ranks reported
            executor.close()
            if err is e:
                raise
            raise err from e

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do without them); idempotent."""
        if self.executor is not None:
            self.executor.close()

    @property
    def num_kv_blocks(self) -> int:
        return self.block_manager.num_blocks

    # -- requests ---------------------------------------------------------------------------------------
    def add_request(self, request: GenerateRequest, arrival_time: float | None = None) -> None:
        """Queue a request; ValueError if it is malformed or can never fit this engine."""
        tokens = request.token_ids
        if tokens and (min(tokens) < 0 or max(tokens) >= self.vocab_size):
            raise ValueError(f"request {request.request_id!r}: token ids must lie in [0, {self.vocab_size})")
        try:
            check_sampling_options(request.sampling)
        except ValueError as e:
            raise ValueError(f"request {request.request_id!r}: {e}") from None
        seq = Sequence.from_request(request, arrival_time)
        if seq.kv_source is not None:
            layout = seq.kv_source.agent.layout
            why = "it has none (a mock worker)" if layout is None else self.kv_layout.mismatch(layout)
            if why:
                raise ValueError(f"request {request.request_id!r}: cannot take the peer's KV blocks: "
                                 f"layouts differ ({why})")
        with self._lock:
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Drop a request in any state; its blocks are free when this returns."""
        with self._lock:
            return self.scheduler.abort(request_id)

    # -- disaggregation ---------------------------------------------------------------------------------
    @property
    def kv_layout(self) -> KvLayout:
        spec = self.kv_cache.spec
        dtype = str(spec.dtype).removeprefix("torch.")
        return KvLayout(num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                        block_size=spec.block_size, dtype=dtype)

    def finish_pull(self, request_id: str, ok: bool) -> bool:
        with self._lock:
            return self.scheduler.finish_pull(request_id, ok)

    def release(self, request_id: str) -> bool:
        with self._lock:
            return self.scheduler.release(request_id)

    def held_blocks(self, request_id: str) -> list[int] | None:
        with self._lock:
            return self.scheduler.held_blocks(request_id)

    def expire_held(self) -> None:
        with self._lock:
            self.scheduler.expire_held()

    def next_hold_deadline(self) -> float | None:
        with self._lock:
            return self.scheduler.next_hold_deadline()

    def has_work(self) -> bool:
        return self.in_flight or self.scheduler.has_work()

    @property
    def pipelined(self) -> bool:
        """Each ``step()`` launches the next step before completing one (async scheduling)."""
        return self.config.async_scheduling

    @property
    def in_flight(self) -> bool:
        """A launched (or staged) step awaits completion: the next ``step()`` makes progress."""
        return self._inflight is not None or self._staged is not None

    def get(self, request_id: str) -> Sequence | None:
        return self.scheduler.get(request_id)

    # -- one step -------------------------------------------------------------------------------------
    def step(self) -> StepResult:
        """Launch the next step (and, with async scheduling, the one after it) and complete one."""
        t0 = time.perf_counter()
        if self.scheduler.held:
            self.expire_held()
        if self._staged is not None:
            self._inflight, self._staged = self._launch(self._staged), None
        if self._inflight is None:
            staged = self._prepare_next(None)
            if staged is None:
                with self._lock:
                    events = self.block_manager.take_events()
                    pulls = self.scheduler.take_pulls()
                return StepResult(0.0, [], events, 0, 0, 0, pulls, host_s=time.perf_counter() - t0)
            self._inflight = self._launch(staged)
        done, self._inflight = self._inflight, None
        cfg = self.config
        if cfg.async_scheduling and (cfg.overlap_prefill_steps or not done.out.num_prefill_tokens):
            nxt = self._prepare_next(done)
            if nxt is not None:
                if (nxt.batch.graph_batch or nxt.batch.piecewise
                        or done.out.num_prefill_tokens >= cfg.eager_overlap_min_tokens):
                    self._inflight = self._launch(nxt)
                else:
                    self._staged = nxt
        return self._complete(done, t0)

    def finish_inflight(self) -> StepResult | None:
        """Complete the step in flight without launching another (None: nothing in flight)."""
        t0 = time.perf_counter()
        if self._staged is not None:
            self._inflight, self._staged = self._launch(self._staged), None
        done, self._inflight = self._inflight, None
        return self._complete(done, t0) if done is not None else None

    def _prepare_next(self, prev: _InFlight | None) -> _Staged | None:
        """Schedule, pack and advance the next step (``prev``: the step in flight)."""
        before = prev.launched if prev is not None else None
        with self._lock:
            out = self.scheduler.schedule()
            if self.tier_store is not None:  # before anything reuses the blocks those copies read
                self.tier_store.run_copies(self.tiers.take_copies())
            if not out.scheduled:
                return None
            batch = self.runner.prepare(out, before)
            slots = self.scheduler.advance(out)
        return _Staged(out, slots, batch, before)

    def _launch(self, staged: _Staged) -> _InFlight:
        return _InFlight(staged.out, staged.slots, self.runner.launch(staged.batch, staged.prev))

    def _complete(self, done: _InFlight, t0: float) -> StepResult:
        tw = time.perf_counter()
        sampled = done.launched.wait()
        wait_s = time.perf_counter() - tw
        with self._lock:
            sched = self.scheduler
            results = sched.complete(done.out, done.slots, sampled)
            outputs = [step_output(sched, seq, token, reason, n_out) for seq, token, reason, n_out in results]
            events = self.block_manager.take_events()
            pulls = sched.take_pulls()
        self.num_steps += 1
        out = done.out
        duration = time.perf_counter() - t0
        device_ms = done.launched.device_ms()
        return StepResult(duration, outputs, events, out.num_prefill_tokens, out.num_decode_seqs,
                          len(out.preempted), pulls, host_s=duration - wait_s,
                          device_s=None if device_ms is None else device_ms / 1e3)

    @property
    def padding(self) -> dict[str, list[int]]:
        """The sizes steps run padded to (the profile's meta.padding, which the mocker models):
        decode-only batches to "decode_batch" (decode graphs), steps with prompt tokens to
        "tokens" (piecewise graphs); absent: that kind runs at its own size."""
        out = {}
        if self.runner.graphs is not None:
            out["decode_batch"] = list(self.runner.graphs.buckets)
        if self.runner.piecewise is not None:
            out["tokens"] = list(self.runner.piecewise.buckets)
        return out

    def enable_device_timing(self, on: bool = True) -> None:
        """Time each step's device work with CUDA events (``StepResult.device_s``): with async
        scheduling the call's wall time is not the step's (it overlaps the neighbours')."""
        self.runner.time_device = on

    def stats(self) -> EngineStats:
        with self._lock:
            tiers = self.tiers.loads(self.kv_cache.spec.bytes_per_block) if self.tiers is not None else ()
            return EngineStats(kv_active_blocks=self.block_manager.num_active_blocks, tiers=tiers,
                               kv_total_blocks=self.block_manager.num_blocks,
                               num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
                               prefill_tokens=self.scheduler.num_prefill_tokens())

    def kv_snapshot(self) -> list[BlockStored]:
        """BlockStored events rebuilding the current prefix cache and its tiers (a router's resync)."""
        with self._lock:
            tiers = self.tiers.snapshot() if self.tiers is not None else []
            return self.block_manager.stored_blocks_snapshot() + tiers

    def onboard(self, source: Any, local_blocks: list[int]) -> None:
        """Copy blocks up from the host/disk tiers (a worker thread; see kvbm/store.py)."""
        assert self.tier_store is not None
        t0 = time.perf_counter()
        self.tier_store.onboard(source, local_blocks)
        with self._lock:
            self.tiers.onboard_took(source, time.perf_counter() - t0)  # type: ignore[union-attr]

    def drop_tier_entry(self, tier: str, h: int) -> None:
        with self._lock:
            self.tiers.drop(tier, h)  # type: ignore[union-attr]
