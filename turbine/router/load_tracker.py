"""Per-worker load as the router sees it: its own routed requests, plus what other frontends sent.

A router knows its own requests exactly and at once; it learns of the requests other frontends
sent to the same workers only from the load the workers publish (``protocols.load.WorkerLoad``,
every 50 ms while busy, 1 s heartbeats). Each report is reconciled with the router's own
bookkeeping at the moment it arrives:

    foreign = max(0, reported - own_peak)  per quantity (requests, queued, prompt tokens, blocks)
    load    = own + foreign                what the policies read

Prompt tokens are compared whole: a worker reports a waiting prompt's full length (its prefix
hit is known only at admission), so the router's side of the comparison is its own requests'
full prompts, not their uncached part (else every predicted hit would come back as phantom
queue). ``own_peak`` is the most this router had on the worker since the previous report (since
the router started, for the first one): a report was taken a little before it arrives, so it
may still count an own request that has finished since (counting that as another frontend's
would turn every finished request into phantom load for a report period). The first report a
router hears is no exception: a frontend that routes before any report reached it (a restart
whose KV index a snapshot rebuilt at once) gets that very report late. The cost is that another
frontend's load hidden under our own peak is seen one report later. ``foreign`` is held until
the next report replaces it or ``stale_s`` passes without one. The own part changes in
exactly three places: a request is routed, its first token arrives (its prompt no longer waits
for prefill), it ends or is cancelled. Every change bumps the worker's ``version`` so cached
predictions (``latency_model``) know to refresh.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

DEFAULT_STALE_S = 3.0  # three missed heartbeats: the worker's report no longer describes it


@dataclass(slots=True)
class LoadEstimate:
    """What a router believes one worker is doing. The first four fields are totals (own + foreign)."""

    active_requests: int = 0
    prefill_tokens: int = 0  # prompt tokens routed here whose first token has not arrived
    decode_blocks: int = 0  # KV blocks held by the requests
    queued: int = 0  # requests waiting for their first token
    foreign_requests: int = 0  # the part of each total the worker reported beyond this router's own
    foreign_prefill_tokens: int = 0
    foreign_blocks: int = 0
    foreign_queued: int = 0
    foreign_until: float = 0.0  # the foreign part lapses then (router clock)
    version: int = 0
    own_prompt_tokens: int = 0  # whole prompts of this router's requests waiting for a first token
    peak: tuple[int, int, int, int] = (0, 0, 0, 0)  # reportable()'s largest values since the last report (or start)

    def own(self) -> tuple[int, int, int, int]:
        """(requests, prefill tokens, blocks, queued) of this router's own requests."""
        return (self.active_requests - self.foreign_requests, self.prefill_tokens - self.foreign_prefill_tokens,
                self.decode_blocks - self.foreign_blocks, self.queued - self.foreign_queued)

    def reportable(self) -> tuple[int, int, int, int]:
        """Own load as a worker would report it: (requests, whole prompt tokens, blocks, queued)."""
        return (self.active_requests - self.foreign_requests, self.own_prompt_tokens,
                self.decode_blocks - self.foreign_blocks, self.queued - self.foreign_queued)


@dataclass(slots=True)
class _Routed:
    worker_id: str
    prefill_tokens: int
    blocks: int
    prompt_tokens: int
    prefilling: bool = True


