"""A frontend: HTTP server + model registry + router + request-plane client, wired together."""
from __future__ import annotations

import contextlib
import logging
import math
import ssl
from dataclasses import dataclass, field

from turbine.dashboard.service import Dashboard, DashboardConfig
from turbine.disagg import DisaggConfig
from turbine.frontend.api import OpenAIApi
from turbine.frontend.generation import DEFAULT_REQUEST_TIMEOUT_S, Generation
from turbine.frontend.http_server import HttpLimits, HttpServer
from turbine.frontend.metrics import FrontendMetrics
from turbine.frontend.route_queue import DEFAULT_QUEUE_SIZE
from turbine.frontend.model_registry import ModelRegistry, ServedModel
from turbine.protocols.model_card import ModelCard
from turbine.router.metrics import register_prometheus
from turbine.router.router import DEFAULT_DISK_WEIGHT, DEFAULT_HOST_WEIGHT, Router
from turbine.runtime.discovery import Discovery
from turbine.runtime.events import EventSubscriber
from turbine.runtime.request_plane import RequestPlaneClient

log = logging.getLogger("turbine.frontend")


@dataclass(frozen=True)
class RouterConfig:
    """How every model's router decides (one router per model: block sizes differ)."""

    policy: str = "predicted"
    overlap_weight: float = 1.0
    max_itl_ms: float = 0.0  # predicted policy's ITL guard (0: none)
    max_queued: int = 0  # requests a worker may have waiting for a first token (0: no limit)
    queue_size: int = DEFAULT_QUEUE_SIZE  # requests waiting in the frontend when every worker is at max_queued
    shared_load: bool = True  # count the load workers report beyond this frontend's own requests
    temperature: float = 0.0
    approx: bool = False
    approx_ttl_s: float = 120.0
    seed: int | None = None
    host_tier_weight: float = DEFAULT_HOST_WEIGHT  # a prefix block in a worker's host memory vs its GPU
    disk_tier_weight: float = DEFAULT_DISK_WEIGHT

    def build(self, card: ModelCard) -> Router:
        return Router(self.policy, block_size=card.block_size, overlap_weight=self.overlap_weight,
                      temperature=self.temperature, approx=self.approx, approx_ttl_s=self.approx_ttl_s,
                      seed=self.seed, host_tier_weight=self.host_tier_weight,
                      disk_tier_weight=self.disk_tier_weight,
                      max_itl_s=self.max_itl_ms / 1e3 if self.max_itl_ms else math.inf,
                      max_queued=self.max_queued, shared_load=self.shared_load)


@dataclass(frozen=True)
class FrontendConfig:
    """Everything a frontend is configured with, built once (by the CLI or a test) and validated here."""

    host: str = "127.0.0.1"
    port: int = 8000
    router: RouterConfig = field(default_factory=RouterConfig)
    http: HttpLimits = field(default_factory=HttpLimits)
    max_inflight: int = 0  # 429 beyond it; 0 = bounded only by the connection cap
    request_timeout_s: float | None = DEFAULT_REQUEST_TIMEOUT_S
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    tls_certfile: str | None = None
    tls_keyfile: str | None = None
    reuse_port: bool = False
    drain_timeout_s: float = 30.0  # SIGTERM: how long running requests may take to finish
    disagg: DisaggConfig = field(default_factory=DisaggConfig)  # when a prompt goes to a prefill worker
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)  # /dashboard/ (enabled=False: 404)

    def __post_init__(self) -> None:
        if self.max_inflight < 0:
            raise ValueError("max_inflight must be >= 0")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ValueError("the request timeout must be positive")
        if self.drain_timeout_s < 0:
            raise ValueError("the drain timeout must be >= 0")
        if any(not k for k in self.api_keys):
            raise ValueError("an API key must not be empty")
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("TLS needs both a certificate file and a key file")
        self.ssl_context()  # an unreadable certificate fails at start, with its path
        self.router.build(ModelCard(model_name="check", tokenizer_source="", block_size=16, total_kv_blocks=1,
                                    max_num_seqs=1, context_length=2))  # bad router options fail at start

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.tls_certfile is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(self.tls_certfile, self.tls_keyfile)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"cannot load the TLS certificate {self.tls_certfile}: {e}") from None
        return ctx


class Frontend:
    def __init__(self, config: FrontendConfig | None = None, *, discovery: Discovery, client: RequestPlaneClient,
                 subscriber: EventSubscriber | None):
        self.config = config = config or FrontendConfig()
        self.metrics = FrontendMetrics()
        self.client = client
        self.subscriber = subscriber
        self.registry = ModelRegistry(discovery, self.metrics, client, config.router.build, subscriber,
                                      on_model_added=self._model_added, queue_size=config.router.queue_size)
        self.generation = Generation(self.registry, client, config.request_timeout_s, config.disagg)
        self.api = OpenAIApi(self.registry, self.generation, self.metrics, max_inflight=config.max_inflight,
                             api_keys=config.api_keys)
        self.http = HttpServer(self.api.handle, host=config.host, port=config.port, limits=config.http,
                               reuse_port=config.reuse_port, ssl_context=config.ssl_context())
        self.metrics.watch_serving(self.http, self.registry, self.generation, client)
        self.dashboard = Dashboard(self, config.dashboard) if config.dashboard.enabled else None

    def _model_added(self, m: ServedModel) -> None:
        register_prometheus(self.metrics.registry, m.router, m.name, {"prefill": m.prefill_router})
        if self.dashboard is not None:
            self.dashboard.watch_model(m)

    @property
    def url(self) -> str:
        host = self.http.host
        return f"{self.http.scheme}://{f'[{host}]' if ':' in host else host}:{self.http.port}"

    async def start(self) -> str:
        await self.registry.start()
        await self.registry.settle(timeout=30.0)
        await self.http.start()
        if self.dashboard is not None:
            self.dashboard.start()
        log.info("frontend listening on %s", self.url)
        return self.url

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop accepting connections and let running requests finish (SIGTERM)."""
        grace = self.config.drain_timeout_s if grace_s is None else grace_s
        if self.dashboard is not None:
            self.dashboard.close_streams()  # pages' event streams never end by themselves
        log.info("frontend draining: %d connections, up to %.0f s", len(self.http.connections), grace)
        cut = await self.http.drain(grace)
        if cut:
            log.warning("frontend drain: %d requests still running after %.0f s were cut off", cut, grace)

    async def stop(self) -> None:
        if self.dashboard is not None:
            await self.dashboard.stop()
        await self.http.stop()
        await self.generation.prefill.close()
        await self.registry.close()
        with contextlib.suppress(Exception):
            await self.client.close()
        if self.subscriber is not None:
            with contextlib.suppress(Exception):
                await self.subscriber.close()
