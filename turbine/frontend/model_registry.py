"""Which models are served and by which workers, as discovery reports it.

The frontend never configures models by hand: a worker registers a model card, the registry
loads that model's tokenizer once (off the event loop) and subscribes to the worker's events.
A worker that leaves discovery, or whose connection just broke, stops receiving requests.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import msgspec

from turbine.frontend.errors import ApiError
from turbine.frontend.metrics import FrontendMetrics
from turbine.frontend.route_queue import DEFAULT_QUEUE_SIZE, RouteQueue
from turbine.frontend.tokenizer import TurbineTokenizer
from turbine.protocols.load import WorkerLoad
from turbine.protocols.model_card import ModelCard
from turbine.router.event_sync import KvEventSync
from turbine.router.router import Router
from turbine.runtime.discovery import Discovery, Instance
from turbine.runtime.events import EventSubscriber
from turbine.runtime.request_plane import RequestPlaneClient
from turbine.runtime.tcp import parse_address

log = logging.getLogger("turbine.frontend")

# A worker whose request failed to start or broke is set aside for SUSPECT_S, doubling with
# each failure in a row up to SUSPECT_MAX_S; a stream that gets going clears it.
SUSPECT_S = 1.0
SUSPECT_MAX_S = 30.0
_instance_codec = (msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(Instance))


def check_record(inst: Instance) -> Instance:
    """The record as the wire contract allows it (card constraints, usable addresses), or ValueError.

    In-process discovery hands over objects nobody decoded, so the check round-trips them."""
    enc, dec = _instance_codec
    try:
        inst = dec.decode(enc.encode(inst))
    except msgspec.DecodeError as e:
        raise ValueError(f"invalid record: {e}") from None
    scheme = inst.address.partition("://")[0]
    if scheme == "tcp":
        parse_address(inst.address)
    elif scheme != "inproc":
        raise ValueError(f"request address {inst.address!r} is neither tcp:// nor inproc://")
    return inst  # the event address is the subscriber's to judge (connect raises ValueError)


class ReportedLoad(NamedTuple):
    load: WorkerLoad
    at: float  # time.monotonic() when it arrived


@dataclass
class ServedModel:
    """One model and its workers. ``router`` picks among the workers that generate (aggregated
    and decode roles), ``prefill_router`` among the prefill workers of a disaggregated model."""

    name: str
    card: ModelCard
    router: Router
    prefill_router: Router
    tokenizer: TurbineTokenizer | None = None
    workers: dict[str, Instance] = field(default_factory=dict)
    queue: RouteQueue = field(default_factory=RouteQueue)  # requests no worker admits yet (router.max_queued)
    reports: dict[str, ReportedLoad] = field(default_factory=dict)  # each worker's last load report (dashboard)
    created: int = field(default_factory=lambda: int(time.time()))

    def role(self, worker_id: str) -> str:
        card = self.workers[worker_id].model_card
        return card.role if card is not None else "aggregated"

    def router_for(self, inst: Instance) -> Router:
        card = inst.model_card
        return self.prefill_router if card is not None and card.role == "prefill" else self.router


class ModelRegistry:
    def __init__(self, discovery: Discovery, metrics: FrontendMetrics, client: RequestPlaneClient,
                 router_factory: Callable[[ModelCard], Router],
                 subscriber: EventSubscriber | None = None,
                 on_model_added: Callable[[ServedModel], None] | None = None,
                 queue_size: int = DEFAULT_QUEUE_SIZE):
        self.discovery = discovery
        self.metrics = metrics
        self.subscriber = subscriber
        self.router_factory = router_factory
        self.queue_size = queue_size
        self.models: dict[str, ServedModel] = {}
        self._suspect: dict[str, tuple[float, float]] = {}  # worker -> (until, current backoff)
        self.rejected_records = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._tokenizer_loads: dict[str, asyncio.Task[None]] = {}
        self._on_model_added = on_model_added
        self._load_decoder = msgspec.msgpack.Decoder(WorkerLoad)
        self.kv_sync = KvEventSync(client, on_load=self._on_load)
        self.ready = asyncio.Event()

    async def start(self) -> None:
        self._spawn(self._watch_discovery())
        if self.subscriber is not None:
            self._spawn(self._watch_events())

    async def settle(self, timeout: float) -> None:
        """Wait (bounded) until the workers already in discovery are usable: their records
        applied and their tokenizers loaded, so a frontend that replaces another one in a rolling
        restart takes no request it would answer with 503."""
        await asyncio.sleep(0)  # the watch applies the initial snapshot
        loads = list(self._tokenizer_loads.values())
        if loads:
            await asyncio.wait(loads, timeout=timeout)

    async def close(self) -> None:
        await self.kv_sync.close()
        for t in list(self._tasks) + list(self._tokenizer_loads.values()):
            t.cancel()
        for t in list(self._tasks) + list(self._tokenizer_loads.values()):
            with contextlib.suppress(BaseException):
                await t

    def _spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # --- discovery ------------------------------------------------------------------------
    async def _watch_discovery(self) -> None:
        """One bad record costs a log line and a metric, never the watch."""
        async for ev in self.discovery.watch():
            inst = ev.instance
            if inst.component != "worker" or inst.endpoint != "generate" or inst.model_card is None:
                continue
            try:
                if ev.kind == "added":
                    self._add(check_record(inst))
                else:
                    self._remove(inst)
            except Exception as e:  # noqa: BLE001
                self.rejected_records += 1
                log.warning("discovery: skipping the record of %s: %s", inst.instance_id, e)
                if ev.kind == "added":  # an update that broke a known worker's record retires it
                    with contextlib.suppress(Exception):
                        self._remove(inst)

    def _add(self, inst: Instance) -> None:
        """Everything that can fail on a bad record (router options, the event address) runs
        before any state changes, so a refused record leaves no trace."""
        card = inst.model_card
        assert card is not None
        m = self.models.get(card.model_name)
        routers = (self.router_factory(card), self.router_factory(card)) if m is None else None
        old = m.workers.get(inst.instance_id) if m is not None else None
        router = (routers[1] if card.role == "prefill" else routers[0]) if routers is not None else m.router_for(inst)
        router.latency_model(card.total_kv_blocks, card.timing)  # a timing profile that does not load raises here
        if old is not None and (old.event_address != inst.event_address or old.model_card != card):
            self._remove(old)  # re-registered elsewhere or with another role: forget the old record first
        if inst.event_address and self.subscriber is not None:
            self.subscriber.connect(inst.event_address)
        if m is None:
            assert routers is not None
            m = self.models[card.model_name] = ServedModel(card.model_name, card, *routers,
                                                           queue=RouteQueue(self.queue_size, routers[0].stats))
            m.router.on_capacity = m.queue.kick
            if self._on_model_added is not None:
                self._on_model_added(m)
        elif card.block_size != m.card.block_size:
            log.warning("worker %s serves %s with block size %d, others use %d: prefix routing across them "
                        "will not match", inst.instance_id, card.model_name, card.block_size, m.card.block_size)
        m.workers[inst.instance_id] = inst
        router.worker_added(inst.instance_id, card.total_kv_blocks, card.timing)
        self._suspect.pop(inst.instance_id, None)
        self.metrics.workers.labels(m.name).set(len(m.workers))
        if inst.event_address and self.subscriber is not None:
            self.kv_sync.add_worker(inst.event_address, inst.instance_id, inst.address, m.router_for(inst))
        if m.tokenizer is None and m.name not in self._tokenizer_loads:
            self._tokenizer_loads[m.name] = asyncio.get_running_loop().create_task(self._load_tokenizer(m))
        log.info("worker %s joined model %s at %s", inst.instance_id, m.name, inst.address)

    def _remove(self, inst: Instance) -> None:
        card = inst.model_card
        assert card is not None
        m = self.models.get(card.model_name)
        self._suspect.pop(inst.instance_id, None)
        if m is None or m.workers.pop(inst.instance_id, None) is None:
            return
        self.metrics.workers.labels(m.name).set(len(m.workers))
        self.metrics.worker_gone(m.name, inst.instance_id)
        m.reports.pop(inst.instance_id, None)
        if inst.event_address and self.subscriber is not None:
            self.kv_sync.remove_worker(inst.event_address)
            self.subscriber.disconnect(inst.event_address)
        self.kv_sync.worker_removed(m.router_for(inst), inst.instance_id)  # its blocks: after its queued events
        log.info("worker %s left model %s", inst.instance_id, m.name)

    async def _load_tokenizer(self, m: ServedModel) -> None:
        try:
            m.tokenizer = await asyncio.to_thread(TurbineTokenizer.from_dir, m.card.tokenizer_source)
            self.ready.set()
        except Exception:
            log.exception("cannot load the tokenizer of %s from %s", m.name, m.card.tokenizer_source)
        finally:
            self._tokenizer_loads.pop(m.name, None)

    # --- events ----------------------------------------------------------------------------
    async def _watch_events(self) -> None:
        assert self.subscriber is not None
        on_event = self.kv_sync.on_event
        async for ev in self.subscriber:
            on_event(ev)

    def _on_load(self, payload: bytes) -> None:
        try:
            load = self._load_decoder.decode(payload)
        except msgspec.DecodeError:
            log.warning("undecodable load event")
            return
        m = self.models.get(load.model_name)
        if m is not None and load.worker_id in m.workers:
            self.metrics.worker_load(load)
            m.reports[load.worker_id] = ReportedLoad(load, time.monotonic())
            m.router_for(m.workers[load.worker_id]).reported_load(load)

    # --- lookups -----------------------------------------------------------------------------
    def get(self, name: str) -> ServedModel:
        m = self.models.get(name)
        if m is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise ApiError(404, f"The model `{name}` does not exist. Models served: {known}.",
                           param="model", code="model_not_found")
        return m

    def candidates(self, m: ServedModel, pool: str = "generate") -> list[str]:
        """Workers that may take a request now; raises 503 when there are none.

        ``generate``: aggregated and decode workers (prefill workers only when no other is left:
        any engine can serve a request whole); ``prefill``: the prefill workers."""
        if m.tokenizer is None:
            raise ApiError(503, f"model `{m.name}` is still loading its tokenizer; retry shortly")
        now = time.monotonic()
        suspect = self._suspect
        ids = [w for w in m.workers if w not in suspect or suspect[w][0] <= now]
        if pool == "prefill":
            ids = [w for w in ids if m.role(w) == "prefill"]
        elif any(m.role(w) == "prefill" for w in ids):
            ids = [w for w in ids if m.role(w) != "prefill"] or ids
        if not ids:
            raise ApiError(503, f"no worker is serving model `{m.name}` right now", headers=[("retry-after", "1")])
        return ids

    def has_pool(self, m: ServedModel, role: str) -> bool:
        return any(m.role(w) == role for w in m.workers)

    def mark_suspect(self, worker_id: str) -> None:
        """Set a failing worker aside; each failure in a row doubles the time (capped)."""
        _, last = self._suspect.get(worker_id, (0.0, 0.0))
        backoff = min(SUSPECT_MAX_S, last * 2) if last else SUSPECT_S
        self._suspect[worker_id] = (time.monotonic() + backoff, backoff)
        log.info("worker %s set aside for %.1f s after a failed request", worker_id, backoff)

    def suspect_s(self, worker_id: str, now: float | None = None) -> float:
        """Seconds the worker is still set aside after failures (0: it takes requests)."""
        until = self._suspect.get(worker_id, (0.0, 0.0))[0]
        return max(0.0, until - (time.monotonic() if now is None else now))

    def mark_healthy(self, worker_id: str) -> None:
        if self._suspect:
            self._suspect.pop(worker_id, None)

    def served(self) -> list[ServedModel]:
        return [m for m in self.models.values() if m.workers]
