"""The mocker's backend: no bytes move; a pull takes the time the link would, and fails like a
real one when the peer no longer holds the transfer (it asks the peer, as a real pull reads it)."""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import msgspec

from turbine.protocols.kv_transfer import AgentInfo, KvRead, KvTransferParams
from turbine.runtime.request_plane import RequestPlaneClient, RequestPlaneError
from turbine.transfer.base import HeldBlocks, TransferError, check_held, check_pull

_encode = msgspec.msgpack.Encoder().encode
_decode_read = msgspec.msgpack.Decoder(KvRead).decode


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
        req = _encode(KvRead(transfer_id=source.transfer_id, block_ids=list(remote_blocks)))
        try:
            async for _ in self.client.stream(source.worker_address, "kv_check", req, timeout=10.0):
                pass
        except RequestPlaneError as e:
            raise TransferError(f"peer {source.worker_address}: {e}") from None
        await asyncio.sleep(self.seconds(len(remote_blocks)))

    def serve(self, server: object, held_blocks: HeldBlocks) -> None:
        async def kv_check(payload: bytes, ctx: object):  # type: ignore[no-untyped-def]
            req = _decode_read(payload)
            check_held(req.transfer_id, req.block_ids, held_blocks)
            yield b""

        server.register("kv_check", kv_check)  # type: ignore[attr-defined]

    async def close(self) -> None:
        return None
