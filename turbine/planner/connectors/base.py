"""The one interface the planner scales through."""
from __future__ import annotations

from typing import Protocol


class Connector(Protocol):
    """Pools are ``agg``, ``prefill`` and ``decode``."""

    async def current(self) -> dict[str, int]:
        """Workers per pool that serve or are starting (draining ones excluded)."""
        ...

    async def scale(self, pool: str, replicas: int) -> None:
        """Start or drain workers until ``pool`` has ``replicas``; returns once the change is
        under way (a draining worker finishes its requests in the background)."""
        ...

    async def close(self) -> None:
        """Stop what the connector started (drained), or leave it running where it does not own
        the workers (Kubernetes)."""
        ...


__all__ = ["Connector"]
