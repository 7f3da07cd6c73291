"""The mocker's step logic: the real scheduler and block manager, a timing model instead of a
forward pass, and synthetic tokens. Synchronous, no clock, no asyncio: ``MockEngine`` drives it
in real time, a discrete-event fleet simulator can drive it on a virtual clock.

    t ──step()──▶ StepResult(duration_s, outputs, kv_events)
                  the outputs and events become visible at t + duration_s;
                  requests added meanwhile join the next step

With ``async_scheduling`` the core mirrors an engine that schedules one step ahead (the built-in
engine's default, vLLM's ``--async-scheduling``): the call at ``t`` completes the step that runs
over [t, t + duration_s] and already schedules the step after it, so a request added during
that step waits one more step before it is scheduled, exactly as on the GPU.
"""
from __future__ import annotations

import random
import struct
import time
from array import array
from collections.abc import Callable
from bisect import bisect_right
from itertools import repeat, starmap
from typing import NamedTuple

import msgspec
import xxhash

from turbine.engine.base import EngineStats
from turbine.engine.block_manager import KVBlockManager
from turbine.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from turbine.engine.sequence import Sequence
from turbine.engine.step import StepOutput, StepResult, step_output
from turbine.kvbm.tiered import DISK, HOST, TieredCache, TierSource
from turbine.mocker.timing import PolynomialTiming, ProfileTiming, TimingModel
from turbine.protocols.generate import GenerateRequest
from turbine.protocols.kv_events import BlockStored, KVEvent

_U64 = (1 << 64) - 1
_GREEDY_SEED = 0x9E3779B97F4A7C15  # greedy tokens depend on the prompt only, never on a seed
_PACK2 = struct.Struct("<QQ").pack


# ``--mock-async-scheduling`` values as ``MockerConfig.async_scheduling``
ASYNC_SCHEDULING_FLAGS: dict[str, bool | None] = {"auto": None, "on": True, "off": False}


