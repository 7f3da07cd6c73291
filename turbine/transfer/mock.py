"""The mocker's backend: no bytes move; a pull takes the time the link would, and fails like a
real one when the peer no longer holds the transfer (it asks the peer, as a real pull reads it)."""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from turbine.protocols.kv_transfer import AgentInfo, KvTransferParams
from turbine.runtime.request_plane import RequestPlaneClient
from turbine.transfer.base import HeldBlocks, ask_held, check_pull, serve_kv_check


class MockTransfer:
    name = "mock"

    def __init__(self, client: RequestPlaneClient, seconds: Callable[[int], float]) -> None:
        self.client = client
        self.seconds = seconds  # blocks -> modelled copy time

    def agent_info(self) -> AgentInfo:
        return AgentInfo(backend=self.name)

    async def pull(self, source: KvTransferParams, remote_blocks: Sequence[int],
                   local_blocks: Sequence[int]) -> None:
        check_pull(source, remote_blocks, local_blocks)
        await ask_held(self.client, source, remote_blocks)
        await asyncio.sleep(self.seconds(len(remote_blocks)))
        await ask_held(self.client, source, remote_blocks)  # a peer that died mid-copy fails it, as for real

    def serve(self, server: object, held_blocks: HeldBlocks) -> None:
        serve_kv_check(server, held_blocks)

    async def close(self) -> None:
        return None
