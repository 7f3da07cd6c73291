"""Assemble the deployment shapes from parts: all-in-one ``serve``, ``frontend``, ``worker``.

Keeping assembly here (not in the CLI) lets tests start the same shapes in-process.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from turbine.adapters.vllm_args import VllmOptions
from turbine.frontend.service import Frontend, RouterConfig
from turbine.engine.base import Engine
from turbine.frontend.tokenizer import TurbineTokenizer
from turbine.mocker.engine import MockEngine, MockerConfig
from turbine.protocols.model_card import ModelCard
from turbine.runtime.discovery import Discovery, MemoryDiscovery, MemoryStore, make_discovery
from turbine.runtime.events import (
    EventPublisher,
    EventSubscriber,
    InProcEventBus,
    ZmqEventPublisher,
    ZmqEventSubscriber,
)
from turbine.runtime.inproc import InProcClient, InProcServer
from turbine.runtime.tcp import TcpClient, TcpServer
from turbine.worker.worker import Worker

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


@dataclass
class BuiltinOptions:
    """Settings of the built-in PyTorch engine (kept torch-free here; the engine imports torch)."""

    device: str | None = None  # None: CUDA when available, else CPU
    dtype: str | None = None  # None: bf16 on CUDA, float32 on CPU
    block_size: int = 16
    num_gpu_blocks: int | None = None  # None: sized from free memory
    gpu_memory_utilization: float = 0.85
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192


ENGINES = ("mock", "builtin", "vllm")


@dataclass
class WorkerOptions:
    model_dir: Path
    model_name: str | None = None
    engine: str = "mock"
    mocker: MockerConfig = field(default_factory=MockerConfig)
    builtin: BuiltinOptions = field(default_factory=BuiltinOptions)
    vllm: VllmOptions = field(default_factory=VllmOptions)
    host: str = "127.0.0.1"
    context_length: int | None = None  # None: the model's max_position_embeddings


def model_context_length(model_dir: Path, fallback: int) -> int:
    cfg = model_dir / "config.json"
    if cfg.exists():
        with contextlib.suppress(ValueError, OSError):
            return int(json.loads(cfg.read_text()).get("max_position_embeddings") or fallback)
    return fallback


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
                     context_length=ctx, engine="mock")
    return engine, card


def _build_builtin(opts: WorkerOptions, name: str) -> tuple[Engine, ModelCard]:
    try:
        from turbine.engine.builtin_engine import BuiltinEngine  # torch is imported only here
    except ImportError as e:
        raise SystemExit(f"turbine: the builtin engine needs the engine extra (pip install 'turbine[engine]'): {e}") \
            from None
    b = opts.builtin
    try:
        engine = BuiltinEngine(opts.model_dir, device=b.device, dtype=b.dtype, block_size=b.block_size,
                               num_gpu_blocks=b.num_gpu_blocks, gpu_memory_utilization=b.gpu_memory_utilization,
                               max_num_seqs=b.max_num_seqs, max_num_batched_tokens=b.max_num_batched_tokens,
                               context_length=opts.context_length)
    except (ValueError, RuntimeError, OSError) as e:
        raise SystemExit(f"turbine: cannot start the builtin engine on {opts.model_dir}: {e}") from None
    card = ModelCard(model_name=name, tokenizer_source=str(opts.model_dir), block_size=engine.block_size,
                     total_kv_blocks=engine.num_kv_blocks, max_num_seqs=engine.max_num_seqs,
                     context_length=engine.context_length, engine="builtin")
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


def _terminate_self(err: BaseException) -> None:
    """A dead engine ends its process the orderly way: it leaves discovery, its requests migrate."""
    log.error("engine failure (%r): stopping this process", err)
    os.kill(os.getpid(), signal.SIGTERM)


async def start_workers(opts: WorkerOptions, n: int, discovery: Discovery, *, inproc: bool,
                        bus: InProcEventBus | None = None) -> list[Worker]:
    tokenizer = await asyncio.to_thread(TurbineTokenizer.from_dir, opts.model_dir)
    workers = []
    for _ in range(n):
        engine, card = await asyncio.to_thread(build_engine, opts, tokenizer)
        if inproc:
            assert bus is not None
            server, publisher = InProcServer(), bus.publisher()
        else:
            server, publisher = TcpServer(host=opts.host), ZmqEventPublisher(host=opts.host)
        w = Worker(engine, card, discovery=discovery, server=server, publisher=publisher)
        await w.start()
        workers.append(w)
    return workers


async def wait_for_signal() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


@dataclass
class Deployment:
    """Everything one process runs; ``stop`` tears it down in the reverse order."""

    frontend: Frontend | None = None
    workers: list[Worker] = field(default_factory=list)
    discovery: Discovery | None = None

    async def stop(self) -> None:
        for w in self.workers:
            with contextlib.suppress(Exception):
                await w.stop()
        if self.frontend is not None:
            await self.frontend.stop()
        if self.discovery is not None:
            with contextlib.suppress(Exception):
                await self.discovery.close()


async def start_all_in_one(opts: WorkerOptions, *, workers: int, host: str, port: int,
                           router: RouterConfig | None = None, max_inflight: int = 0,
                           request_timeout_s: float | None = None) -> Deployment:
    """Frontend, router and ``workers`` workers in this process, on embedded discovery."""
    store = MemoryStore()
    bus = InProcEventBus()
    dep = Deployment(discovery=MemoryDiscovery(store))
    subscriber = bus.subscriber()
    dep.frontend = Frontend(discovery=MemoryDiscovery(store), client=InProcClient(), subscriber=subscriber,
                            host=host, port=port, router=router, max_inflight=max_inflight,
                            request_timeout_s=request_timeout_s)
    await dep.frontend.start()
    dep.workers = await start_workers(opts, workers, dep.discovery, inproc=True, bus=bus)
    await dep.frontend.registry.ready.wait()
    return dep


async def start_frontend(*, discovery_dir: Path, host: str, port: int, router: RouterConfig | None = None,
                         max_inflight: int = 0, reuse_port: bool = False,
                         request_timeout_s: float | None = None) -> Deployment:
    discovery = make_discovery("file", discovery_dir)
    fe = Frontend(discovery=discovery, client=TcpClient(), subscriber=ZmqEventSubscriber(),
                  host=host, port=port, router=router, max_inflight=max_inflight, reuse_port=reuse_port,
                  request_timeout_s=request_timeout_s)
    await fe.start()
    return Deployment(frontend=fe, discovery=discovery)


async def start_worker_process(opts: WorkerOptions, *, discovery_dir: Path, num_workers: int = 1) -> Deployment:
    discovery = make_discovery("file", discovery_dir)
    workers = await start_workers(opts, num_workers, discovery, inproc=False)
    return Deployment(workers=workers, discovery=discovery)


__all__ = [
    "Deployment", "EventPublisher", "EventSubscriber", "WorkerOptions", "default_model_dir", "start_all_in_one",
    "start_frontend", "start_worker_process", "wait_for_signal",
]
