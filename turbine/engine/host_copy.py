"""Host-to-device copies that never wait for the device, and device-to-host reads that wait late.

A CUDA copy from pageable host memory first synchronizes with the stream: with async scheduling
the next step's inputs would wait for the step still running. Copies from pinned memory are
queued like kernels. torch's pinned-memory cache keeps each staging buffer until the copy that
reads it has run, so a buffer per copy is cheap and safe.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["PendingHost", "to_device"]


def to_device(host: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device``; on CUDA through a pinned buffer, queued behind earlier work."""
    t = torch.from_numpy(host) if isinstance(host, np.ndarray) else host
    if device.type != "cuda":
        return t.to(device)
    if t.numel() == 0:
        return torch.empty(t.shape, dtype=t.dtype, device=device)
    pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    pinned.copy_(t)
    return pinned.to(device, non_blocking=True)


class PendingHost:
    """A device tensor's copy on its way to the host: queued now, read by ``get()`` later.

    ``get()`` waits on a CUDA event, which releases the GIL while the device finishes (a
    blocking ``.tolist()`` on a device tensor would hold it).
    """

    __slots__ = ("_event", "_host")

    def __init__(self, t: torch.Tensor) -> None:
        if t.device.type != "cuda":
            self._host, self._event = t, None
            return
        self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self._host.copy_(t, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def get(self) -> list:  # type: ignore[type-arg]
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()
