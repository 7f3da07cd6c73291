"""One tensor-parallel group: a rank's collectives over its peers (gloo on CPU, NCCL on CUDA).

Each group has its own rendezvous store (a ``TCPStore`` served by rank 0 on loopback) and its
own process-group backend object, never torch's global default group: a process can hold
several engines (``turbine serve --workers 2``), each with its own group, and rank 0 lives in
the engine process beside the event loop. Every collective has the group's timeout (a peer
that stopped answering fails the call instead of hanging it); on NCCL the watchdog enforces it
(``TORCH_NCCL_ASYNC_ERROR_HANDLING``), on gloo the call raises.

The backends' own methods (``allreduce``, ``_allgather_base``, ``broadcast``) are called
directly: they are what ``torch.distributed``'s functions call, and they are what a CUDA graph
captures on NCCL.
"""
from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["TPGroup", "make_store"]

log = logging.getLogger(__name__)

_HOST = "127.0.0.1"  # tensor parallelism is within one machine


def make_store(size: int, timeout_s: float, port: int = 0) -> dist.TCPStore:
    """Rank 0's rendezvous store (``port`` 0: any free port; read ``store.port``)."""
    return dist.TCPStore(_HOST, port, size, True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


@dataclass
class TPGroup:
    rank: int
    size: int
    device: torch.device
    backend: object  # a ProcessGroupGloo / ProcessGroupNCCL backend
    timeout_s: float

    @classmethod
    def connect(cls, *, rank: int, size: int, device: torch.device, port: int, timeout_s: float,
                store: dist.Store | None = None) -> TPGroup:
        """Join the group (blocks until every rank has joined, at most ``timeout_s``). Rank 0
        passes the store it serves; the others connect to ``port``."""
        timeout = datetime.timedelta(seconds=timeout_s)
        if store is None:
            store = dist.TCPStore(_HOST, port, size, False, timeout=timeout)
        port = store.port
        store = dist.PrefixStore("turbine-tp", store)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            opts = dist.ProcessGroupNCCL.Options()
            opts.is_high_priority_stream = False
            opts._timeout = timeout
            opts.global_ranks_in_group = list(range(size))
            opts.group_name = f"turbine-tp-{port}"  # unique per engine in a process
            backend = dist.ProcessGroupNCCL(store, rank, size, opts)
            backend.eager_connect_single_device(device)  # the communicator now, not inside a graph capture
        else:
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=_HOST)]
            backend = dist.ProcessGroupGloo(store, rank, size, opts)
        return cls(rank=rank, size=size, device=device, backend=backend, timeout_s=timeout_s)

    # -- collectives (the model calls the first two inside its forward) ----------------------------
    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``x`` over the ranks, in place (``op``: "sum", "min" or "max"); returns ``x``."""
        opts = dist.AllreduceOptions()
        opts.reduceOp = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
        self.backend.allreduce([x], opts).wait()  # type: ignore[attr-defined]
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, n]`` on each rank -> ``[N, size * n]`` with rank r's columns at ``[r*n, (r+1)*n)``."""
        n_rows, n = x.shape
        out = torch.empty((self.size * n_rows, n), dtype=x.dtype, device=x.device)
        self.backend._allgather_base(out, x.contiguous()).wait()  # type: ignore[attr-defined]
        return out.view(self.size, n_rows, n).transpose(0, 1).reshape(n_rows, self.size * n)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``x`` of rank ``src`` into ``x`` on every rank (in place)."""
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        self.backend.broadcast([x], opts).wait()  # type: ignore[attr-defined]
        return x

    def abort(self) -> None:
        """Make pending and future collectives fail (a peer is gone); best effort."""
        try:
            self.backend.abort()  # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001 - not every backend can
            log.debug("tensor-parallel group abort: %r", e)