@dataclass
class LoadTracker:
    block_size: int = 16
    stale_s: float = DEFAULT_STALE_S
    workers: dict[str, LoadEstimate] = field(default_factory=dict)
    _requests: dict[str, _Routed] = field(default_factory=dict)
    _foreign: set[str] = field(default_factory=set)  # workers with a foreign part held
    _next_expiry: float = math.inf  # the earliest foreign_until among them

    def add_worker(self, worker_id: str) -> None:
        self.workers.setdefault(worker_id, LoadEstimate())

    def remove_worker(self, worker_id: str) -> None:
        self.workers.pop(worker_id, None)
        self._foreign.discard(worker_id)
        for rid in [r for r, v in self._requests.items() if v.worker_id == worker_id]:
            del self._requests[rid]

    def routed(self, request_id: str, worker_id: str, prompt_tokens: int, cached_tokens: int = 0) -> None:
        if request_id in self._requests:  # routed again without finishing: release the first reservation
            self.finished(request_id)
        load = self.workers.get(worker_id)
        if load is None:
            load = self.workers[worker_id] = LoadEstimate()
        new_tokens = max(prompt_tokens - cached_tokens, 0)
        blocks = -(-prompt_tokens // self.block_size)
        self._requests[request_id] = _Routed(worker_id, new_tokens, blocks, prompt_tokens)
        load.active_requests += 1
        load.prefill_tokens += new_tokens
        load.own_prompt_tokens += prompt_tokens
        load.decode_blocks += blocks
        load.queued += 1
        load.version += 1
        load.peak = tuple(map(max, load.peak, load.reportable()))  # type: ignore[assignment]

    def first_token(self, request_id: str) -> None:
        r = self._requests.get(request_id)
        if r is None or not r.prefilling:
            return
        r.prefilling = False
        load = self.workers.get(r.worker_id)
        if load is not None:
            load.prefill_tokens -= r.prefill_tokens
            load.own_prompt_tokens -= r.prompt_tokens
            load.queued -= 1
            load.version += 1

    def finished(self, request_id: str) -> None:
        r = self._requests.pop(request_id, None)
        if r is None:
            return
        load = self.workers.get(r.worker_id)
        if load is None:
            return
        load.active_requests -= 1
        load.decode_blocks -= r.blocks
        if r.prefilling:
            load.prefill_tokens -= r.prefill_tokens
            load.own_prompt_tokens -= r.prompt_tokens
            load.queued -= 1
        load.version += 1

    # -- other frontends --------------------------------------------------------------------------
    def reported(self, worker_id: str, *, requests: int, queued: int, prefill_tokens: int, blocks: int,
                 now: float) -> None:
        """A worker's published load (all frontends' requests): keep what this router's own do not explain."""
        load = self.workers.get(worker_id)
        if load is None:
            return  # not (or no longer) a worker of this router's
        self._set_foreign(load, 0, 0, 0, 0)
        own = load.reportable()
        own_req, own_prefill, own_blocks, own_queued = map(max, load.peak, own)
        load.peak = own
        self._set_foreign(load, max(0, requests - own_req), max(0, prefill_tokens - own_prefill),
                          max(0, blocks - own_blocks), max(0, queued - own_queued))
        load.foreign_until = now + self.stale_s
        if load.foreign_requests or load.foreign_prefill_tokens or load.foreign_blocks or load.foreign_queued:
            self._foreign.add(worker_id)
            self._next_expiry = min(self._next_expiry, load.foreign_until)
        else:
            self._foreign.discard(worker_id)

    def expire(self, now: float) -> None:
        """Drop foreign parts whose report is older than ``stale_s``."""
        if now < self._next_expiry:
            return
        for w in [w for w in self._foreign if self.workers[w].foreign_until <= now]:
            self._set_foreign(self.workers[w], 0, 0, 0, 0)
            self._foreign.discard(w)
        self._next_expiry = min((self.workers[w].foreign_until for w in self._foreign), default=math.inf)

    @staticmethod
    def _set_foreign(load: LoadEstimate, requests: int, prefill_tokens: int, blocks: int, queued: int) -> None:
        load.active_requests += requests - load.foreign_requests
        load.prefill_tokens += prefill_tokens - load.foreign_prefill_tokens
        load.decode_blocks += blocks - load.foreign_blocks
        load.queued += queued - load.foreign_queued
        load.foreign_requests, load.foreign_prefill_tokens = requests, prefill_tokens
        load.foreign_blocks, load.foreign_queued = blocks, queued
        load.version += 1
