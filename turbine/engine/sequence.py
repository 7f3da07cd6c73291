"""`Sequence`: the only per-request state the scheduler and the KV block manager share.

    token_ids:  [ prompt ........................ | output ....... ]
                 ^0                 num_prompt_tokens             ^num_tokens
    KV written: [ 0 .. num_computed_tokens )       (the last sampled token has no KV yet)
    blocks:     block_table[i] holds tokens [i*B, (i+1)*B)
    hashes:     one chained SequenceHash per *full* block of token_ids, computed incrementally
    PLACEHOLDER tokens (async scheduling: sampled on the device, not read yet) sit only at the
    tail of token_ids; blocks holding one are not hashed until it is filled in

``token_ids`` is a u32 ``array("I")`` (4 bytes a token, no int objects; the block hashes read
its bytes in place), or, for ids that are no u32, a list (the engines refuse those anyway:
they lie outside any vocabulary). Either way it supports what the engines use: ``len``,
indexing, slicing, ``append``, ``extend``, ``del`` of a tail.

A preempted sequence keeps ``token_ids`` (prompt and output so far) and its hashes; only its
blocks and ``num_computed_tokens`` are dropped, so recomputation re-derives the same state.
"""
from __future__ import annotations

import enum
import time
from array import array
from typing import Any

from turbine.protocols.generate import FinishReason, SamplingOptions, StopConditions
from turbine.protocols.block_hashing import LocalBlockHash, SequenceHash, chain_hashes_u32, lora_seed


# An output token the device has sampled (or will) but the host has not read yet: the largest u32,
# never a token id (ids lie below the vocabulary size).
PLACEHOLDER = 0xFFFFFFFF


def _u32_or_list(tokens: Any) -> Any:
    """A u32 array of ``tokens`` (a copy), or a list of them if one is not an int in [0, 2**32)."""
    if type(tokens) is array and tokens.typecode == "I":
        return array("I", tokens)  # one memcpy
    out = array("I")
    try:
        if type(tokens) is list:
            out.fromlist(tokens)
        else:
            out.extend(tokens)
    except (OverflowError, TypeError):
        return list(tokens)
    return out


def _as_list(tokens: Any) -> list[int]:
    return tokens.tolist() if type(tokens) is array else tokens


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued (new or preempted); holds no KV blocks, unless its KV came from a peer
    PULLING = "pulling"  # admitted; blocks allocated, a peer's KV being copied into them (disaggregation)
    RUNNING = "running"  # admitted; block_table covers num_computed_tokens (+ this step's tokens)
    HELD = "held"  # a finished prefill whose blocks wait for a decode worker's pull
    FINISHED = "finished"  # done (stop, length or abort); blocks freed


