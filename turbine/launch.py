"""Assemble the deployment shapes from parts: all-in-one ``serve``, ``frontend``, ``worker``.

Keeping assembly here (not in the CLI) lets tests start the same shapes in-process.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from turbine.adapters.vllm_args import VllmOptions
from turbine.frontend.service import Frontend, FrontendConfig
from turbine.engine.base import Engine
from turbine.engine.builtin_config import BuiltinConfig
from turbine.frontend.tokenizer import TurbineTokenizer
from turbine.mocker.engine import MockEngine, MockerConfig
from turbine.mocker.timing import ProfileTiming
from turbine.protocols.model_card import ModelCard, WorkerTiming
from turbine.runtime.config import Runtime, RuntimeConfig
from turbine.runtime.discovery import Discovery
from turbine.runtime.events import EventPublisher, EventSubscriber
from turbine.runtime.fleet_token import fleet_token
from turbine.runtime.request_plane import RequestPlaneClient
from turbine.transfer.manager import KvTransferManager
from turbine.transfer.mock import MockTransfer
from turbine.worker.worker import LOAD_MIN_INTERVAL_S, Worker

log = logging.getLogger("turbine")

DEFAULT_MODEL_DIR = Path(os.environ.get("TURBINE_HOME", Path.home() / ".cache" / "turbine")) / "models" / "tiny"


def default_model_dir(weights: bool = False) -> Path:
    """The embedded default model: a tiny HF-format directory generated locally on first use.

    ``weights``: the engine runs a real forward pass (the built-in engine), so the directory must
    hold random weights too; one generated for the mocker without torch is completed then."""
    missing = not (DEFAULT_MODEL_DIR / "tokenizer.json").exists()
    if missing or (weights and not any(DEFAULT_MODEL_DIR.glob("*.safetensors"))):
        from turbine.model_maker.make_model import make_model

        log.info("generating the default tiny model in %s (first run only)", DEFAULT_MODEL_DIR)
        make_model(DEFAULT_MODEL_DIR, preset="tiny", overwrite=True)
    return DEFAULT_MODEL_DIR


ENGINES = ("mock", "builtin", "vllm")
READY_TIMEOUT_S = 120.0  # serve: workers registered, tokenizer loaded


@dataclass
class WorkerOptions:
    model_dir: Path
    model_name: str | None = None
    engine: str = "mock"
    mocker: MockerConfig = field(default_factory=MockerConfig)
    builtin: BuiltinConfig = field(default_factory=BuiltinConfig)
    vllm: VllmOptions = field(default_factory=VllmOptions)
    host: str = "127.0.0.1"
    context_length: int | None = None  # None: the model's max_position_embeddings
    role: str = "aggregated"  # "aggregated" | "prefill" | "decode" (disaggregated serving)
    kv_transfer: str = "auto"  # the built-in engine's transfer backend: auto | tcp | nixl | cuda_ipc | inproc
    load_interval_s: float = LOAD_MIN_INTERVAL_S  # the worker's load reports, at most this often


ROLES = {"agg": "aggregated", "aggregated": "aggregated", "prefill": "prefill", "decode": "decode"}
TRANSFER_BACKENDS = ("auto", "tcp", "nixl", "cuda_ipc", "inproc")


def model_context_length(model_dir: Path, fallback: int) -> int:
    cfg = model_dir / "config.json"
    if cfg.exists():
        with contextlib.suppress(ValueError, OSError):
            return int(json.loads(cfg.read_text()).get("max_position_embeddings") or fallback)
    return fallback


def card_timing(profile: str | None, max_num_batched_tokens: int, speedup_ratio: float = 1.0) -> WorkerTiming:
    """What the worker's card tells a latency-predicting router about its step times: the
    measured profile it was given (``--profile``), else Dynamo's polynomial, at its token budget."""
    data = None
    if profile:
        try:
            ProfileTiming.from_file(profile, speedup_ratio)  # a bad profile fails here, with its path
            data = json.loads(Path(profile).read_text())
        except (ValueError, OSError) as e:
            raise SystemExit(f"turbine: --profile: {e}") from None
    return WorkerTiming(max_num_batched_tokens=max_num_batched_tokens, speedup_ratio=speedup_ratio, profile=data)


