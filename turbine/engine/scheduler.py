"""Continuous batching in the style of vLLM v1: one token budget per step, chunked prefill,
LIFO preemption by recomputation. Engine-independent: a real model runner and the mocker both
execute the steps it plans.

    schedule():   running first (decode: 1 token; an unfinished prefill continues, chunked)
                  ──▶ then waiting, FCFS, while seats (max_num_seqs) and tokens
                      (max_num_batched_tokens) last; none admitted in a step that preempted
    out of blocks: preempt the newest running sequence (free blocks, computed = 0, to the
                  front of waiting); it recomputes prompt + output later, the prefix cache helps
    postprocess(): count computed tokens, register full blocks, append sampled tokens,
                  apply stop conditions, free finished sequences

Async scheduling splits postprocess in two, so the next step can be planned while this one
still runs on the device:

    advance(out)          right after launch: count the step's tokens as computed and append a
                          PLACEHOLDER for each token it will sample (the next decode reads it
                          from the device)
    complete(out, slots, sampled)   once the tokens are on the host: fill the placeholders,
                          register full blocks, apply stop conditions, free finished sequences

A sequence certain to finish when its placeholder resolves (max_tokens or the context length
reached) is not scheduled again; one that stops on a sampled stop token has computed one
extra token, which is dropped (its blocks are freed once the stop is known).

Disaggregation adds two states, the same for every engine (the mocker copies nothing but times
the copy; a real engine moves the bytes):

    prefill side:  RUNNING ──finish──▶ HELD ──release(id) or hold deadline──▶ blocks freed
                   (``kv_hold_s``: the blocks of the prompt stay referenced for a decode worker)
    decode side:   WAITING ──admit: local prefix hit + allocate the rest──▶ PULLING
                   ──finish_pull(ok)──▶ WAITING (holding the pulled blocks, registered as cached)
                   ──▶ RUNNING: only the tail past the last full block is computed locally
                   ──finish_pull(failed)──▶ WAITING, blocks freed: prefilled locally instead
    An abort while PULLING frees the blocks only at ``finish_pull``: the copy may still write them.

``take_pulls()`` drains the copies admission ordered (like ``take_events()``); the engine runs
them off the step path and reports each with ``finish_pull``.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import msgspec

from turbine.engine.block_manager import KVBlockManager
from turbine.engine.sequence import PLACEHOLDER, Sequence, SequenceStatus
from turbine.protocols.generate import FinishReason

_RUNNING = SequenceStatus.RUNNING
_WAITING = SequenceStatus.WAITING
_PULLING = SequenceStatus.PULLING
_HELD = SequenceStatus.HELD


class SchedulerConfig(msgspec.Struct, frozen=True, kw_only=True):
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True
    # Cap on one prefill's tokens per step, so a long prompt cannot monopolize a step.
    long_prefill_token_threshold: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Context length: prompts must be shorter; generation stops with "length" when reached.
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if self.long_prefill_token_threshold is not None and self.long_prefill_token_threshold <= 0:
            raise ValueError("long_prefill_token_threshold must be positive when set")
        if self.max_model_len is not None and self.max_model_len <= 1:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")


class ScheduledSeq(NamedTuple):
    seq: Sequence
    num_new_tokens: int  # tokens whose KV this step computes
    is_prefill: bool  # False only for a one-token decode of a sequence that has output
    produces_token: bool  # this step finishes the sequence's pending tokens: sample one


class SchedulerOutput(NamedTuple):
    scheduled: list[ScheduledSeq]
    num_prefill_tokens: int
    num_decode_seqs: int
    preempted: list[Sequence]

    @property
    def num_batched_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_seqs


class PullOrder(NamedTuple):
    """Copy a peer's blocks into local ones (decode side of disaggregation)."""

    request_id: str
    source: Any  # KvTransferParams of the prefill worker
    remote_blocks: list[int]  # on the peer
    local_blocks: list[int]  # here, same order; empty: the local cache had it all (release only)


class HeldKv(NamedTuple):
    """The prompt's full blocks a finished prefill holds for a pull."""

    block_ids: list[int]
    block_hashes: list[int]
    num_tokens: int
    hold_s: float


