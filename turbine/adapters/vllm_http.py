"""A vLLM worker's own HTTP port: vLLM's Prometheus metrics under their own names, and health.

A Turbine worker has no HTTP server (requests come over the request plane), but operators of a
vLLM fleet scrape ``vllm:*`` series and probe ``/health``. vLLM's stat logger fills a Prometheus
registry inside the worker process (its AsyncLLM front end runs there); this serves it as is:

    GET /metrics   the registry's text exposition (vllm:num_requests_running, ... unchanged)
    GET /health    200 while the engine is healthy, 503 with the reason once it is not
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

HealthCheck = Callable[[], Awaitable[None]]  # raises when unhealthy


class MetricsServer:
    def __init__(self, registry: Any, health: HealthCheck, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.registry = registry
        self.health = health
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        """Listen; returns the base URL (``port=0`` picks a free port)."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _health(self, request: web.Request) -> web.Response:
        try:
            await self.health()
        except Exception as e:
            return web.json_response({"status": "unhealthy", "error": repr(e)}, status=503)
        return web.json_response({"status": "healthy"})