def build_engine(opts: WorkerOptions, tokenizer: TurbineTokenizer) -> tuple[Engine, ModelCard]:
    """Blocking (the built-in engine loads weights): call it off the event loop."""
    if opts.engine not in ENGINES:
        raise SystemExit(f"turbine: unknown engine {opts.engine!r}; choose one of {', '.join(ENGINES)}")
    if not (opts.model_dir / "tokenizer.json").exists():
        raise SystemExit(f"turbine: {opts.model_dir} has no tokenizer.json (make one: turbine make-model DIR)")
    name = opts.model_name or opts.model_dir.name
    if opts.engine == "builtin":
        return _build_builtin(opts, name)
    if opts.engine == "vllm":
        return _build_vllm(opts, name)
    cfg = opts.mocker
    ctx = opts.context_length or model_context_length(opts.model_dir, cfg.context_length)
    cfg = msgspec.structs.replace(cfg, context_length=ctx)
    engine = MockEngine(cfg, vocab_size=tokenizer.vocab_size,
                        special_token_ids=tuple(sorted(tokenizer.special_token_ids)),
                        eos_token_ids=tuple(tokenizer.eos_token_ids))
    card = ModelCard(model_name=name, tokenizer_source=str(opts.model_dir),
                     block_size=cfg.block_size, total_kv_blocks=cfg.num_gpu_blocks, max_num_seqs=cfg.max_num_seqs,
                     context_length=ctx, engine="mock",
                     timing=card_timing(cfg.profile, cfg.max_num_batched_tokens, cfg.speedup_ratio))
    return engine, card


def _build_builtin(opts: WorkerOptions, name: str) -> tuple[Engine, ModelCard]:
    try:
        from turbine.engine.builtin_core import BuiltinCore  # torch is imported only here
        from turbine.engine.builtin_engine import BuiltinEngine
    except ImportError as e:
        raise SystemExit(f"turbine: the builtin engine needs the engine extra (pip install 'turbine[engine]'): {e}") \
            from None
    cfg = opts.builtin
    if opts.context_length is not None:
        cfg = msgspec.structs.replace(cfg, context_length=opts.context_length)
    if cfg.tensor_parallel_size > 1 and ROLES.get(opts.role) != "aggregated":
        raise SystemExit("turbine: prefill and decode workers need --tensor-parallel-size 1 for now")
    try:
        engine = BuiltinEngine.from_core(BuiltinCore.load(opts.model_dir, cfg))
    except (ValueError, RuntimeError, OSError) as e:
        raise SystemExit(f"turbine: cannot start the builtin engine on {opts.model_dir}: {e}") from None
    engine.on_fatal = _fail_process  # a tensor-parallel rank died: this process leaves, its requests migrate
    card = ModelCard(model_name=name, tokenizer_source=str(opts.model_dir), block_size=engine.block_size,
                     total_kv_blocks=engine.num_kv_blocks, max_num_seqs=engine.max_num_seqs,
                     context_length=engine.context_length, engine="builtin",
                     timing=card_timing(opts.mocker.profile, cfg.max_num_batched_tokens))
    return engine, card


def _build_vllm(opts: WorkerOptions, name: str) -> tuple[Engine, ModelCard]:
    try:
        from turbine.adapters.vllm_engine import VllmEngine  # vLLM is imported only here
    except ImportError as e:
        raise SystemExit(f"turbine: the vllm engine needs the vllm extra (pip install 'turbine[vllm]'): {e}") \
            from None
    args = list(opts.vllm.engine_args)
    if opts.context_length is not None and not any(a.startswith("--max-model-len") for a in args):
        args += ["--max-model-len", str(opts.context_length)]
    try:
        engine = VllmEngine.create(opts.model_dir, args, host=opts.host, metrics_port=opts.vllm.metrics_port,
                                   on_fatal=_terminate_self)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"turbine: cannot start vLLM on {opts.model_dir}: {e}") from None
    return engine, engine.model_card(name, opts.model_dir)


_ENGINE_FAILURES: list[BaseException] = []


def _terminate_self(err: BaseException) -> None:
    """A dead engine ends its process the orderly way: it leaves discovery, its requests migrate."""
    log.error("engine failure (%r): stopping this process", err)
    os.kill(os.getpid(), signal.SIGTERM)


def _fail_process(err: BaseException) -> None:
    """As ``_terminate_self``, and the process then exits 1 (``engine_failure``): a built-in engine
    whose tensor-parallel rank died."""
    _ENGINE_FAILURES.append(err)
    _terminate_self(err)


def engine_failure() -> BaseException | None:
    """The first failure that stopped this process through ``_fail_process`` (None: none did)."""
    return _ENGINE_FAILURES[0] if _ENGINE_FAILURES else None