class SeqResult(NamedTuple):
    seq: Sequence
    token_id: int | None  # None: a prefill chunk that produced no token
    finish_reason: FinishReason | None
    num_output_tokens: int = 0  # outputs including this token (placeholders of later steps excluded)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: KVBlockManager, *,
                 clock: Callable[[], float] = time.monotonic, tiers: Any = None) -> None:
        """``tiers``: a kvbm.TieredCache under the block manager (host and disk KV tiers)."""
        self.config = config
        self.block_manager = block_manager
        self.clock = clock
        self.tiers = tiers
        if tiers is not None:
            block_manager.on_evict = tiers.on_evict
        self._onboarding: dict[str, Any] = {}  # request id -> kvbm.TierSource being read
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last is preempted first
        self.num_preemptions = 0
        self.pulling: dict[str, Sequence] = {}  # KV being copied in from a peer
        self.held: dict[str, tuple[Sequence, float]] = {}  # finished prefills -> hold deadline
        self.num_pull_failures = 0
        self.num_holds_expired = 0
        self._pulls: list[PullOrder] = []
        self._seqs: dict[str, Sequence] = {}
        self._eos = frozenset(config.eos_token_ids)
        self._chunk_cap = config.long_prefill_token_threshold or config.max_num_batched_tokens

    # -- queue ------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def num_prefill_tokens(self) -> int:
        """Tokens still to prefill: waiting requests' whole prompts (a prefix hit is only known at
        admission) and the rest of partly prefilled ones. O(queue): for load reports, not steps."""
        n = sum(len(s.token_ids) - s.num_computed_tokens for s in self.waiting)
        return n + sum(len(s.token_ids) - s.num_computed_tokens for s in self.running
                       if s.num_computed_tokens < s.num_prompt_tokens)

    def has_work(self) -> bool:
        """Something to schedule (pulls in progress and held blocks are not work for a step)."""
        return bool(self.running or self.waiting)

    def get(self, request_id: str) -> Sequence | None:
        return self._seqs.get(request_id)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; ValueError if it is malformed or could never fit."""
        cfg = self.config
        rid = seq.request_id
        if rid in self._seqs:
            raise ValueError(f"request id {rid!r} is already scheduled")
        if seq.status is not SequenceStatus.WAITING or seq.block_table or seq.num_output_tokens:
            raise ValueError(f"request {rid!r} is not a new sequence")
        stop = seq.stop
        if stop.max_tokens < 1:
            raise ValueError(f"request {rid!r}: max_tokens must be at least 1, got {stop.max_tokens}")
        if not 0 <= stop.min_tokens <= stop.max_tokens:
            raise ValueError(
                f"request {rid!r}: min_tokens must be in [0, max_tokens={stop.max_tokens}], "
                f"got {stop.min_tokens}"
            )
        n_prompt = seq.num_prompt_tokens
        final_len = n_prompt + stop.max_tokens
        if cfg.max_model_len is not None:
            if n_prompt >= cfg.max_model_len:
                raise ValueError(
                    f"request {rid!r}: prompt of {n_prompt} tokens leaves no room to generate "
                    f"within the context length of {cfg.max_model_len}"
                )
            final_len = min(final_len, cfg.max_model_len)
        bm = self.block_manager
        blocks = -(-(final_len - 1) // bm.block_size)  # the last sampled token needs no KV
        if blocks > bm.num_blocks:
            raise ValueError(
                f"request {rid!r}: {n_prompt} prompt + {stop.max_tokens} max tokens need "
                f"{blocks} KV blocks, more than the whole cache ({bm.num_blocks} blocks of "
                f"{bm.block_size} tokens)"
            )
        if not cfg.enable_chunked_prefill and n_prompt > cfg.max_num_batched_tokens:
            raise ValueError(
                f"request {rid!r}: prompt of {n_prompt} tokens exceeds max_num_batched_tokens="
                f"{cfg.max_num_batched_tokens} and chunked prefill is off"
            )
        if rid in self.held or rid in self.pulling:
            raise ValueError(f"request id {rid!r} still holds KV blocks of an earlier request")
        if seq.kv_source is not None:
            self._check_source(seq)
        elif self.tiers is not None:
            self.tiers.seen(seq.block_hashes(bm.block_size))
        self._seqs[rid] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> bool:
        """Drop a request in any state and free its blocks now (a PULLING one's at
        ``finish_pull``: the copy may still write them). False if it is unknown."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        status = seq.status
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "abort"
        if status is _PULLING:
            return True
        if status is _RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        return True

    # -- disaggregation ---------------------------------------------------------------------------
    def _check_source(self, seq: Sequence) -> None:
        """The peer's blocks must hold this sequence's prefix: their chained hashes must match
        (its last block may be partial: it has no hash, and is taken only when the peer's tokens
        are exactly this sequence's but its last, as for a prefill's prompt and first token)."""
        src = seq.kv_source
        bs = self.block_manager.block_size
        ids, hashes = src.block_ids, src.block_hashes
        if not (len(hashes) <= len(ids) and (len(ids) - 1) * bs < src.num_tokens <= len(ids) * bs
                and len(hashes) == src.num_tokens // bs):
            raise ValueError(f"request {seq.request_id!r}: malformed kv_transfer source (block ids, hashes and "
                             "token count disagree)")
        n = min(len(hashes), (seq.num_tokens - 1) // bs)
        if hashes[:n] != seq.block_hashes(bs)[:n]:
            raise ValueError(f"request {seq.request_id!r}: the kv_transfer source holds another prompt "
                             "(block hashes differ)")

    def take_pulls(self) -> list[PullOrder]:
        """Drain the copies admission ordered since the last call."""
        pulls, self._pulls = self._pulls, []
        return pulls

    def finish_pull(self, request_id: str, ok: bool) -> bool:
        """A copy ordered by ``take_pulls`` ended. ok: the blocks hold the peer's KV (they join the
        prefix cache and the sequence queues to compute its tail); failed: the blocks are freed
        and the sequence is prefilled here. False if the request is not pulling."""
        seq = self.pulling.pop(request_id, None)
        if seq is None:
            return False
        bm = self.block_manager
        source = self._onboarding.pop(request_id, None)
        if source is not None:
            self.tiers.unpin(source, ok)
        if seq.status is SequenceStatus.FINISHED:  # aborted during the copy
            bm.free(seq)
            return True
        seq.kv_source = None
        seq.status = _WAITING
        seq.pulled_time = self.clock()
        if ok:
            seq.num_computed_tokens = seq.num_pulled_tokens
            bm.register_full_blocks(seq)
        else:
            self.num_pull_failures += 1
            bm.free(seq)
            seq.num_computed_tokens = 0
            seq.num_pulled_blocks = seq.num_pulled_tokens = 0
        self.waiting.appendleft(seq)
        return True

    def held_kv(self, seq: Sequence) -> HeldKv:
        """What a HELD sequence offers: every block of its prompt, the last one maybe partial
        (hashes for the full ones), so a decode worker computes only the first token's KV."""
        bs = self.block_manager.block_size
        n_tok = seq.num_prompt_tokens
        n = min(-(-n_tok // bs), len(seq.block_table))
        full = min(n_tok // bs, n)
        return HeldKv(list(seq.block_table[:n]), list(seq.block_hashes(bs)[:full]), min(n_tok, n * bs),
                      seq.kv_hold_s or 0.0)

    def held_blocks(self, request_id: str) -> list[int] | None:
        entry = self.held.get(request_id)
        return None if entry is None else self.held_kv(entry[0]).block_ids

    def release(self, request_id: str) -> bool:
        """A decode worker has the KV of a held prefill: free its blocks (they stay cached)."""
        entry = self.held.pop(request_id, None)
        if entry is None:
            return False
        seq = entry[0]
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        return True

    def expire_held(self) -> list[str]:
        """Free the blocks of held prefills whose hold deadline passed; their ids."""
        if not self.held:
            return []
        now = self.clock()
        expired = [rid for rid, (_, deadline) in self.held.items() if deadline <= now]
        for rid in expired:
            self.release(rid)
        self.num_holds_expired += len(expired)
        return expired

    def next_hold_deadline(self) -> float | None:
        return min((d for _, d in self.held.values()), default=None)

    def _admit_onboard(self, seq: Sequence, cached: int, found: list[tuple[str, int]]) -> bool:
        """Admission with blocks below G1: reference G1's hit, allocate blocks for the rest, order
        the copies up from the host/disk tier. False: no room yet."""
        bm = self.block_manager
        bs = bm.block_size
        source = self.tiers.pin(found)  # before allocating: an eviction must not take them
        tokens = cached + len(found) * bs
        if not bm.allocate_slots(seq, tokens - cached, cached):
            self.tiers.unpin(source, False)
            return False
        self.tiers.admitted(source)
        self.waiting.popleft()
        seq.status = _PULLING
        if seq.scheduled_time is None:
            seq.scheduled_time = self.clock()
        seq.num_computed_tokens = cached
        if not seq.num_preemptions:
            seq.num_cached_tokens = tokens  # onboarded tokens are cached tokens too (usage)
        seq.num_pulled_blocks = len(found)
        seq.num_pulled_tokens = tokens
        rid = seq.request_id
        self.pulling[rid] = seq
        self._onboarding[rid] = source
        first = cached // bs
        self._pulls.append(PullOrder(rid, source, [slot for _, slot, _ in source.entries],
                                     list(seq.block_table[first:first + len(found)])))
        return True

    def _admit_pull(self, seq: Sequence) -> bool:
        """Admission of a sequence whose KV a peer holds: reference the local prefix hit, allocate
        blocks for the rest of the peer's blocks, order the copy. False: no room yet."""
        bm = self.block_manager
        bs = bm.block_size
        src = seq.kv_source
        cached = bm.match_prefix(seq)
        if src.num_tokens == seq.num_tokens - 1:  # prompt + first token: take the partial block too
            tokens = src.num_tokens
        else:  # some other continuation: whole blocks it shares with the source only
            tokens = min(len(src.block_hashes), (seq.num_tokens - 1) // bs) * bs
        first, limit = cached // bs, -(-tokens // bs)
        if tokens <= cached:  # the local cache holds it all: nothing to copy, only a release
            self._pulls.append(PullOrder(seq.request_id, src, [], []))
            seq.kv_source = None
            return False
        if not bm.allocate_slots(seq, tokens - cached, cached):
            return False
        self.waiting.popleft()
        seq.status = _PULLING
        seq.scheduled_time = self.clock()
        seq.num_computed_tokens = cached
        seq.num_cached_tokens = cached
        seq.num_pulled_blocks = limit - first
        seq.num_pulled_tokens = tokens
        self.pulling[seq.request_id] = seq
        self._pulls.append(PullOrder(seq.request_id, src, list(src.block_ids[first:limit]),
                                     list(seq.block_table[first:limit])))
        return True

    # -- one step -------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        bm = self.block_manager
        budget = cfg.max_num_batched_tokens
        cap = self._chunk_cap
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        n_prefill = 0
        n_decode = 0

        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = len(seq.token_ids) - seq.num_computed_tokens
            if n > 1:  # an unfinished prefill (chunked, or a resumed over-long sequence)
                n = min(n, cap, budget)
            elif seq.token_ids[-1] == PLACEHOLDER and self._reaches_limit(seq, len(seq.token_ids)):
                i += 1  # its in-flight token is its last: nothing more to compute
                continue
            while not bm.allocate_slots(seq, n):
                victim = running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                entry = self._entry(seq, n)
                scheduled.append(entry)
                if entry.is_prefill:
                    n_prefill += n
                else:
                    n_decode += 1
                budget -= n
                i += 1

        waiting = self.waiting
        while not preempted and waiting and budget > 0 and len(running) + len(self.pulling) < cfg.max_num_seqs:
            seq = waiting[0]
            if seq.kv_source is not None:
                if self._admit_pull(seq):
                    continue
                if seq.kv_source is not None:  # no room for its blocks yet
                    break
            resumed = bool(seq.block_table)  # its KV came from a peer: compute the tail only
            cached = 0 if resumed else bm.match_prefix(seq)
            if self.tiers is not None and not resumed:
                found = self.tiers.match(seq.block_hashes(bm.block_size), cached // bm.block_size,
                                         (seq.num_tokens - 1) // bm.block_size)
                if found:
                    if self._admit_onboard(seq, cached, found):
                        continue
                    break
            n = seq.num_tokens - cached - seq.num_computed_tokens
            if cfg.enable_chunked_prefill:
                n = min(n, cap, budget)
            elif n > budget:
                # Without chunked prefill a prefill runs whole; a resumed sequence longer than
                # any step's budget is the exception (it could never run otherwise).
                if n <= cfg.max_num_batched_tokens:
                    break
                n = budget
            if not bm.allocate_slots(seq, n, cached):
                break
            waiting.popleft()
            seq.status = _RUNNING
            if seq.scheduled_time is None:
                seq.scheduled_time = self.clock()
            if not resumed:
                seq.num_computed_tokens = cached
                if not seq.num_preemptions:  # first admission; a preempted one recomputes
                    seq.num_cached_tokens = cached
            running.append(seq)
            entry = self._entry(seq, n)
            scheduled.append(entry)
            if entry.is_prefill:
                n_prefill += n
            else:
                n_decode += 1
            budget -= n
        return SchedulerOutput(scheduled, n_prefill, n_decode, preempted)

    def postprocess(self, output: SchedulerOutput, sampled: Mapping[str, int]) -> list[SeqResult]:
        """Apply a step's results; ``sampled`` maps request id -> token for ``produces_token``."""
        return self.complete(output, self.advance(output), sampled)

    def advance(self, output: SchedulerOutput) -> list[int]:
        """Count a launched step's tokens as computed; append a PLACEHOLDER for each token it
        samples. Returns each entry's placeholder index in ``token_ids`` (-1: none)."""
        slots: list[int] = []
        for entry in output.scheduled:
            seq = entry.seq
            if seq.status is not _RUNNING:  # aborted between scheduling and launch
                slots.append(-1)
                continue
            seq.num_computed_tokens += entry.num_new_tokens
            if entry.produces_token:
                slots.append(len(seq.token_ids))
                seq.token_ids.append(PLACEHOLDER)
            else:
                slots.append(-1)
        return slots

    def complete(self, output: SchedulerOutput, slots: list[int], sampled: Mapping[str, int]) -> list[SeqResult]:
        """Fill an advanced step's placeholders with ``sampled`` tokens, register the blocks it
        filled, apply stop conditions and free finished sequences.

        A sequence preempted after this step launched still takes its token (it recomputes
        with it); one aborted or already finished is skipped.
        """
        bm = self.block_manager
        bs = bm.block_size
        results: list[SeqResult] = []
        any_finished = False
        for entry, idx in zip(output.scheduled, slots, strict=True):
            seq = entry.seq
            status = seq.status
            if status is SequenceStatus.FINISHED or status is _HELD:  # aborted, or stopped by an earlier step's token
                continue
            if idx < 0:
                if status is _RUNNING and seq.num_computed_tokens // bs > seq.num_registered_blocks:
                    bm.register_full_blocks(seq)
                results.append(SeqResult(seq, None, None, len(seq.token_ids) - seq.num_prompt_tokens))
                continue
            try:
                token = sampled[seq.request_id]
            except KeyError:
                raise ValueError(f"no sampled token for request {seq.request_id!r}") from None
            seq.token_ids[idx] = token
            if status is _RUNNING and seq.num_computed_tokens // bs > seq.num_registered_blocks:
                bm.register_full_blocks(seq)
            reason = self._check_stop(seq, token, idx + 1)
            if reason is not None:
                del seq.token_ids[idx + 1:]  # placeholders of steps launched after this one
                seq.finish_reason = reason
                if seq.kv_hold_s is not None and status is _RUNNING:  # a prefill: keep its KV for the pull
                    seq.status = _HELD
                    self.held[seq.request_id] = (seq, self.clock() + seq.kv_hold_s)
                else:
                    seq.status = SequenceStatus.FINISHED
                    bm.free(seq)
                del self._seqs[seq.request_id]
                if status is _WAITING:
                    self.waiting.remove(seq)
                any_finished = True
            results.append(SeqResult(seq, token, reason, idx + 1 - seq.num_prompt_tokens))
        if any_finished:
            self.running = [s for s in self.running if s.status is _RUNNING]
        return results

    # -- runs of plain decode steps (a simulator's fast path) ----------------------------------
    def plain_decode_steps(self) -> int:
        """How many of the next steps are *plain decodes*: ``schedule()`` would give every running
        sequence, in order, a one-token decode that needs no new block, and ``complete()`` would
        register no block and end no sequence, whatever tokens are sampled. Such a step's only
        effect is one token appended to each running sequence (nothing queued, no KV event, no
        block moves), so ``run_plain_decodes`` may apply several at once. 0 if the next step may
        do anything else (waiting or held sequences, a prefill chunk, a placeholder in flight, a
        stop token that could be drawn)."""
        running = self.running
        if self.waiting or self.held or not running or len(running) > self.config.max_num_batched_tokens:
            return 0
        bs = self.block_manager.block_size
        max_len = self.config.max_model_len
        eos = self._eos
        steps = 1 << 62
        for seq in running:
            tokens = seq.token_ids
            n = len(tokens)
            stop = seq.stop
            if (n - seq.num_computed_tokens != 1 or n <= seq.num_prompt_tokens or tokens[-1] == PLACEHOLDER
                    or stop.stop_token_ids or (eos and not stop.ignore_eos)):
                return 0
            # a step at length n: allocates iff n > blocks * bs; registers iff n reaches the block
            # after the registered ones; ends the sequence iff n + 1 tokens reach a length limit
            last = min(len(seq.block_table) * bs + 1, (seq.num_registered_blocks + 1) * bs,
                       seq.num_prompt_tokens + stop.max_tokens - 1)
            if max_len is not None and max_len - 1 < last:
                last = max_len - 1
            if last - n < steps:
                steps = last - n
                if steps <= 0:
                    return 0
        return steps

    def decode_step_fits(self) -> bool:
        """Whether the next step is a one-token decode of every running sequence, in order, that
        admits nobody (nothing waits or is held), preempts nobody (the blocks it needs are free or
        evictable) and ends no sequence whatever it samples (no stop token can end it, no length
        limit is reached); unlike a plain one it may allocate and register blocks."""
        running = self.running
        if self.waiting or self.held or not running or len(running) > self.config.max_num_batched_tokens:
            return False
        bs = self.block_manager.block_size
        max_len = self.config.max_model_len
        eos = self._eos
        need = 0
        for seq in running:
            tokens = seq.token_ids
            n = len(tokens)
            stop = seq.stop
            if (n - seq.num_computed_tokens != 1 or n <= seq.num_prompt_tokens or tokens[-1] == PLACEHOLDER
                    or stop.stop_token_ids or (eos and not stop.ignore_eos)):
                return False
            if n + 1 - seq.num_prompt_tokens >= stop.max_tokens or (max_len is not None and n + 1 >= max_len):
                return False  # the token it samples ends it (_reaches_limit)
            if n > len(seq.block_table) * bs:
                need += 1
        return need <= self.block_manager.num_free_blocks

    def run_plain_decodes(self, tokens: list[list[int]]) -> None:
        """Apply ``len(tokens[0])`` plain decode steps (at most ``plain_decode_steps()``) at once:
        ``tokens[i]`` are the tokens ``running[i]`` samples, one a step. The state is exactly
        that of as many ``schedule``/``postprocess`` rounds."""
        k = len(tokens[0])
        for seq, toks in zip(self.running, tokens, strict=True):
            seq.extend_tokens(toks)
            seq.num_computed_tokens += k

    # -- internals ----------------------------------------------------------------------------
    @staticmethod
    def _entry(seq: Sequence, n: int) -> ScheduledSeq:
        num_tokens = len(seq.token_ids)
        produces = seq.num_computed_tokens + n == num_tokens
        # a sequence whose prompt KV was pulled computes only its first token: a decode, as it
        # would be had it been prefilled here (the runner batches it with the decodes)
        is_decode = n == 1 and produces and (num_tokens > seq.num_prompt_tokens or seq.num_pulled_tokens > 0)
        return ScheduledSeq(seq, n, not is_decode, produces)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _reaches_limit(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether ``num_tokens`` tokens end the sequence by length, whatever the last one is."""
        max_len = self.config.max_model_len
        return (num_tokens - seq.num_prompt_tokens >= seq.stop.max_tokens
                or (max_len is not None and num_tokens >= max_len))

    def _check_stop(self, seq: Sequence, token: int, num_tokens: int) -> FinishReason | None:
        """``token`` is the sequence's ``num_tokens``-th. A stop token wins over the length cap
        when both apply to the same token."""
        stop = seq.stop
        n_out = num_tokens - seq.num_prompt_tokens
        if n_out >= stop.min_tokens and (
            (token in self._eos and not stop.ignore_eos) or token in stop.stop_token_ids
        ):
            return "stop"
        if self._reaches_limit(seq, num_tokens):
            return "length"
        return None
