"""In-process backend: the peer's KV tensor is in this process (tests, one-process fleets)."""
from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence

from turbine.protocols.kv_transfer import AgentInfo, KvTransferParams
from turbine.transfer.base import HeldBlocks, TransferError, check_held, check_pull
from turbine.transfer.block_copy import copy_blocks
from turbine.transfer.kv_memory import KvMemory

_agents: weakref.WeakValueDictionary[str, InProcTransfer] = weakref.WeakValueDictionary()
_names = itertools.count(1)


class InProcTransfer:
    name = "inproc"

    def __init__(self, memory: KvMemory) -> None:
        self.memory = memory
        self.agent_name = f"kv-{next(_names)}"
        self._held: HeldBlocks = lambda tid: None
        _agents[self.agent_name] = self

    def agent_info(self) -> AgentInfo:
        return AgentInfo(backend=self.name, layout=self.memory.layout, metadata=self.agent_name.encode())

    async def pull(self, source: KvTransferParams, remote_blocks: Sequence[int],
                   local_blocks: Sequence[int]) -> None:
        check_pull(source, remote_blocks, local_blocks)
        peer = _agents.get(source.agent.metadata.decode(errors="replace"))
        if peer is None:
            raise TransferError(f"no in-process KV agent {source.agent.metadata!r}")
        check_held(source.transfer_id, remote_blocks, peer._held)
        copy_blocks(self.memory.data, local_blocks, peer.memory.data, remote_blocks)

    def serve(self, server: object, held_blocks: HeldBlocks) -> None:
        self._held = held_blocks

    async def close(self) -> None:
        _agents.pop(self.agent_name, None)
