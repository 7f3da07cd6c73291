"""TCP backend: blocks travel over the request plane (no dependency beyond Turbine's own).

The holder serves ``kv_read``: a KvRead names a held transfer and blocks of it; the answer is the
blocks' bytes in frames of about ``CHUNK_BYTES`` (whole blocks; layout order of KvMemory.gather).
The request plane brings the cluster token, deadlines and liveness with it. Copies to and from a
GPU run in a thread, off the event loop.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import msgspec

from turbine.protocols.kv_transfer import AgentInfo, KvRead, KvTransferParams
from turbine.runtime.request_plane import RequestContext, RequestPlaneClient, RequestPlaneError
from turbine.transfer.base import HeldBlocks, TransferError, check_held, check_pull
from turbine.transfer.kv_memory import KvMemory

CHUNK_BYTES = 4 << 20
_encode = msgspec.msgpack.Encoder().encode
_decode_read = msgspec.msgpack.Decoder(KvRead).decode


class TcpTransfer:
    name = "tcp"

    def __init__(self, memory: KvMemory, client: RequestPlaneClient, *, timeout_s: float = 30.0) -> None:
        self.memory = memory
        self.client = client
        self.timeout_s = timeout_s
        self.block_bytes = memory.layout.block_bytes
        self.chunk_blocks = max(1, CHUNK_BYTES // self.block_bytes)
        self._on_gpu = memory.data.device.type != "cpu"

    def agent_info(self) -> AgentInfo:
        return AgentInfo(backend=self.name, layout=self.memory.layout)

    async def pull(self, source: KvTransferParams, remote_blocks: Sequence[int],
                   local_blocks: Sequence[int]) -> None:
        check_pull(source, remote_blocks, local_blocks)
        req = _encode(KvRead(transfer_id=source.transfer_id, block_ids=list(remote_blocks)))
        pos = 0
        try:
            async for frame in self.client.stream(source.worker_address, "kv_read", req, timeout=self.timeout_s):
                k, rem = divmod(len(frame), self.block_bytes)
                if rem or k == 0 or pos + k > len(local_blocks):
                    raise TransferError(f"peer sent {len(frame)} bytes, not whole blocks of the {len(local_blocks)} asked")
                ids = local_blocks[pos:pos + k]
                if self._on_gpu:
                    await asyncio.to_thread(self.memory.from_bytes, ids, frame)
                else:
                    self.memory.from_bytes(ids, frame)
                pos += k
        except RequestPlaneError as e:
            raise TransferError(f"reading from {source.worker_address}: {e}") from None
        if pos != len(local_blocks):
            raise TransferError(f"peer sent {pos} of {len(local_blocks)} blocks")

    def serve(self, server: object, held_blocks: HeldBlocks) -> None:
        async def kv_read(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
            req = _decode_read(payload)
            check_held(req.transfer_id, req.block_ids, held_blocks)
            ids = req.block_ids
            for i in range(0, len(ids), self.chunk_blocks):
                chunk = ids[i:i + self.chunk_blocks]
                if held_blocks(req.transfer_id) is None:  # released meanwhile: the blocks may be reused
                    raise TransferError(f"transfer {req.transfer_id!r} was released during the read")
                if self._on_gpu:
                    yield await asyncio.to_thread(self.memory.to_bytes, chunk)
                else:
                    yield self.memory.to_bytes(chunk)

        server.register("kv_read", kv_read)  # type: ignore[attr-defined]

    async def close(self) -> None:
        return None
