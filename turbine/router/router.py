"""The router the frontend talks to: picks a worker per request and keeps its view of the fleet.

    route(request)  ─▶ kv: local hashes ─▶ index.find_matches ─▶ selector (cost over overlap + load)
                       else: LoadPolicy (round-robin, random, least-loaded, power-of-two)
                    ─▶ loads.routed (the one place load is reserved)
    apply_kv_events ─▶ index (exact mode)         approx mode: route() records its own choices

Selection is pure (``selector.py``, ``policies.py``); the index, the load view and the
counters are owned here. Nothing here does I/O: the frontend feeds events and usage in.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from turbine.protocols.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from turbine.router.approx import DEFAULT_TTL_S, ApproxIndexer
from turbine.router.indexer import KvIndexer
from turbine.router.load_tracker import LoadTracker
from turbine.router.metrics import RouterStats
from turbine.router.policies import POLICIES, LoadPolicy
from turbine.router.selector import select_worker

log = logging.getLogger("turbine.router")

# A block onboarded from host memory costs a copy over PCIe (~6 us a token of an 8B model at
# 20 GB/s), recomputing it ~29 us on an H200 (bench/profiles): worth ~0.8 of a GPU hit. From disk
# (~64 us a token at 2 GB/s) it is slower than recomputing for a model this small; larger models
# compute more per KV byte, so the default keeps some credit.
DEFAULT_HOST_WEIGHT = 0.8
DEFAULT_DISK_WEIGHT = 0.3


class RouteDecision(NamedTuple):
    worker_id: str
    overlap_blocks: int  # predicted prefix-cache hit in blocks (0 for load-only policies)


class Router:
    def __init__(self, policy: str = "round-robin", *, block_size: int = 16, overlap_weight: float = 1.0,
                 temperature: float = 0.0, approx: bool = False, approx_ttl_s: float = DEFAULT_TTL_S,
                 seed: int | None = None, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, host_tier_weight: float = DEFAULT_HOST_WEIGHT,
                 disk_tier_weight: float = DEFAULT_DISK_WEIGHT):
        """``host_tier_weight``/``disk_tier_weight``: what a prefix block held in a worker's host
        memory or disk is worth against one in its GPU cache (1: the same; 0: nothing), as it is
        copied back, not recomputed, but not free either."""
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
        if approx and policy != "kv":
            raise ValueError("approximate mode applies to the kv policy only")
        self.policy_name = policy
        self.block_size = block_size
        self.overlap_weight = overlap_weight
        self.temperature = temperature
        self.wall_clock = wall_clock
        self.host_tier_weight = host_tier_weight
        self.disk_tier_weight = disk_tier_weight
        self.rng = random.Random(seed)
        self.policy = None if policy == "kv" else LoadPolicy(policy, seed)
        self.loads = LoadTracker(block_size=block_size)
        self.index = KvIndexer(block_size)
        self.approx = ApproxIndexer(block_size, approx_ttl_s, clock) if approx else None
        self.stats = RouterStats(block_size=block_size)
        self._rejected_warned: set[str] = set()

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
              local_hashes: Sequence[int] | None = None) -> RouteDecision:
        """Pick a worker among ``candidates`` and reserve the request's load on it.

        ``remote_kv``: the prompt's KV comes from a prefill worker, so the chosen worker has no
        prefill work to queue (only the blocks to hold). ``local_hashes``: the local hashes of
        ``token_ids``' full blocks (this router's block size, ``lora_name``'s seed), if the caller
        has them: spares hashing the prompt (the caller vouches that they agree)."""
        if not candidates:
            raise ValueError("no candidate workers")
        overlap = 0
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
            sel = select_worker(candidates, overlaps, self.loads.workers, -(-len(token_ids) // bs),
                                block_size=bs, rng=self.rng, overlap_weight=self.overlap_weight,
                                temperature=self.temperature)
            worker = sel.worker_id
            matched = raw.get(worker, 0) if raw is not None else sel.overlap_blocks
            # an engine always computes the prompt's last token, so a full-prompt match hits one block less
            overlap = min(int(matched), max(len(token_ids) - 1, 0) // bs)
            if self.approx is not None:
                self.approx.record(worker, local)
        else:
            worker = self.policy.choose(candidates, self.loads.workers)
        cached = len(token_ids) if remote_kv else overlap * self.block_size
        self.loads.routed(request_id, worker, len(token_ids), cached)
        self.stats.decided(self.policy_name)
        return RouteDecision(worker, overlap)

    def _tier_discount(self, worker: str, paths: list[int], depth: int) -> float:
        host, disk = self.index.lower_tier_blocks(worker, paths, depth)
        return host * (1.0 - self.host_tier_weight) + disk * (1.0 - self.disk_tier_weight)

    def first_token(self, request_id: str) -> None:
        self.loads.first_token(request_id)

    def finished(self, request_id: str) -> None:
        self.loads.finished(request_id)

    def observe_actual(self, request_id: str, predicted_blocks: int, actual_cached_tokens: int) -> None:
        """Usage came back: compare the predicted hit (blocks) with the worker's real one (tokens).

        ``request_id`` names the observation (a request or a worker); only totals are kept.
        """
        self.stats.observe_actual(predicted_blocks, actual_cached_tokens)

    # -- fleet ----------------------------------------------------------------------------------
    def worker_removed(self, worker_id: str) -> None:
        """The worker left discovery: forget its load and every block it held."""
        self.loads.remove_worker(worker_id)
        self.index.remove_worker(worker_id)
        if self.approx is not None:
            self.approx.remove_worker(worker_id)
        self._rejected_warned.discard(worker_id)

    def apply_kv_events(self, worker_id: str, events: Iterable[KVEvent], ts: float | None = None) -> bool:
        """Apply a worker's KV events in order; False means the index missed some: resync it.

        ``ts`` is the batch's wall-clock timestamp (``KVEventBatch.ts``), for the lag metric.
        """
        s = self.stats
        if self.approx is not None:
            s.events_ignored += sum(1 for _ in events)
            return True
        ok = True
        applied = s.events_applied
        for ev in events:
            try:
                placed = self.index.apply(worker_id, ev)
            except ValueError as e:
                s.events_rejected += 1
                if worker_id not in self._rejected_warned:
                    self._rejected_warned.add(worker_id)
                    log.warning("ignoring KV events of worker %s: %s", worker_id, e)
                continue
            kind = type(ev).__name__
            applied[kind] = applied.get(kind, 0) + 1
            if type(ev) is BlockStored:
                if placed:
                    s.blocks_stored += len(ev.block_hashes)
                else:
                    s.events_unplaced += 1
                    ok = False
            elif type(ev) is BlockRemoved:
                s.blocks_removed += len(ev.block_hashes)
        if ts is not None:
            s.lag.observe(self.wall_clock() - ts)
        return ok

    def reset_worker(self, worker_id: str, snapshot: Iterable[BlockStored | AllBlocksCleared]) -> None:
        """Replace the worker's blocks with a full-state dump (BlockStored events, any order)."""
        self.index.clear_worker(worker_id)
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
