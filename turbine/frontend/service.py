"""A frontend: HTTP server + model registry + router + request-plane client, wired together."""
from __future__ import annotations

import contextlib
import logging

from turbine.frontend.api import OpenAIApi
from turbine.frontend.generation import Generation
from turbine.frontend.http_server import HttpServer
from turbine.frontend.metrics import FrontendMetrics
from turbine.frontend.model_registry import ModelRegistry
from turbine.router.router import Router
from turbine.runtime.discovery import Discovery
from turbine.runtime.events import EventSubscriber
from turbine.runtime.request_plane import RequestPlaneClient

log = logging.getLogger("turbine.frontend")


class Frontend:
    def __init__(self, *, discovery: Discovery, client: RequestPlaneClient, subscriber: EventSubscriber | None,
                 host: str = "127.0.0.1", port: int = 8000, router_policy: str = "round-robin",
                 max_inflight: int = 0, max_body_bytes: int = 32 * 1024 * 1024,
                 request_timeout_s: float | None = None, reuse_port: bool = False):
        self.metrics = FrontendMetrics()
        self.router = Router(router_policy)
        self.client = client
        self.subscriber = subscriber
        self.registry = ModelRegistry(discovery, self.metrics, subscriber, on_worker_removed=self.router.worker_removed)
        self.generation = Generation(self.registry, self.router, client, request_timeout_s)
        self.api = OpenAIApi(self.registry, self.generation, self.metrics, max_inflight=max_inflight)
        self.http = HttpServer(self.api.handle, host=host, port=port, max_body_bytes=max_body_bytes,
                               reuse_port=reuse_port)

    @property
    def url(self) -> str:
        return f"http://{self.http.host}:{self.http.port}"

    async def start(self) -> str:
        await self.registry.start()
        await self.http.start()
        log.info("frontend listening on %s", self.url)
        return self.url

    async def stop(self) -> None:
        await self.http.stop()
        await self.registry.close()
        with contextlib.suppress(Exception):
            await self.client.close()
        if self.subscriber is not None:
            with contextlib.suppress(Exception):
                await self.subscriber.close()
