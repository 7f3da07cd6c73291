"""Copies between host and device that never stall the pipeline: persistent pinned buffers.

A CUDA copy from pageable host memory first synchronizes with the stream (with async scheduling
the next step's inputs would wait for the step still running), and allocating pinned memory
(cudaHostAlloc) is itself a device-wide synchronization that can take far longer than a step.
So each step stages its copies in one of a few persistent pinned buffers, allocated once and
grown (doubling) only when a step needs more:

    prepare(k):  staging.begin_step()   slot k % SLOTS; waits on the event of the step that last
                                        used it (long done: the pipeline holds one step in flight)
                 to_device(array)       host array -> slot buffer -> device (queued, no sync)
    launch(k):   to_host(tokens)        device -> slot buffer (queued) + the slot's event
    complete(k): PendingHost.get()      waits on that event (GIL released), reads the buffer

On CPU both directions are plain tensors.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["HostStaging", "PendingHost"]

_SLOTS = 3  # a step in flight, the step being prepared, and one spare
_ALIGN = 64


class PendingHost:
    """A device tensor's copy on its way to the host, read by ``get()`` once the device is there."""

    __slots__ = ("_event", "_host")

    def __init__(self, host: torch.Tensor, event: torch.cuda.Event | None) -> None:
        self._host, self._event = host, event

    def get(self) -> list:  # type: ignore[type-arg]
        if self._event is not None:
            self._event.synchronize()  # releases the GIL while the device finishes
        return self._host.tolist()


class HostStaging:
    def __init__(self, device: torch.device, initial_bytes: int = 1 << 20) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._bufs: list[torch.Tensor | None] = [None] * _SLOTS
        self._retired: list[list[torch.Tensor]] = [[] for _ in range(_SLOTS)]
        self._events = [torch.cuda.Event() for _ in range(_SLOTS)] if self.cuda else []
        self._used = [False] * _SLOTS
        self._initial = initial_bytes
        self._slot = 0
        self._off = 0

    def begin_step(self) -> None:
        """Move to the next slot; its last step's copies are done (or waited for) after this."""
        if not self.cuda:
            return
        if self._used[self._slot]:  # mark the end of the last step's copies (a step may sample nothing)
            self._events[self._slot].record()
        self._slot = (self._slot + 1) % _SLOTS
        if self._used[self._slot]:
            self._events[self._slot].synchronize()
        self._retired[self._slot].clear()
        self._used[self._slot] = False
        self._off = 0

    def _take(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` of the current slot's pinned buffer (uint8 view)."""
        s = self._slot
        buf = self._bufs[s]
        start = -(-self._off // _ALIGN) * _ALIGN
        if buf is None or start + nbytes > buf.numel():
            size = max(self._initial, 2 * (start + nbytes), 2 * (buf.numel() if buf is not None else 0))
            if buf is not None:  # copies already queued from it this step keep it alive until begin_step
                self._retired[s].append(buf)
            buf = self._bufs[s] = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            start = 0
        self._off = start + nbytes
        self._used[s] = True
        return buf[start:start + nbytes]

    def to_device(self, host: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``host`` on the device, queued behind earlier work (no synchronization)."""
        t = torch.from_numpy(np.ascontiguousarray(host)) if isinstance(host, np.ndarray) else host.contiguous()
        if not self.cuda:
            return t.to(self.device)
        if t.numel() == 0:
            return torch.empty(t.shape, dtype=t.dtype, device=self.device)
        staged = self._take(t.numel() * t.element_size()).view(t.dtype).view(t.shape)
        staged.copy_(t)
        return staged.to(self.device, non_blocking=True)

    def to_host(self, t: torch.Tensor) -> PendingHost:
        """Queue ``t``'s copy to the host; the returned handle reads it after the device got there."""
        if not self.cuda:
            return PendingHost(t, None)
        host = self._take(t.numel() * t.element_size()).view(t.dtype).view(t.shape)
        host.copy_(t, non_blocking=True)
        ev = self._events[self._slot]
        ev.record()
        return PendingHost(host, ev)