class Sequence:
    __slots__ = (
        "request_id",
        "token_ids",
        "num_prompt_tokens",
        "sampling",
        "stop",
        "lora_name",
        "arrival_time",
        "scheduled_time",
        "pulled_time",
        "status",
        "finish_reason",
        "num_computed_tokens",
        "num_cached_tokens",
        "num_preemptions",
        "block_table",
        "num_registered_blocks",
        "kv_hold_s",
        "kv_source",
        "num_pulled_blocks",
        "num_pulled_tokens",
        "_hash_block_size",
        "_hash_seed",
        "_block_hashes",
        "_local_hashes",
        "_locals_start",
        "_u32",
    )

    token_ids: Any  # array("I"), or a list when an id is no u32 (see the module docstring)

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Any,
        *,
        stop: StopConditions,
        sampling: SamplingOptions | None = None,
        lora_name: str | None = None,
        arrival_time: float | None = None,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r}: the prompt must hold at least one token")
        self.request_id = request_id
        self.token_ids = _u32_or_list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.sampling = sampling if sampling is not None else SamplingOptions()
        self.stop = stop
        self.lora_name = lora_name
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        # on the scheduler's clock: first admitted (left the queue), and a pull's KV landed (tracing)
        self.scheduled_time: float | None = None
        self.pulled_time: float | None = None
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_computed_tokens = 0  # tokens whose KV is in block_table
        self.num_cached_tokens = 0  # prefix-cache hit at first admission (usage.cached_tokens)
        self.num_preemptions = 0
        self.block_table: list[int] = []
        # Leading blocks of block_table already offered to the prefix cache (owned by the
        # block manager: matched at admission, or registered once their tokens were computed).
        self.num_registered_blocks = 0
        # Disaggregation: hold the KV after finishing (prefill side), or pull it from a peer first
        # (decode side: the prefill worker's KvTransferParams). See Scheduler.
        self.kv_hold_s: float | None = None
        self.kv_source: Any = None
        self.num_pulled_blocks = 0
        self.num_pulled_tokens = 0  # computed once the pull lands (cached prefix included)
        self._hash_block_size = 0
        self._hash_seed = lora_seed(lora_name)
        self._block_hashes: list[SequenceHash] = []
        # the local hashes of blocks _locals_start.. (blocks hashed here; adopted ones have none)
        self._local_hashes: list[LocalBlockHash] = []
        self._locals_start = 0
        # token_ids[:len(_u32)] as u32: the hashes' input, cached blocks' contents (token_ids itself
        # when it is an array)
        self._u32 = self.token_ids if type(self.token_ids) is array else array("I")

    @classmethod
    def from_request(cls, request: Any, arrival_time: float | None = None) -> Sequence:
        """A new sequence for a GenerateRequest, with its disaggregation role if it has one."""
        seq = cls(request.request_id, request.token_ids, stop=request.stop, sampling=request.sampling,
                  lora_name=request.lora_name, arrival_time=arrival_time)
        kv = request.kv_transfer
        if kv is not None:
            if kv.hold_s is not None and kv.source is not None:
                raise ValueError(f"request {request.request_id!r}: kv_transfer holds and pulls at once")
            seq.kv_hold_s = kv.hold_s
            seq.kv_source = kv.source
        return seq

    # -- tokens ---------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return _as_list(self.token_ids[: self.num_prompt_tokens])

    @property
    def output_token_ids(self) -> list[int]:
        return _as_list(self.token_ids[self.num_prompt_tokens :])

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    # -- block hashes ---------------------------------------------------------------------
    def prompt_u32(self, packed: array | None = None) -> array:
        """The prompt's ids as a u32 array (at least them: ``token_ids`` itself when it is one),
        packed once and kept (hashing reads it). ``packed``: the caller's u32 copy of exactly these
        ids, copied instead of packing them again. Raises OverflowError or TypeError for an id
        that is not an int in [0, 2**32). Read-only."""
        n = self.num_prompt_tokens
        if len(self._u32) < n:
            if packed is not None and not self._u32 and len(packed) == n and packed.typecode == "I":
                self._u32 = array("I", packed)
            else:
                self._pack_to(n)
        return self._u32

    def _pack_to(self, n: int) -> None:
        """Extend the u32 copy to the first ``n`` token ids (a list's; an array is its own copy)."""
        packed = self._u32
        if packed is self.token_ids:
            return
        tokens = self.token_ids[len(packed) : n]
        try:
            packed.fromlist(tokens)
        except TypeError:  # not a list (a subclass), or ids of another type
            packed.extend(array("I", tokens))

    def block_hashes(self, block_size: int) -> list[SequenceHash]:
        """Chained hashes of every full block of ``token_ids``; only new blocks are hashed (their
        tokens packed to u32 once, kept: ``block_tokens_u32``).

        The returned list is the sequence's cache: callers must not mutate it.
        """
        if block_size != self._hash_block_size:
            if self._hash_block_size:
                raise ValueError(
                    f"sequence {self.request_id!r} was hashed with block size "
                    f"{self._hash_block_size}, not {block_size}"
                )
            self._hash_block_size = block_size
        hashes = self._block_hashes
        tokens = self.token_ids
        n = len(tokens)
        while n and tokens[n - 1] == PLACEHOLDER:
            n -= 1
        n_full = n // block_size
        done = len(hashes)
        if done < n_full:
            if len(self._u32) < n_full * block_size:
                self._pack_to(n_full * block_size)
            with memoryview(self._u32) as view, view.cast("B") as raw:
                hashes += chain_hashes_u32(raw[done * block_size * 4 : n_full * block_size * 4], block_size,
                                           self._hash_seed, hashes[-1] if hashes else None, self._local_hashes)
        return hashes

    def local_hashes(self, start: int, end: int) -> list[LocalBlockHash] | None:
        """The local hashes of full blocks ``start:end`` (already hashed by ``block_hashes``), for
        KV events; None when some were adopted rather than hashed here."""
        if start < self._locals_start:
            return None
        return self._local_hashes[start - self._locals_start : end - self._locals_start]

    def adopt_block_hashes(self, block_size: int, hashes: list[SequenceHash],
                           local_hashes: list[LocalBlockHash] | None = None) -> None:
        """Take the sequence hashes of the prompt's first full blocks from a caller that has them,
        computed from these very tokens for ``block_size`` and this sequence's LoRA seed (the
        values ``block_hashes`` would give; the caller vouches): spares hashing the prompt again.
        ``local_hashes``: their local hashes too, if the caller has them (KV events carry them).
        Only before the sequence was hashed."""
        if self._block_hashes or (self._hash_block_size and self._hash_block_size != block_size):
            raise ValueError(f"sequence {self.request_id!r} is already hashed")
        n = min(len(hashes), self.num_prompt_tokens // block_size)
        if local_hashes is not None and len(local_hashes) < n:
            raise ValueError(f"sequence {self.request_id!r}: {len(local_hashes)} local hashes for {n} blocks")
        self._hash_block_size = block_size
        self._block_hashes = list(hashes[:n])
        if local_hashes is None:
            self._locals_start = n
        else:
            self._local_hashes = list(local_hashes[:n])
        self._pack_to(n * block_size)  # a list's u32 copy covers every hashed block

    def hashed_tokens_u32(self) -> array:
        """The ids of (at least) every hashed block as u32, ``token_ids``' order; read-only.
        Block ``i`` is ``[i * block_size, (i + 1) * block_size)``."""
        return self._u32

    def extend_tokens(self, tokens: list[int]) -> None:
        """Append several tokens (ints of the vocabulary) at once."""
        ids = self.token_ids
        if type(ids) is array:
            ids.fromlist(tokens)
        else:
            ids += tokens

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )
