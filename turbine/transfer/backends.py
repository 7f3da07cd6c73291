"""Pick a transfer backend for a built-in engine's KV memory (imports torch)."""
from __future__ import annotations

import importlib.util
from typing import Any

from turbine.runtime.request_plane import RequestPlaneClient
from turbine.transfer.base import TransferBackend
from turbine.transfer.kv_memory import KvMemory


def auto_backend(device_type: str, inproc: bool) -> str:
    """One process: in-process copies. Several: CUDA IPC between GPUs of a node, else NIXL when
    installed, else TCP. Both sides of a transfer must pick the same (same hardware: they do)."""
    if inproc:
        return "inproc"
    if device_type == "cuda":
        return "cuda_ipc"
    return "nixl" if importlib.util.find_spec("nixl") is not None else "tcp"


def make_backend(name: str, engine: Any, client: RequestPlaneClient, *, inproc: bool) -> TransferBackend:
    """The backend ``name`` (or the ``auto`` choice) over a built-in engine's KV cache."""
    memory = KvMemory(engine.kv_data, engine.kv_layout)
    if name == "auto":
        name = auto_backend(memory.data.device.type, inproc)
    return backend_for(name, memory, client)


def backend_for(name: str, memory: KvMemory, client: RequestPlaneClient) -> TransferBackend:
    if name == "inproc":
        from turbine.transfer.inproc import InProcTransfer
        return InProcTransfer(memory)
    if name == "tcp":
        from turbine.transfer.tcp import TcpTransfer
        return TcpTransfer(memory, client)
    if name == "nixl":
        from turbine.transfer.nixl import NixlTransfer
        return NixlTransfer(memory, client)
    if name == "cuda_ipc":
        from turbine.transfer.cuda_ipc import CudaIpcTransfer
        return CudaIpcTransfer(memory, client)
    raise ValueError(f"unknown KV transfer backend {name!r} (auto, tcp, nixl, cuda_ipc, inproc)")
