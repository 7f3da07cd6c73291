"""NIXL backend: the decoder READs the peer's blocks straight from its registered KV memory.

Each worker registers its whole KV tensor with one NIXL agent (UCX underneath: host DRAM or GPU
memory, within a machine or across machines). ``agent_info`` carries the agent's metadata and
where the tensor lies; the puller adds the peer agent once, prepares both sides' descriptor
lists once (one descriptor per block, layer and K/V: ``2 * layers * blocks``), and each pull is
one prepared READ of ``2 * layers * n`` descriptors, polled to completion off the step path.

NIXL reads memory without asking its owner, so the holder is asked (``kv_check``) after the
read: held then means held throughout (only our release or its deadline frees it); released or
expired (its blocks may hold another prompt by then) fails the pull, and the decode worker
prefills instead.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import socket
import threading
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np
import torch

from turbine.protocols.kv_transfer import AgentInfo, KvTransferParams
from turbine.runtime.request_plane import RequestPlaneClient
from turbine.transfer.base import HeldBlocks, TransferError, ask_held, check_pull, serve_kv_check
from turbine.transfer.kv_memory import KvMemory

_ids = itertools.count(1)
POLL_MAX_S = 0.005


class _Envelope(msgspec.Struct, frozen=True):
    """What a peer needs besides the agent metadata: where the KV tensor lies."""

    agent: str
    metadata: bytes
    base_addr: int
    num_blocks: int
    device_id: int
    mem_type: str  # "DRAM" | "VRAM"


class NixlTransfer:
    name = "nixl"

    def __init__(self, memory: KvMemory, client: RequestPlaneClient | None = None) -> None:
        try:
            from nixl._api import nixl_agent, nixl_agent_config
        except ImportError as e:
            raise ValueError(f"the nixl backend needs the nixl package (pip install nixl, after torch): {e}") from None
        self.memory = memory
        self.client = client
        data = memory.data
        if not data.is_contiguous():
            raise ValueError("the KV tensor must be contiguous to register it with NIXL")
        self.agent_name = f"turbine-{socket.gethostname()}-{os.getpid()}-{next(_ids)}"
        self.agent = nixl_agent(self.agent_name, nixl_agent_config(backends=["UCX"]))
        self._reg = self.agent.register_memory(data)
        self.mem_type = "VRAM" if data.is_cuda else "DRAM"
        self.device_id = data.get_device() if data.is_cuda else 0
        self.seg = memory.layout.segment_bytes
        self.layers = memory.layout.num_layers
        self._local = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", self._descs(data.data_ptr(), memory.num_blocks,
                                                                              self.device_id), self.mem_type)
        self._peers: dict[bytes, tuple[str, Any, int]] = {}  # envelope -> (agent, prepared remote side, blocks)
        self._lock = threading.Lock()  # the agent is used from the loop and from polling threads
        self._info = AgentInfo(backend=self.name, layout=memory.layout, metadata=msgspec.msgpack.encode(_Envelope(
            self.agent_name, self.agent.get_agent_metadata(), data.data_ptr(), memory.num_blocks, self.device_id,
            self.mem_type)))

    def _descs(self, base: int, num_blocks: int, device_id: int) -> np.ndarray:
        """One (address, bytes, device) row per (layer, K/V, block): index (l*2+kv)*num_blocks + b."""
        rows = np.empty((2 * self.layers * num_blocks, 3), dtype=np.uint64)
        rows[:, 0] = base + np.arange(2 * self.layers * num_blocks, dtype=np.uint64) * np.uint64(self.seg)
        rows[:, 1] = self.seg
        rows[:, 2] = device_id
        return rows

    def _indices(self, blocks: Sequence[int], num_blocks: int) -> np.ndarray:
        b = np.asarray(blocks, dtype=np.int64)
        planes = np.arange(2 * self.layers, dtype=np.int64)[:, None] * num_blocks
        return (planes + b[None, :]).reshape(-1).astype(np.int32)

    def agent_info(self) -> AgentInfo:
        return self._info

    def _peer(self, metadata: bytes) -> tuple[str, Any, int]:
        peer = self._peers.get(metadata)
        if peer is None:
            env = msgspec.msgpack.decode(metadata, type=_Envelope)
            with self._lock:
                name = self.agent.add_remote_agent(env.metadata)
                if isinstance(name, bytes):
                    name = name.decode()
                remote = self.agent.prep_xfer_dlist(name, self._descs(env.base_addr, env.num_blocks, env.device_id),
                                                    env.mem_type)
            peer = self._peers[metadata] = (name, remote, env.num_blocks)
        return peer

    async def pull(self, source: KvTransferParams, remote_blocks: Sequence[int],
                   local_blocks: Sequence[int]) -> None:
        check_pull(source, remote_blocks, local_blocks)
        try:
            name, remote, remote_n = self._peer(source.agent.metadata)
        except Exception as e:  # noqa: BLE001 - bad metadata or an unreachable agent
            raise TransferError(f"cannot reach the peer's NIXL agent: {e}") from None
        if self.memory.data.is_cuda:  # blocks freed by a step still in flight are written on its stream
            await asyncio.to_thread(torch.cuda.synchronize, self.memory.data.device)
        with self._lock:
            handle = self.agent.make_prepped_xfer("READ", self._local, self._indices(local_blocks, self.memory.num_blocks),
                                                  remote, self._indices(remote_blocks, remote_n))
            state = self.agent.transfer(handle)
        try:
            delay = 0.0002
            while state not in ("DONE", "ERR"):
                await asyncio.sleep(delay)
                delay = min(delay * 2, POLL_MAX_S)
                with self._lock:
                    state = self.agent.check_xfer_state(handle)
            if state == "ERR":
                raise TransferError(f"NIXL READ from {name} failed")
        finally:
            with self._lock:
                self.agent.release_xfer_handle(handle)
        if self.client is not None:
            await ask_held(self.client, source, remote_blocks)  # still held: what we read was that prompt's KV

    def serve(self, server: object, held_blocks: HeldBlocks) -> None:
        serve_kv_check(server, held_blocks)

    async def close(self) -> None:
        with self._lock:
            for name, remote, _ in self._peers.values():
                self.agent.release_dlist_handle(remote)
                self.agent.remove_remote_agent(name)
            self._peers.clear()
            self.agent.release_dlist_handle(self._local)
            self.agent.deregister_memory(self._reg)
