"""A frontend: HTTP server + model registry + router + request-plane client, wired together."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from turbine.frontend.api import OpenAIApi
from turbine.frontend.generation import Generation
from turbine.frontend.http_server import HttpServer
from turbine.frontend.metrics import FrontendMetrics
from turbine.frontend.model_registry import ModelRegistry, ServedModel
from turbine.protocols.model_card import ModelCard
from turbine.router.metrics import register_prometheus
from turbine.router.router import Router
from turbine.runtime.discovery import Discovery
from turbine.runtime.events import EventSubscriber
from turbine.runtime.request_plane import RequestPlaneClient

log = logging.getLogger("turbine.frontend")


@dataclass(frozen=True)
class RouterConfig:
    """How every model's router decides (one router per model: block sizes differ)."""

    policy: str = "kv"
    overlap_weight: float = 1.0
    temperature: float = 0.0
    approx: bool = False
    approx_ttl_s: float = 120.0
    seed: int | None = None

    def build(self, card: ModelCard) -> Router:
        return Router(self.policy, block_size=card.block_size, overlap_weight=self.overlap_weight,
                      temperature=self.temperature, approx=self.approx, approx_ttl_s=self.approx_ttl_s,
                      seed=self.seed)


class Frontend:
    def __init__(self, *, discovery: Discovery, client: RequestPlaneClient, subscriber: EventSubscriber | None,
                 host: str = "127.0.0.1", port: int = 8000, router: RouterConfig | None = None,
                 max_inflight: int = 0, max_body_bytes: int = 32 * 1024 * 1024,
                 request_timeout_s: float | None = None, reuse_port: bool = False):
        self.metrics = FrontendMetrics()
        self.router_config = router or RouterConfig()
        self.router_config.build(ModelCard(model_name="check", tokenizer_source="", block_size=16, total_kv_blocks=1,
                                           max_num_seqs=1, context_length=2))  # bad options fail at start
        self.client = client
        self.subscriber = subscriber
        self.registry = ModelRegistry(discovery, self.metrics, client, self.router_config.build, subscriber,
                                      on_model_added=self._model_added)
        self.generation = Generation(self.registry, client, request_timeout_s)
        self.api = OpenAIApi(self.registry, self.generation, self.metrics, max_inflight=max_inflight)
        self.http = HttpServer(self.api.handle, host=host, port=port, max_body_bytes=max_body_bytes,
                               reuse_port=reuse_port)

    def _model_added(self, m: ServedModel) -> None:
        register_prometheus(self.metrics.registry, m.router, m.name)

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