def make_transfer(opts: WorkerOptions, engine: Engine, client: RequestPlaneClient, *,
                  inproc: bool) -> KvTransferManager | None:
    """The KV transfer manager of one worker (disaggregation); None for engines without one."""
    if isinstance(engine, MockEngine):
        return KvTransferManager(MockTransfer(client, engine.core.transfer_seconds), client,
                                 block_bytes=engine.config.block_size * engine.config.kv_bytes_per_token)
    data = getattr(engine, "kv_data", None)
    if data is None:
        return None  # e.g. vLLM: it serves requests whole
    from turbine.transfer.backends import make_backend  # torch

    backend = make_backend(opts.kv_transfer, engine, client, inproc=inproc)
    return KvTransferManager(backend, client, block_bytes=engine.kv_layout.block_bytes)  # type: ignore[attr-defined]


async def start_workers(opts: WorkerOptions, n: int, discovery: Discovery, runtime: Runtime, *,
                        client: RequestPlaneClient | None = None) -> list[Worker]:
    """``n`` workers with planes from ``runtime``, registered in ``discovery``. ``client``: the
    request-plane client workers use to reach each other (KV transfers)."""
    tokenizer = await asyncio.to_thread(TurbineTokenizer.from_dir, opts.model_dir)
    if client is None:
        client = runtime.client()
    workers = []
    for _ in range(n):
        engine, card = await asyncio.to_thread(build_engine, opts, tokenizer)
        card = msgspec.structs.replace(card, role=ROLES[opts.role])
        w = Worker(engine, card, discovery=discovery, server=runtime.server(), publisher=runtime.publisher(),
                   transfer=make_transfer(opts, engine, client, inproc=runtime.inproc),
                   load_interval_s=opts.load_interval_s)
        await w.start()
        workers.append(w)
    return workers


async def wait_for_signal() -> asyncio.Event:
    """Wait for SIGINT/SIGTERM; returns an event set by a second one (stop draining, exit now)."""
    loop = asyncio.get_running_loop()
    first, again = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        if first.is_set():
            log.warning("second signal: stopping without waiting for running requests")
            again.set()
        first.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    await first.wait()
    return again


@dataclass
class Deployment:
    """Everything one process runs; ``stop`` drains and tears it down in the reverse order."""

    frontend: Frontend | None = None
    workers: list[Worker] = field(default_factory=list)
    discovery: Discovery | None = None
    runtime: Runtime | None = None  # what built its planes and discovery
    drain_timeout_s: float = 30.0
    clients: list[RequestPlaneClient] = field(default_factory=list)  # the workers' own (KV transfers)
    # Starts n more workers of a role ("aggregated", "prefill", "decode") like the first ones
    # (serve: in this process); None where the deployment cannot grow.
    grow: Callable[[str, int], Awaitable[list[Worker]]] | None = None

    async def add_workers(self, role: str, n: int) -> list[Worker]:
        if self.grow is None:
            raise RuntimeError("this deployment cannot start workers")
        new = await self.grow(ROLES[role], n)
        self.workers += new
        return new

    async def remove_worker(self, worker: Worker) -> None:
        """Drain one worker (it leaves discovery, finishes its requests) and stop it."""
        self.workers.remove(worker)
        try:
            await worker.drain(self.drain_timeout_s)
        finally:
            await worker.stop()

    async def stop(self, grace_s: float | None = None, abort: asyncio.Event | None = None) -> None:
        """Drain: the frontend stops accepting and finishes its streams, then each worker leaves
        discovery and finishes its requests (``grace_s`` each), then everything closes.
        ``abort`` (a second signal) cuts the waiting short."""
        grace = self.drain_timeout_s if grace_s is None else grace_s

        async def bounded(coro) -> None:  # type: ignore[no-untyped-def]
            if abort is None:
                await coro
                return
            task = asyncio.ensure_future(coro)
            stop = asyncio.ensure_future(abort.wait())
            await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

        if self.frontend is not None and grace > 0:
            await bounded(self.frontend.drain(grace))
        await bounded(asyncio.gather(*(w.drain(grace) for w in self.workers), return_exceptions=True))
        for w in self.workers:
            with contextlib.suppress(Exception):
                await w.stop()
        for c in self.clients:
            with contextlib.suppress(Exception):
                await c.close()
        if self.frontend is not None:
            await self.frontend.stop()
        if self.discovery is not None:
            with contextlib.suppress(Exception):
                await self.discovery.close()


