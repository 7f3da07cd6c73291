"""A worker process's health endpoint, for probes (Kubernetes, load balancers, scripts).

A worker serves its requests on the request plane (framed msgpack over TCP, token-gated), which no
probe speaks. `turbine worker --health-port PORT` adds a minimal HTTP/1.1 listener beside it:

- ``GET /health`` (readiness): 200 ``{"status": "ok", ...}`` while every worker of the process is
  registered in discovery and not draining; 503 with ``"starting"`` before that and ``"draining"``
  once SIGTERM began a drain, so a rolling update waits for the new pod's workers and a draining
  pod is taken out of rotation.
- ``GET /live`` (liveness): 200 while the process's event loop answers, draining included (a
  liveness failure restarts the container: a drain must never trigger one).

One request per connection, the request read within ``READ_TIMEOUT_S`` and ``MAX_REQUEST_BYTES``,
then the connection closes: it costs nothing a scraper or a probe could abuse.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Sequence

from turbine.worker.worker import Worker

log = logging.getLogger("turbine.worker.health")

READ_TIMEOUT_S = 5.0
MAX_REQUEST_BYTES = 4096
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def worker_status(workers: Sequence[Worker], draining: bool = False) -> str:
    """``ok`` (every worker registered and serving), ``starting`` or ``draining``."""
    if draining or any(getattr(w.server, "draining", False) for w in workers):
        return "draining"
    if not workers or any(w.instance is None for w in workers):
        return "starting"
    return "ok"


class HealthServer:
    def __init__(self, workers: Callable[[], Sequence[Worker]], *, host: str = "127.0.0.1", port: int = 0) -> None:
        """``workers``: the process's workers, read at each request (the list may change)."""
        self.workers = workers
        self.draining = False  # set when the process begins its drain (SIGTERM), before the workers do
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Listen; returns the bound port."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_REQUEST_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("worker health endpoint at http://%s:%d/health", self.host, self.port)
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    def answer(self, method: str, path: str) -> tuple[int, dict[str, object]]:
        path = path.split("?", 1)[0]
        if path not in ("/health", "/live"):
            return 404, {"error": f"no route {path}; try /health or /live"}
        if method not in ("GET", "HEAD"):
            return 405, {"error": "GET or HEAD only"}
        workers = list(self.workers())
        status = worker_status(workers, self.draining)
        body: dict[str, object] = {"status": status, "workers": [w.worker_id for w in workers]}
        if path == "/live":
            return 200, body
        return (200 if status == "ok" else 503), body

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(READ_TIMEOUT_S):
                    head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                head = b""
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                code, body = 400, {"error": "bad request line"}
                method = "GET"
            else:
                method = parts[0]
                code, body = self.answer(method, parts[1])
            payload = json.dumps(body).encode()
            writer.write(f"HTTP/1.1 {code} {_REASONS[code]}\r\ncontent-type: application/json\r\n"
                         f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n".encode()
                         + (b"" if method == "HEAD" else payload))
            async with asyncio.timeout(READ_TIMEOUT_S):
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


__all__ = ["HealthServer", "worker_status"]
