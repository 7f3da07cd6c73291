"""The router the frontend talks to: picks a worker per request and keeps its view of the fleet.

    route(request)  ─▶ kv: local hashes ─▶ index.find_matches ─▶ selector (cost over overlap + load)
                       predicted: the same overlaps ─▶ latency_selector (predicted TTFT, ITL guard)
                       else: LoadPolicy (round-robin, random, least-loaded, power-of-two)
                    ─▶ loads.routed (the one place load is reserved)
                    None: every candidate has ``max_queued`` requests waiting (the caller queues)
    reported_load   ─▶ loads.reported (other frontends' requests, reconciled with our own)
    apply_kv_events ─▶ index (exact mode)         approx mode: route() records its own choices

Selection is pure (``selector.py``, ``policies.py``); the index, the load view and the
counters are owned here. Nothing here does I/O: the frontend feeds events and usage in.
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

from turbine.protocols.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from turbine.protocols.load import WorkerLoad
from turbine.protocols.model_card import WorkerTiming
from turbine.router.approx import DEFAULT_TTL_S, ApproxIndexer
from turbine.router.decision_log import Alternative, DecisionLog
from turbine.router.indexer import KvIndexer
from turbine.router.latency_model import LatencyModel, WorkerState, model_key
from turbine.router.latency_selector import predictions, select_by_latency
from turbine.router.load_tracker import DEFAULT_STALE_S, LoadTracker
from turbine.router.metrics import RouterStats
from turbine.router.policies import POLICIES, LoadPolicy
from turbine.router.selector import select_worker, worker_costs

log = logging.getLogger("turbine.router")

DEFAULT_TOTAL_BLOCKS = 16384  # a worker whose card was not seen: the mocker's (and Dynamo's) default

# A block onboarded from host memory costs a copy over PCIe (~6 us a token of an 8B model at
# 20 GB/s), recomputing it ~29 us on an H200 (bench/profiles): worth ~0.8 of a GPU hit. From disk
# (~64 us a token at 2 GB/s) it is slower than recomputing for a model this small; larger models
# compute more per KV byte, so the default keeps some credit.
DEFAULT_HOST_WEIGHT = 0.8
DEFAULT_DISK_WEIGHT = 0.3


class RouteDecision(NamedTuple):
    worker_id: str
    overlap_blocks: int  # predicted prefix-cache hit in blocks (0 for load-only policies)
    predicted_ttft_s: float | None = None  # the predicted policy's estimate


class Router:
    def __init__(self, policy: str = "round-robin", *, block_size: int = 16, overlap_weight: float = 1.0,
                 temperature: float = 0.0, approx: bool = False, approx_ttl_s: float = DEFAULT_TTL_S,
                 seed: int | None = None, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, host_tier_weight: float = DEFAULT_HOST_WEIGHT,
                 disk_tier_weight: float = DEFAULT_DISK_WEIGHT, max_itl_s: float = math.inf,
                 max_queued: int = 0, shared_load: bool = True, load_stale_s: float = DEFAULT_STALE_S):
        """``host_tier_weight``/``disk_tier_weight``: what a prefix block held in a worker's host
        memory or disk is worth against one in its GPU cache (1: the same; 0: nothing), as it is
        copied back, not recomputed, but not free either. ``max_itl_s``: the predicted policy's
        ITL guard. ``max_queued``: requests a worker may have waiting for their first token before
        ``route`` declines to add one (0: no limit). ``shared_load``: count the load workers
        report beyond this router's own requests (other frontends')."""
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; choose one of {', '.join(POLICIES)}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if temperature < 0:
            raise ValueError(f"router temperature must be >= 0, got {temperature}")
        if overlap_weight < 0:
            raise ValueError(f"overlap weight must be >= 0, got {overlap_weight}")
        if not (0 <= host_tier_weight <= 1 and 0 <= disk_tier_weight <= 1):
            raise ValueError("tier weights must be in [0, 1]")
        if approx and policy not in ("kv", "predicted"):
            raise ValueError("approximate mode applies to the kv and predicted policies only")
        if not max_itl_s > 0:
            raise ValueError(f"the ITL guard must be positive, got {max_itl_s}")
        if max_queued < 0:
            raise ValueError(f"max_queued must be >= 0 (0: no limit), got {max_queued}")
        if not load_stale_s > 0:
            raise ValueError(f"load_stale_s must be positive, got {load_stale_s}")
        self.policy_name = policy
        self.block_size = block_size
        self.overlap_weight = overlap_weight
        self.temperature = temperature
        self.wall_clock = wall_clock
        self.host_tier_weight = host_tier_weight
        self.disk_tier_weight = disk_tier_weight
        self.rng = random.Random(seed)
        self.policy = None if policy in ("kv", "predicted") else LoadPolicy(policy, seed)
        self.predicted = policy == "predicted"
        self.max_itl_s = max_itl_s
        self.max_queued = max_queued
        self.shared_load = shared_load
        self.clock = clock
        self.loads = LoadTracker(block_size=block_size, stale_s=load_stale_s)
        self._models: dict[str, LatencyModel] = {}  # per worker (shared by workers configured alike)
        self._model_cache: dict[tuple[object, ...], LatencyModel] = {}
        self._states: dict[str, WorkerState] = {}
        self._state_versions: dict[str, int] = {}
        self.on_capacity: Callable[[], None] | None = None  # load fell somewhere: a queued request may fit now
        self.index = KvIndexer(block_size)
        self.approx = ApproxIndexer(block_size, approx_ttl_s, clock) if approx else None
        self.stats = RouterStats(block_size=block_size)
        self._rejected_warned: set[str] = set()
        self.decision_log: DecisionLog | None = None  # the dashboard's; None: routing pays nothing for it

    # -- requests -------------------------------------------------------------------------------
    def best_overlap(self, candidates: Sequence[str], token_ids: Sequence[int], lora_name: str | None = None) -> int:
        """The longest cached prefix (blocks) any of ``candidates`` holds; nothing is reserved.
        (0 for the load-only policies, which know no blocks.)"""
        if self.policy is None and candidates:
            if self.approx is not None:
                local = self.approx.index.local_hashes(token_ids, lora_name)
                overlaps = self.approx.find_matches(local) if local else {}
            else:
                overlaps = self.index.find_matches_for_tokens(token_ids, lora_name)
            best = max((overlaps.get(w, 0) for w in candidates), default=0)
            return min(best, max(len(token_ids) - 1, 0) // self.block_size)
        return 0

    def route(self, request_id: str, candidates: Sequence[str], token_ids: Sequence[int],
              lora_name: str | None = None, remote_kv: bool = False,
              local_hashes: Sequence[int] | None = None) -> RouteDecision | None:
        """Pick a worker among ``candidates`` and reserve the request's load on it; None when
        every candidate already has ``max_queued`` requests waiting for their first token (the
        caller queues the request and tries again when ``on_capacity`` fires).

        ``remote_kv``: the prompt's KV comes from a prefill worker, so the chosen worker has no
        prefill work to queue (only the blocks to hold). ``local_hashes``: the local hashes of
        ``token_ids``' full blocks (this router's block size, ``lora_name``'s seed), if the caller
        has them: spares hashing the prompt (the caller vouches that they agree)."""
        if not candidates:
            raise ValueError("no candidate workers")
        loads = self.loads
        if loads._foreign:
            loads.expire(self.clock())
        if self.max_queued:
            lim, lw = self.max_queued, loads.workers
            candidates = [w for w in candidates if (ld := lw.get(w)) is None or ld.queued < lim]
            if not candidates:
                self.stats.declined += 1
                return None
        overlap = 0
        ttft: float | None = None
        if self.policy is None:
            bs = self.block_size
            raw: dict[str, int] | None = None  # matched depths when tiers discount them
            if self.approx is not None:  # it records every block, so hash them all
                local = (list(local_hashes) if local_hashes is not None
                         else self.approx.index.local_hashes(token_ids, lora_name))
                overlaps = self.approx.find_matches(local) if local else {}
            elif self.index.has_tiers():  # blocks in host memory or on disk are worth less
                paths: list[int] = []
                raw = self.index.find_matches_for_tokens(token_ids, lora_name, paths=paths)
                overlaps = {w: d - self._tier_discount(w, paths, d) for w, d in raw.items()}  # type: ignore[misc]
            elif local_hashes is not None:
                overlaps = self.index.find_matches(local_hashes)
            else:  # hashes only as deep as some worker matches
                overlaps = self.index.find_matches_for_tokens(token_ids, lora_name)
            if self.predicted:
                # a remote-KV request brings its prompt's KV: nothing of it waits for prefill
                lsel = select_by_latency(candidates, overlaps, self._fresh_states(candidates), self._models,
                                         1 if remote_kv else len(token_ids), rng=self.rng, max_itl_s=self.max_itl_s)
                if not lsel.guarded:
                    self.stats.guard_overridden += 1
                worker, ttft, sel_overlap = lsel.worker_id, lsel.ttft_s, lsel.overlap_blocks
            else:
                sel = select_worker(candidates, overlaps, self.loads.workers, -(-len(token_ids) // bs),
                                    block_size=bs, rng=self.rng, overlap_weight=self.overlap_weight,
                                    temperature=self.temperature)
                worker, sel_overlap = sel.worker_id, sel.overlap_blocks
            matched = raw.get(worker, 0) if raw is not None else sel_overlap
            # an engine always computes the prompt's last token, so a full-prompt match hits one block less
            overlap = min(int(matched), max(len(token_ids) - 1, 0) // bs)
            if self.approx is not None:
                self.approx.record(worker, local)
        else:
            worker = self.policy.choose(candidates, self.loads.workers)
        if self.decision_log is not None:  # before the reservation: the loads the choice was made on
            self._log_decision(request_id, candidates, overlaps if self.policy is None else {}, len(token_ids),
                               remote_kv, worker, overlap, ttft)
        cached = len(token_ids) if remote_kv else overlap * self.block_size
        self.loads.routed(request_id, worker, len(token_ids), cached)
        self.stats.decided(self.policy_name)
        return RouteDecision(worker, overlap, ttft)

    def _log_decision(self, request_id: str, candidates: Sequence[str], overlaps: Mapping[str, float],
                      prompt_tokens: int, remote_kv: bool, worker: str, overlap: int, ttft: float | None) -> None:
        log_ = self.decision_log
        assert log_ is not None
        alts = self._alternatives(candidates, overlaps, prompt_tokens, remote_kv) if log_.wants_detail() else None
        log_.record(request_id, worker, self.policy_name, prompt_tokens=prompt_tokens, overlap_blocks=overlap,
                    predicted_ttft_s=ttft, remote_kv=remote_kv, alternatives=alts)

    def _alternatives(self, candidates: Sequence[str], overlaps: Mapping[str, float], prompt_tokens: int,
                      remote_kv: bool) -> list[Alternative]:
        """Every candidate as the policy weighed it (only for the decision log: off the fast path)."""
        oget, lw = overlaps.get, self.loads.workers
        if self.predicted:
            preds = predictions(candidates, overlaps, self._fresh_states(candidates), self._models,  # type: ignore[arg-type]
                                1 if remote_kv else prompt_tokens)
            return [Alternative(w, oget(w, 0), None, t, i) for w, (t, i) in zip(candidates, preds, strict=True)]
        if self.policy is None:
            costs = worker_costs(candidates, overlaps, lw, -(-prompt_tokens // self.block_size),  # type: ignore[arg-type]
                                 block_size=self.block_size, overlap_weight=self.overlap_weight)
            return [Alternative(w, oget(w, 0), c, None, None) for w, c in zip(candidates, costs, strict=True)]
        return [Alternative(w, 0, float(ld.prefill_tokens + ld.decode_blocks) if (ld := lw.get(w)) else 0.0, None, None)
                for w in candidates]

    # -- the predicted policy's view of each worker ----------------------------------------------
    def worker_added(self, worker_id: str, total_blocks: int, timing: WorkerTiming | None = None) -> None:
        """A worker joined: its KV capacity and timing (from its card). Raises ValueError for a
        timing profile that does not load, before anything changes."""
        self._models[worker_id] = self.latency_model(total_blocks, timing)
        self._state_versions.pop(worker_id, None)
        self.loads.add_worker(worker_id)
        self._capacity()

    def latency_model(self, total_blocks: int, timing: WorkerTiming | None = None) -> LatencyModel:
        """The latency model of a worker with this card (shared by workers configured alike)."""
        key = model_key(timing, self.block_size, total_blocks)
        model = self._model_cache.get(key)
        if model is None:
            model = LatencyModel.from_card(timing, self.block_size, total_blocks)
            if len(self._model_cache) >= 64:  # bounded: a fleet has a handful of configurations
                self._model_cache.clear()
            self._model_cache[key] = model
        return model

    def _fresh_states(self, candidates: Sequence[str]) -> dict[str, WorkerState]:
        """Each candidate's WorkerState, recomputed only for workers whose load changed."""
        states, versions, lw = self._states, self._state_versions, self.loads.workers
        for w in candidates:
            ld = lw.get(w)
            v = ld.version if ld is not None else -1
            if versions.get(w) == v and w in states:
                continue
            st = states.get(w)
            if st is None:
                st = states[w] = WorkerState()
            model = self._models.get(w)
            if model is None:  # routed to before it was announced (tests, a card without timing)
                model = self._models[w] = LatencyModel.from_card(None, self.block_size, DEFAULT_TOTAL_BLOCKS)
            if ld is None:
                st.queued = st.decoding = st.kv_blocks = 0
            else:
                st.queued, st.decoding, st.kv_blocks = ld.prefill_tokens, ld.active_requests - ld.queued, ld.decode_blocks
            model.refresh(st)
            versions[w] = v
        return states

    def predict(self, worker_id: str, prompt_tokens: int, overlap_blocks: int = 0) -> tuple[float, float]:
        """(TTFT, imposed ITL) the predicted policy expects for a prompt on ``worker_id`` now."""
        st = self._fresh_states([worker_id])[worker_id]
        p = self._models[worker_id].predict(st, prompt_tokens - overlap_blocks * self.block_size)
        return p.ttft_s, p.itl_s

    def reported_load(self, load: WorkerLoad) -> None:
        """A worker's published load: the part other frontends' requests explain is added to ours."""
        if not self.shared_load:
            return
        before = self.loads.workers.get(load.worker_id)
        queued_before = before.queued if before is not None else 0
        self.loads.reported(load.worker_id, requests=load.num_running + load.num_waiting, queued=load.num_waiting,
                            prefill_tokens=load.prefill_tokens, blocks=load.kv_active_blocks, now=self.clock())
        after = self.loads.workers.get(load.worker_id)
        if after is not None and after.queued < queued_before:
            self._capacity()

    def _capacity(self) -> None:
        if self.on_capacity is not None:
            self.on_capacity()

    def _tier_discount(self, worker: str, paths: list[int], depth: int) -> float:
        host, disk = self.index.lower_tier_blocks(worker, paths, depth)
        return host * (1.0 - self.host_tier_weight) + disk * (1.0 - self.disk_tier_weight)

    def first_token(self, request_id: str) -> None:
        self.loads.first_token(request_id)
        if self.decision_log is not None:
            self.decision_log.first_token(request_id)
        self._capacity()

    def finished(self, request_id: str) -> None:
        self.loads.finished(request_id)
        self._capacity()

    def observe_actual(self, request_id: str, predicted_blocks: int, actual_cached_tokens: int) -> None:
        """Usage came back: compare the predicted hit (blocks) with the worker's real one (tokens).

        ``request_id`` names the observation (a request or a worker); only totals are kept.
        """
        self.stats.observe_actual(predicted_blocks, actual_cached_tokens)
        if self.decision_log is not None:
            self.decision_log.observe(request_id, actual_cached_tokens // self.block_size)

    # -- fleet ----------------------------------------------------------------------------------
    def worker_removed(self, worker_id: str, *, index: bool = True) -> None:
        """The worker left discovery: forget its load and every block it held.

        ``index=False``: leave its blocks to the caller, which drops them in order with the
        worker's KV events still queued (the frontend's event applier thread does)."""
        self.loads.remove_worker(worker_id)
        self._models.pop(worker_id, None)
        self._states.pop(worker_id, None)
        self._state_versions.pop(worker_id, None)
        if index:
            self.index.remove_worker(worker_id)
        if self.approx is not None:
            self.approx.remove_worker(worker_id)
        self._rejected_warned.discard(worker_id)

    def apply_kv_events(self, worker_id: str, events: Iterable[KVEvent], ts: float | None = None) -> bool:
        """Apply a worker's KV events in order; False means the index missed some: resync it.

        ``ts`` is the batch's wall-clock timestamp (``KVEventBatch.ts``), for the lag metric.
        Not thread-safe: one thread applies (the frontend's event applier, holding
        ``index.lock``; the simulator inline).
        """
        s = self.stats
        if self.approx is not None:
            s.events_ignored += sum(1 for _ in events)
            return True
        ok = True
        apply = self.index.apply
        n_stored = n_removed = n_cleared = stored = removed = 0
        for ev in events:
            try:
                placed = apply(worker_id, ev)
            except ValueError as e:
                s.events_rejected += 1
                if worker_id not in self._rejected_warned:
                    self._rejected_warned.add(worker_id)
                    log.warning("ignoring KV events of worker %s: %s", worker_id, e)
                continue
            kind = type(ev)
            if kind is BlockStored:
                n_stored += 1
                if placed:
                    stored += len(ev.block_hashes)
                else:
                    s.events_unplaced += 1
                    ok = False
            elif kind is BlockRemoved:
                n_removed += 1
                removed += len(ev.block_hashes)
            else:  # apply raised for anything but the three event types
                n_cleared += 1
        applied = s.events_applied
        if n_stored:
            applied["BlockStored"] = applied.get("BlockStored", 0) + n_stored
            s.blocks_stored += stored
        if n_removed:
            applied["BlockRemoved"] = applied.get("BlockRemoved", 0) + n_removed
            s.blocks_removed += removed
        if n_cleared:
            applied["AllBlocksCleared"] = applied.get("AllBlocksCleared", 0) + n_cleared
        if ts is not None:
            s.lag.observe(self.wall_clock() - ts)
        return ok

    def reset_worker(self, worker_id: str, snapshot: Iterable[BlockStored | AllBlocksCleared],
                     pace: Callable[[], object] | None = None) -> None:
        """Replace the worker's blocks with a full-state dump (BlockStored events, any order).

        ``pace`` is called between pieces of the work: the frontend's event applier lets routing
        at the index there, so a large dump never holds the index for long."""
        self.index.clear_worker(worker_id, pace)
        self.stats.resyncs += 1
        pending = [ev for ev in snapshot if type(ev) is BlockStored]
        while pending:  # parents first: retry what could not be placed while anything progresses
            left = []
            for ev in pending:
                try:
                    if not self.index.apply(worker_id, ev):
                        left.append(ev)
                except ValueError:
                    self.stats.events_rejected += 1
                if pace is not None:
                    pace()
            if len(left) == len(pending):
                self.stats.events_unplaced += len(left)  # orphans: their parent was evicted
                break
            pending = left

    # -- views ----------------------------------------------------------------------------------
    @property
    def decisions(self) -> int:
        return sum(self.stats.decisions.values())

    @property
    def index_blocks(self) -> int:
        return self.approx.num_blocks if self.approx is not None else self.index.num_blocks

    @property
    def index_nodes(self) -> int:
        return self.approx.index.num_nodes if self.approx is not None else self.index.num_nodes
