"""Per-worker load as the router sees it: requests it routed that have not ended yet.

Updated in exactly three places: when a request is routed, when its first token arrives (its
prompt is no longer waiting for prefill) and when it ends or is cancelled.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class WorkerLoad:
    active_requests: int = 0
    prefill_tokens: int = 0  # prompt tokens routed here whose first token has not arrived
    decode_blocks: int = 0  # KV blocks held by this worker's routed requests


@dataclass(slots=True)
class _Routed:
    worker_id: str
    prefill_tokens: int
    blocks: int
    prefilling: bool = True


@dataclass
class LoadTracker:
    block_size: int = 16
    workers: dict[str, WorkerLoad] = field(default_factory=dict)
    _requests: dict[str, _Routed] = field(default_factory=dict)

    def add_worker(self, worker_id: str) -> None:
        self.workers.setdefault(worker_id, WorkerLoad())

    def remove_worker(self, worker_id: str) -> None:
        self.workers.pop(worker_id, None)
        for rid in [r for r, v in self._requests.items() if v.worker_id == worker_id]:
            del self._requests[rid]

    def routed(self, request_id: str, worker_id: str, prompt_tokens: int, cached_tokens: int = 0) -> None:
        if request_id in self._requests:  # routed again without finishing: release the first reservation
            self.finished(request_id)
        load = self.workers.setdefault(worker_id, WorkerLoad())
        new_tokens = max(prompt_tokens - cached_tokens, 0)
        blocks = -(-prompt_tokens // self.block_size)
        self._requests[request_id] = _Routed(worker_id, new_tokens, blocks)
        load.active_requests += 1
        load.prefill_tokens += new_tokens
        load.decode_blocks += blocks

    def first_token(self, request_id: str) -> None:
        r = self._requests.get(request_id)
        if r is None or not r.prefilling:
            return
        r.prefilling = False
        load = self.workers.get(r.worker_id)
        if load is not None:
            load.prefill_tokens -= r.prefill_tokens

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