class MockerConfig(msgspec.Struct, frozen=True, kw_only=True):
    block_size: int = 64
    num_gpu_blocks: int = 16384
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    speedup_ratio: float = 1.0  # divides every step time: 10 = ten times faster than modeled
    context_length: int = 8192
    profile: str | None = None  # measured timing profile (JSON); None = Dynamo's polynomial
    # Schedule one step ahead like an async-scheduling engine; None = as the profile's engine ran
    # (its meta.async_scheduling), off without a profile (Dynamo's mocker schedules step by step).
    async_scheduling: bool | None = None
    # Disaggregation: the KV a token costs (all layers, K and V; default: Llama-3.1-8B in bf16) and
    # the link a pull crosses. A pull of n blocks takes latency + n*block_size*bytes/bandwidth.
    kv_bytes_per_token: int = 131072
    transfer_bandwidth_gbps: float = 25.0  # GB/s
    transfer_latency_s: float = 0.0005
    # KV tiers below the GPU cache (turbine/kvbm): sizes, and what onboarding a block costs.
    host_kv_gb: float = 0.0
    disk_kv_gb: float = 0.0
    host_kv_bandwidth_gbps: float = 8.5  # onboarding as the built-in engine achieved it on an H200 (bench/RESULTS.md)
    host_kv_latency_s: float = 0.0001
    disk_kv_bandwidth_gbps: float = 2.0  # NVMe read (assumed: not measured yet)
    disk_kv_latency_s: float = 0.0005

    def __post_init__(self) -> None:
        for name in ("block_size", "num_gpu_blocks", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.speedup_ratio > 0:
            raise ValueError(f"speedup_ratio must be positive, got {self.speedup_ratio}")
        if self.context_length <= 1:
            raise ValueError(f"context_length must be at least 2, got {self.context_length}")
        if self.kv_bytes_per_token <= 0 or not self.transfer_bandwidth_gbps > 0 or self.transfer_latency_s < 0:
            raise ValueError("kv_bytes_per_token and transfer_bandwidth_gbps must be positive, "
                             "transfer_latency_s >= 0")
        if self.host_kv_gb < 0 or self.disk_kv_gb < 0 or not self.host_kv_bandwidth_gbps > 0 \
                or not self.disk_kv_bandwidth_gbps > 0 or self.host_kv_latency_s < 0 or self.disk_kv_latency_s < 0:
            raise ValueError("KV tier sizes and latencies must be >= 0, their bandwidths positive")

    def tier_blocks(self) -> tuple[int, int]:
        """Blocks the host and disk tiers hold."""
        block = self.block_size * self.kv_bytes_per_token
        return int(self.host_kv_gb * 1e9 // block), int(self.disk_kv_gb * 1e9 // block)

    def make_timing(self) -> TimingModel:
        if self.profile:
            return ProfileTiming.from_file(self.profile, self.speedup_ratio)
        return PolynomialTiming(self.speedup_ratio)


def _ids_below(packed: array, limit: int) -> bool:
    """Whether every id of ``packed`` (u32) is below ``limit``, without a Python-level max over a
    long prompt: the ids become 32-bit lanes of one big int and, with ``k`` bits for ``limit - 1``,

        every lane < 2**k               lanes & HIGH == 0          (HIGH: bits k..31 of each lane)
        every lane < limit              (lanes + C) & HIGH == 0    (C: 2**k - limit in each lane)

    (a lane below 2**k plus C stays below 2**(k+1) <= 2**32: no carry into the next lane)."""
    k = (limit - 1).bit_length()
    if k >= 32:
        return True
    n = len(packed)
    lanes = int.from_bytes(packed, "little")
    high = int.from_bytes(struct.pack("<I", (1 << 32) - (1 << k)) * n, "little")
    if lanes & high:
        return False
    c = (1 << k) - limit
    return not c or not (lanes + int.from_bytes(struct.pack("<I", c) * n, "little")) & high


class _Launched(NamedTuple):
    out: SchedulerOutput
    slots: list[int]
    sampled: dict[str, int]
    duration_s: float


class DecodeRun(NamedTuple):
    """Decode steps run at once (``MockerCore.run_plain_decodes``): ``ends[k]`` is when step k
    ended; every sequence of ``request_ids`` got one token a step (``tokens[i]``, in order);
    ``events`` holds ``(k, the KV events of step k)`` for the steps that stored or evicted blocks,
    in order: the caller delivers each at ``ends[k]`` (and may drop them from the list as it does)."""

    ends: list[float]
    request_ids: list[str]
    tokens: list[list[int]]
    events: list[tuple[int, list[KVEvent]]]


class MockerCore:
    def __init__(
        self,
        config: MockerConfig,
        *,
        vocab_size: int,
        special_token_ids: tuple[int, ...] | list[int] = (),
        eos_token_ids: tuple[int, ...] | list[int] = (),
        timing: TimingModel | None = None,
        rng_seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.config = config
        self.vocab_size = vocab_size
        self.block_manager = KVBlockManager(
            config.num_gpu_blocks, config.block_size, config.enable_prefix_caching
        )
        host_blocks, disk_blocks = config.tier_blocks()
        self.tiers = (TieredCache(host_blocks, disk_blocks, config.block_size, self.block_manager.emit)
                      if host_blocks or disk_blocks else None)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                enable_chunked_prefill=config.enable_chunked_prefill,
                eos_token_ids=tuple(eos_token_ids),
                max_model_len=config.context_length,
            ),
            self.block_manager,
            clock=clock,
            tiers=self.tiers,
        )
        self.timing = timing if timing is not None else config.make_timing()
        self.kv_layout = None  # the mocker holds no KV memory: it accepts any peer's layout
        if config.async_scheduling is not None:
            self.pipelined = config.async_scheduling
        else:
            self.pipelined = bool(getattr(self.timing, "async_scheduling", False))
        self._inflight: _Launched | None = None
        self._preempted = 0  # preemptions of launches that scheduled nothing, reported with the next result
        self.num_steps = 0
        self._random = random.Random(rng_seed).random
        self._keys: dict[str, int | None] = {}  # request id -> token key; None = random
        # Generated tokens avoid special and EOS ids: the k-th allowed id lies in the run of
        # allowed ids starting at id _run_ids[j], which holds allowed ids k - _run_ks[j] on.
        excluded = sorted({t for t in (*special_token_ids, *eos_token_ids) if 0 <= t < vocab_size})
        self._run_ks: list[int] = []
        self._run_ids: list[int] = []
        k = prev = 0
        for s in (*excluded, vocab_size):
            if s > prev:
                self._run_ks.append(k)
                self._run_ids.append(prev)
                k += s - prev
            prev = s + 1
        if k == 0:
            raise ValueError("every token id of the vocabulary is special: nothing to generate")
        self._num_allowed = k

    # -- requests -------------------------------------------------------------------------------
    def add_request(self, request: GenerateRequest, arrival_time: float | None = None, *,
                    prompt_u32: array | None = None, block_hashes: list[int] | None = None,
                    local_hashes: list[int] | None = None, ids_in_vocab: bool = False) -> None:
        """Queue a request; ValueError if it is malformed or can never fit this engine.
        ``prompt_u32``: the caller's copy of ``request.token_ids`` as ``array("I")``, if it has one
        (spares packing them). ``block_hashes``: the sequence hashes (``turbine.protocols.block_hashing``) of
        the prompt's full blocks at this core's block size and the request's LoRA seed, if the
        caller has them (spares hashing the prompt), and ``local_hashes`` their local hashes (its
        KV events carry them). ``ids_in_vocab``: the caller made the prompt
        from ids below this core's vocabulary size (spares checking them). The caller vouches for
        all three."""
        seq = Sequence.from_request(request, arrival_time)
        if block_hashes is not None:
            seq.adopt_block_hashes(self.config.block_size, block_hashes, local_hashes)  # type: ignore[arg-type]
        tokens = request.token_ids
        if tokens and not ids_in_vocab:
            try:
                ok = _ids_below(seq.prompt_u32(prompt_u32), self.vocab_size)
            except (OverflowError, TypeError):  # not all u32 ints: compare them one by one
                ok = min(tokens) >= 0 and max(tokens) < self.vocab_size
            if not ok:
                raise ValueError(
                    f"request {request.request_id!r}: token ids must lie in [0, {self.vocab_size})"
                )
        if seq.kv_source is not None and seq.kv_source.agent.layout is not None and self.kv_layout is not None:
            why = self.kv_layout.mismatch(seq.kv_source.agent.layout)
            if why:
                raise ValueError(f"request {request.request_id!r}: the peer's KV layout differs ({why})")
        self.scheduler.add(seq)
        self._keys[request.request_id] = self._token_key(request)

    def abort(self, request_id: str) -> bool:
        """Drop a request in any state; its blocks are free when this returns."""
        self._keys.pop(request_id, None)
        return self.scheduler.abort(request_id)

    # -- disaggregation (the scheduler's state machine; the copy itself is only timed) --------------
    def transfer_seconds(self, num_blocks: int) -> float:
        """Time to pull ``num_blocks`` blocks from a peer (0 when nothing is pulled)."""
        if num_blocks <= 0:
            return 0.0
        cfg = self.config
        nbytes = num_blocks * cfg.block_size * cfg.kv_bytes_per_token
        return (cfg.transfer_latency_s + nbytes / (cfg.transfer_bandwidth_gbps * 1e9)) / cfg.speedup_ratio

    def onboard_seconds(self, source: TierSource) -> float:
        """Time to copy a sequence's blocks up from the host and disk tiers."""
        cfg = self.config
        block = cfg.block_size * cfg.kv_bytes_per_token
        t = 0.0
        for tier in (HOST, DISK):
            n = sum(1 for e in source.entries if e[0] == tier)
            if n:
                bw, lat = ((cfg.host_kv_bandwidth_gbps, cfg.host_kv_latency_s) if tier == HOST
                           else (cfg.disk_kv_bandwidth_gbps, cfg.disk_kv_latency_s))
                t += lat + n * block / (bw * 1e9)
        return t / cfg.speedup_ratio

    def _tier_copies(self) -> None:
        """The mocker moves no bytes: its offloads and spills are done as soon as they are named."""
        if self.tiers is not None:
            for c in self.tiers.take_copies():
                if c.kind != "offload":
                    self.tiers.written(c.dst, c.hash, True)

    def finish_pull(self, request_id: str, ok: bool) -> bool:
        return self.scheduler.finish_pull(request_id, ok)

    def release(self, request_id: str) -> bool:
        return self.scheduler.release(request_id)

    def held_blocks(self, request_id: str) -> list[int] | None:
        return self.scheduler.held_blocks(request_id)

    def has_work(self) -> bool:
        return self._inflight is not None or self.scheduler.has_work()

    def get(self, request_id: str) -> Sequence | None:
        return self.scheduler.get(request_id)

    # -- one step ---------------------------------------------------------------------------------
    @property
    def in_flight(self) -> bool:
        """A step is scheduled and counted as running (async scheduling) but not completed."""
        return self._inflight is not None

    def step(self) -> StepResult:
        """Complete one step; with async scheduling also schedule the one after it."""
        self.scheduler.expire_held()
        self._tier_copies()
        done = self._inflight if self.pipelined else None
        if done is None:
            done = self._launch()
            if done is None:
                return StepResult(0.0, [], self.block_manager.take_events(), 0, 0, self._take_preempted(),
                                  self.scheduler.take_pulls())
        self._inflight = self._launch() if self.pipelined else None
        return self._complete(done)

    def run_plain_decodes(self, start: float, until: float) -> DecodeRun | None:
        """The fast path of a discrete-event driver: run at once the decode steps that would start
        before ``until``, the first at ``start``, each starting when the one before ends, as long as
        every running sequence decodes one token a step and nothing else happens: nothing is
        admitted, preempted or ended. Plain ones (``Scheduler.plain_decode_steps``: no block moves)
        go many at once; one that allocates or registers a block (``Scheduler.decode_step_fits``)
        is a ``step()``, and its KV events go into the run with their step. None (and nothing
        done) unless the next step is such a decode.

        Exactly what as many ``step()`` calls made at those times would do (the same tokens in the
        same order of random draws, the same durations, blocks and events, one ``num_steps``
        each): nothing outside the running sequences and their blocks changes in such steps, so
        the caller only has to promise that nothing is added, pulled or released here before the
        last step starts (``until``: the next time anything could be), and deliver each step's
        events at its end.
        """
        if self._inflight is not None or self.pipelined:
            return None
        sched = self.scheduler
        running = sched.running
        limit = sched.plain_decode_steps()
        if not limit and not sched.decode_step_fits():
            return None
        ids = [seq.request_id for seq in running]
        tokens: list[list[int]] = [[] for _ in running]
        ends: list[float] = []
        events: list[tuple[int, list[KVEvent]]] = []
        t = start
        while True:
            if limit:
                t = self._plain_decodes(t, until, limit, ends, tokens)
                if t >= until or not sched.decode_step_fits():
                    break
            res = self.step()  # allocates or registers blocks, ends nothing (decode_step_fits)
            t += res.duration_s
            ends.append(t)
            for toks, out in zip(tokens, res.outputs, strict=True):
                toks.append(out.token_id)  # type: ignore[arg-type]
            if res.kv_events:
                events.append((len(ends) - 1, res.kv_events))
            if t >= until:
                break
            limit = sched.plain_decode_steps()
            if not limit and not sched.decode_step_fits():
                break
        return DecodeRun(ends, ids, tokens, events)

    def _plain_decodes(self, t: float, until: float, limit: int, ends: list[float],
                       tokens: list[list[int]]) -> float:
        """Up to ``limit`` plain decode steps at once, the first at ``t``, the last starting before
        ``until``; their ends and tokens appended. Returns the last end."""
        self._tier_copies()  # as step() begins (nothing is held: expire_held has nothing to do)
        sched = self.scheduler
        running = sched.running
        n = len(running)
        usage = self.block_manager.usage
        step_seconds = self.timing.step_seconds
        first = len(ends)
        if getattr(self.timing, "decode_uses_context", True):
            ctx = sum(len(seq.token_ids) for seq in running)
            while True:
                t += step_seconds(0, n, usage, mean_prefill_context=0.0, mean_decode_context=ctx / n)
                ends.append(t)
                if len(ends) - first == limit or t >= until:
                    break
                ctx += n
        else:  # every step of the run lasts the same
            d = step_seconds(0, n, usage, mean_prefill_context=0.0, mean_decode_context=0.0)
            while True:
                t += d
                ends.append(t)
                if len(ends) - first == limit or t >= until:
                    break
        k = len(ends) - first
        drawn = self._sample_run(running, k)
        sched.run_plain_decodes(drawn)
        for toks, new in zip(tokens, drawn):
            toks += new
        self.num_steps += k
        return t

    def _sample_run(self, running: list[Sequence], k: int) -> list[list[int]]:
        """``k`` tokens for each sequence, drawn as ``k`` steps of ``_sample`` in batch order would."""
        keys = self._keys
        unkeyed = [i for i, seq in enumerate(running) if keys.get(seq.request_id) is None]
        out: list[list[int]] = [[] for _ in running]
        if unkeyed:
            m = len(unkeyed)
            # int(random() * allowed) each, step by step, sequence by sequence (in C: no bytecode a draw)
            ks = list(map(int, map(float(self._num_allowed).__mul__, starmap(self._random, repeat((), m * k)))))
            for j, i in enumerate(unkeyed):
                out[i] = self._allowed_ids(ks[j::m])
        for i, seq in enumerate(running):
            key = keys.get(seq.request_id)
            if key is not None:
                n0 = seq.num_output_tokens
                allowed = self._num_allowed
                out[i] = self._allowed_ids([xxhash.xxh3_64_intdigest(_PACK2(key, n0 + j)) % allowed
                                            for j in range(k)])
        return out

    def _allowed_ids(self, ks: list[int]) -> list[int]:
        """The k-th allowed token id for each k of ``ks``."""
        if len(self._run_ks) == 1:
            base = self._run_ids[0]
            return [base + k for k in ks] if base else ks
        run_ks, run_ids = self._run_ks, self._run_ids
        out = []
        for k in ks:
            j = bisect_right(run_ks, k) - 1
            out.append(run_ids[j] + k - run_ks[j])
        return out

    def _take_preempted(self) -> int:
        n, self._preempted = self._preempted, 0
        return n

    def _launch(self) -> _Launched | None:
        """Schedule a step, sample its tokens and count them as computed (placeholders)."""
        sched = self.scheduler
        out = sched.schedule()
        self._preempted += len(out.preempted)
        if not out.scheduled:
            return None
        sampled: dict[str, int] = {}
        prefill_ctx = n_prefill = decode_ctx = 0
        for entry in out.scheduled:
            seq = entry.seq
            if entry.is_prefill:
                prefill_ctx += seq.num_computed_tokens
                n_prefill += 1
            else:
                decode_ctx += len(seq.token_ids)
            if entry.produces_token:
                sampled[seq.request_id] = self._sample(seq)
        n_decode = out.num_decode_seqs
        self._tier_copies()
        duration = self.timing.step_seconds(
            out.num_prefill_tokens,
            n_decode,
            self.block_manager.usage,
            mean_prefill_context=prefill_ctx / n_prefill if n_prefill else 0.0,
            mean_decode_context=decode_ctx / n_decode if n_decode else 0.0,
        )
        return _Launched(out, sched.advance(out), sampled, duration)

    def _complete(self, done: _Launched) -> StepResult:
        self.num_steps += 1
        out = done.out
        outputs: list[StepOutput] = []
        keys = self._keys
        sched = self.scheduler
        for seq, token, reason, n_out in sched.complete(out, done.slots, done.sampled):
            if reason is not None:
                keys.pop(seq.request_id, None)
            outputs.append(step_output(sched, seq, token, reason, n_out))
        return StepResult(done.duration_s, outputs, self.block_manager.take_events(), out.num_prefill_tokens,
                          out.num_decode_seqs, self._take_preempted(), sched.take_pulls())

    def stats(self) -> EngineStats:
        cfg = self.config
        return EngineStats(
            kv_active_blocks=self.block_manager.num_active_blocks,
            kv_total_blocks=self.block_manager.num_blocks,
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            prefill_tokens=self.scheduler.num_prefill_tokens(),
            tiers=self.tiers.loads(cfg.block_size * cfg.kv_bytes_per_token) if self.tiers is not None else (),
        )

    def kv_snapshot(self) -> list[BlockStored]:
        """BlockStored events rebuilding the current prefix cache and its tiers (a router's resync)."""
        tiers = self.tiers.snapshot() if self.tiers is not None else []
        return self.block_manager.stored_blocks_snapshot() + tiers

    # -- tokens -------------------------------------------------------------------------------------
    def _token_key(self, request: GenerateRequest) -> int | None:
        """Greedy (temperature 0) or seeded requests get a key that fixes every token."""
        sampling = request.sampling
        if sampling.temperature == 0:
            seed = _GREEDY_SEED
        elif sampling.seed is not None:
            seed = sampling.seed & _U64
        else:
            return None
        return xxhash.xxh3_64_intdigest(array("I", request.token_ids).tobytes(), seed=seed)

    def _sample(self, seq: Sequence) -> int:
        """A token uniform over the allowed ids: a function of (key, output position) when
        the request has a key, so recomputation after preemption yields the same tokens."""
        key = self._keys.get(seq.request_id)
        if key is None:
            k = int(self._random() * self._num_allowed)
        else:
            k = xxhash.xxh3_64_intdigest(_PACK2(key, seq.num_output_tokens)) % self._num_allowed
        run_ks = self._run_ks
        if len(run_ks) == 1:
            return self._run_ids[0] + k
        j = bisect_right(run_ks, k) - 1
        return self._run_ids[j] + k - run_ks[j]