async def start_all_in_one(opts: WorkerOptions, *, workers: int, frontend: FrontendConfig | None = None,
                           prefill_workers: int = 0, decode_workers: int = 0,
                           runtime: RuntimeConfig | None = None) -> Deployment:
    """Frontend, router and workers in this process: ``workers`` aggregated ones, plus
    ``prefill_workers`` and ``decode_workers`` (a disaggregated model). ``runtime``: embedded
    (mem://, in-process planes) by default; with file:// or etcd:// the workers are registered
    there on TCP and ZMQ planes, and other frontends and workers may join the fleet."""
    frontend = frontend or FrontendConfig()
    rt = Runtime(runtime)
    discovery = await rt.discovery()
    client = rt.client()
    dep = Deployment(discovery=discovery, runtime=rt, drain_timeout_s=frontend.drain_timeout_s, clients=[client])
    dep.frontend = Frontend(frontend, discovery=discovery, client=rt.client(), subscriber=rt.subscriber())
    try:
        await dep.frontend.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await dep.stop(grace_s=0)
        raise

    async def grow(role: str, n: int) -> list[Worker]:
        return await start_workers(dataclasses.replace(opts, role=role), n, discovery, rt, client=client)

    dep.grow = grow
    for role, n in (("aggregated", workers), ("prefill", prefill_workers), ("decode", decode_workers)):
        if n:
            dep.workers += await grow(role, n)
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            await dep.frontend.registry.ready.wait()
    except TimeoutError:
        await dep.stop(grace_s=0)
        raise RuntimeError(f"the frontend did not see a usable worker within {READY_TIMEOUT_S:.0f} s "
                           "(the log says why)") from None
    return dep


def _fleet_runtime(runtime: RuntimeConfig | None, discovery_dir: Path | None, cluster_token: str | None,
                   host: str | None = None) -> Runtime:
    """A process of a fleet: ``runtime``, or (the older keywords) file discovery in ``discovery_dir``."""
    if runtime is None:
        if discovery_dir is None:
            raise TypeError("give runtime= (or discovery_dir=)")
        runtime = RuntimeConfig.build(f"file://{discovery_dir}", cluster_token=cluster_token, host=host)
    if runtime.inproc:
        raise ValueError("mem:// discovery is one process's: a fleet of processes needs file:// or etcd://")
    return Runtime(runtime)


async def start_frontend(*, runtime: RuntimeConfig | None = None, frontend: FrontendConfig | None = None,
                         discovery_dir: Path | None = None, cluster_token: str | None = None,
                         stall_timeout_s: float | None = None) -> Deployment:
    """A frontend finding workers through ``runtime``'s discovery (``stall_timeout_s`` overrides
    its request-plane stall timeout)."""
    frontend = frontend or FrontendConfig()
    rt = _fleet_runtime(runtime, discovery_dir, cluster_token)
    discovery = await rt.discovery()
    fe = Frontend(frontend, discovery=discovery, client=rt.client(stall_timeout_s=stall_timeout_s),
                  subscriber=rt.subscriber())
    dep = Deployment(frontend=fe, discovery=discovery, runtime=rt, drain_timeout_s=frontend.drain_timeout_s)
    try:
        await fe.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await dep.stop(grace_s=0)
        raise
    return dep


async def start_worker_process(opts: WorkerOptions, *, runtime: RuntimeConfig | None = None, num_workers: int = 1,
                               discovery_dir: Path | None = None, cluster_token: str | None = None,
                               drain_timeout_s: float = 30.0) -> Deployment:
    """``num_workers`` workers registered in ``runtime``'s discovery."""
    rt = _fleet_runtime(runtime, discovery_dir, cluster_token, host=opts.host)
    discovery = await rt.discovery()
    client = rt.client()
    dep = Deployment(discovery=discovery, runtime=rt, drain_timeout_s=drain_timeout_s, clients=[client])

    async def grow(role: str, n: int) -> list[Worker]:
        return await start_workers(dataclasses.replace(opts, role=role), n, discovery, rt, client=client)

    dep.grow = grow
    try:
        dep.workers += await grow(opts.role, num_workers)
    except BaseException:
        with contextlib.suppress(Exception):
            await dep.stop(grace_s=0)
        raise
    return dep


__all__ = [
    "Deployment", "EventPublisher", "EventSubscriber", "Runtime", "RuntimeConfig", "WorkerOptions",
    "default_model_dir", "fleet_token", "start_all_in_one", "start_frontend", "start_worker_process",
    "wait_for_signal",
]
