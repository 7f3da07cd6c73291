"""The transfer library's one interface: a backend moves blocks of a peer's KV memory into ours.

    backend.agent_info()                       what a peer needs to reach our memory (travels in
                                               KvTransferParams.agent)
    await backend.pull(source, remote, local)  copy the peer's blocks ``remote`` into our blocks
                                               ``local`` (same order); returns when the bytes are in
                                               place, raises TransferError otherwise
    backend.serve(server, held_blocks)         endpoints a backend answers on the request plane
                                               (the TCP backend's kv_read); most need none
    await backend.close()

Backends: ``mock`` (the mocker: no bytes, a timed copy), ``inproc`` (one process), ``tcp`` (the
request plane, no extra dependency), ``nixl`` (NIXL/UCX: host or GPU memory across processes and
machines), ``cuda_ipc`` (GPUs of one node). Block layout: ``turbine/engine/kv_cache.py``; both
sides must share it (``KvLayout.mismatch``): blocks of another size are refused, not converted.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from turbine.protocols.kv_transfer import AgentInfo, KvTransferParams

# held_blocks(transfer_id) -> the block ids a held prefill offers (None: no such transfer)
HeldBlocks = Callable[[str], "list[int] | None"]


class TransferError(RuntimeError):
    """A pull failed: the peer is gone, its transfer expired, or the parameters are bad."""


class TransferBackend(Protocol):
    name: str

    def agent_info(self) -> AgentInfo: ...

    async def pull(self, source: KvTransferParams, remote_blocks: Sequence[int],
                   local_blocks: Sequence[int]) -> None: ...

    def serve(self, server: object, held_blocks: HeldBlocks) -> None: ...

    async def close(self) -> None: ...


def check_pull(source: KvTransferParams, remote_blocks: Sequence[int], local_blocks: Sequence[int]) -> None:
    """The remote blocks must be ones the source offered; one local block per remote block."""
    if len(remote_blocks) != len(local_blocks):
        raise TransferError(f"{len(remote_blocks)} remote blocks for {len(local_blocks)} local ones")
    offered = set(source.block_ids)
    if not offered.issuperset(remote_blocks):
        raise TransferError(f"transfer {source.transfer_id!r}: blocks outside what the peer offered")


def check_held(transfer_id: str, block_ids: Sequence[int], held_blocks: HeldBlocks) -> None:
    """Serving side: a read names a held transfer and only its blocks (stale or forged: refused)."""
    held = held_blocks(transfer_id)
    if held is None:
        raise TransferError(f"no held KV for transfer {transfer_id!r} (released, expired or unknown)")
    if not set(held).issuperset(block_ids):
        raise TransferError(f"transfer {transfer_id!r}: blocks outside the ones it holds")


def serve_kv_check(server: object, held_blocks: HeldBlocks) -> None:
    """Register ``kv_check``: backends that read a peer's memory directly (NIXL, CUDA IPC, the
    mock) ask the holder before and after a copy whether the transfer is still held, so a stale
    or expired transfer, whose blocks may hold another prompt by now, is never taken for KV."""
    import msgspec

    from turbine.protocols.kv_transfer import KvRead

    decode = msgspec.msgpack.Decoder(KvRead).decode

    async def kv_check(payload: bytes, ctx: object):  # type: ignore[no-untyped-def]
        req = decode(payload)
        check_held(req.transfer_id, req.block_ids, held_blocks)
        yield b"1"

    server.register("kv_check", kv_check)  # type: ignore[attr-defined]


async def ask_held(client: object, source: KvTransferParams, remote_blocks: Sequence[int]) -> None:
    """Raise TransferError unless the source still holds these blocks (see serve_kv_check)."""
    import msgspec

    from turbine.protocols.kv_transfer import KvRead
    from turbine.runtime.request_plane import RequestPlaneError

    req = msgspec.msgpack.encode(KvRead(transfer_id=source.transfer_id, block_ids=list(remote_blocks)))
    try:
        async for _ in client.stream(source.worker_address, "kv_check", req, timeout=10.0):  # type: ignore[attr-defined]
            pass
    except RequestPlaneError as e:
        raise TransferError(f"peer {source.worker_address}: {e}") from None


async def send_release(client: object, params: KvTransferParams, timeout_s: float = 5.0) -> bool:
    """Tell a holder its transfer is done with (best effort: its deadline frees it anyway)."""
    import asyncio

    import msgspec

    from turbine.protocols.kv_transfer import KvRelease

    payload = msgspec.msgpack.encode(KvRelease(transfer_id=params.transfer_id))
    try:
        async with asyncio.timeout(timeout_s):
            async for _ in client.stream(params.worker_address, "kv_release", payload,  # type: ignore[attr-defined]
                                         timeout=timeout_s):
                pass
        return True
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001
        return False
