"""The ``turbine`` command: serve, frontend, worker, make-model, bench, simulate, profile, plan, planner, deploy."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from turbine.router.cli_args import add_routing_args


def _add_engine_args(p: argparse.ArgumentParser, *, builtin: bool = True) -> None:
    g = p.add_argument_group("engine (both)")
    g.add_argument("--block-size", type=int, default=None, help="tokens per KV block (mock: 64, builtin: 16)")
    g.add_argument("--num-gpu-blocks", type=int, default=None,
                   help="KV blocks per worker (mock: 16384; builtin: sized from free memory)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="max sequences per batch")
    g.add_argument("--max-num-batched-tokens", type=int, default=8192, help="max tokens per step")
    g.add_argument("--context-length", type=int, default=None,
                   help="max prompt+output tokens (default: the model's max_position_embeddings; "
                   "the mocker may simulate longer contexts than its tokenizer's model)")
    g = p.add_argument_group("mock engine")
    g.add_argument("--speedup-ratio", type=float, default=1.0,
                   help="divide simulated step times by this (1000 = near-zero GPU time)")
    g.add_argument("--profile", default=None, help="measured step-time profile (JSON) instead of the default model")
    g.add_argument("--mock-async-scheduling", default="auto", choices=["auto", "on", "off"],
                   help="schedule one step ahead like an async-scheduling engine (auto: as the profile's engine "
                   "ran; off without a profile, like Dynamo's mocker)")
    g.add_argument("--kv-bytes-per-token", type=int, default=131072,
                   help="disaggregation: KV bytes a token costs, all layers (default: Llama-3.1-8B in bf16)")
    g.add_argument("--transfer-bandwidth", type=float, default=25.0,
                   help="disaggregation: GB/s of the link a decode worker pulls KV over")
    g.add_argument("--transfer-latency", type=float, default=0.0005, help="disaggregation: seconds per pull")
    g = p.add_argument_group("KV tiers below the GPU cache (blocks evicted from it are kept there and "
                             "copied back on a prefix hit)")
    g.add_argument("--host-kv-gb", type=float, default=0.0, help="host memory tier, GB (pinned on CUDA; 0: none)")
    g.add_argument("--disk-kv-gb", type=float, default=0.0,
                   help="disk tier, GB (0: none); a block evicted from host memory goes there once its "
                   "prefix has been seen more than once")
    g.add_argument("--disk-kv-dir", default=None, help="builtin engine: the disk tier's directory")
    g.add_argument("--host-kv-bandwidth", type=float, default=8.5,
                   help="mock engine: GB/s host tier -> GPU when onboarding (default: the built-in engine's on an H200)")
    g.add_argument("--disk-kv-bandwidth", type=float, default=2.0, help="mock engine: GB/s disk tier reads")
    if not builtin:
        return
    g = p.add_argument_group("builtin engine")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights and KV dtype (default: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                   help="fraction of GPU memory for weights + activations + KV cache")
    g.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="split the model over N ranks: GPUs --device..+N-1 (NCCL), or N CPU processes (gloo)")


def _add_model_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--engine", default="mock", choices=["mock", "builtin", "vllm"],
                   help="inference engine: mock = simulated timing; builtin = Turbine's PyTorch engine; "
                   "vllm = vLLM's AsyncLLM (needs the vllm extra; arguments Turbine does not know, and all "
                   "after --, go to vLLM's own parser)")
    p.add_argument("--model", type=Path, required=required, default=None,
                   help="HF-format model directory (tokenizer.json, config.json)"
                   + ("" if required else "; default: a tiny generated model"))
    p.add_argument("--model-name", default=None, help="served model name (default: the directory name)")
    p.add_argument("--kv-transfer", default="auto", choices=["auto", "tcp", "nixl", "cuda_ipc", "inproc"],
                   help="builtin engine, disaggregation: how KV blocks move between workers (auto: in-process in "
                   "one process, CUDA IPC between GPUs of a node, NIXL when installed, else TCP); prefill and "
                   "decode workers must use the same")
    p.add_argument("--load-interval-ms", type=float, default=10.0,
                   help="a worker publishes its load at most this often (and every second regardless); other "
                   "frontends know of a frontend's requests only from it. Fresher routes better; each report "
                   "costs every frontend ~16 us to apply plus its receive, so raise it for fleets of hundreds "
                   "of workers")
    _add_engine_args(p)


def _add_frontend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    add_routing_args(p)
    p.add_argument("--router-queue-size", type=int, default=1024,
                   help="requests that may wait in that queue; beyond it: 503 with Retry-After")
    p.add_argument("--kv-overlap-weight", type=float, default=1.0,
                   help="weight of prefill work (blocks to compute) against decode load in the kv cost")
    p.add_argument("--kv-host-weight", type=float, default=0.8,
                   help="kv routing: a prefix block in a worker's host-memory KV tier counts this much of one "
                   "in its GPU cache (it is copied back, not recomputed)")
    p.add_argument("--kv-disk-weight", type=float, default=0.3, help="kv routing: the same for its disk tier")
    p.add_argument("--max-inflight", type=int, default=0,
                   help="answer 429 beyond this many concurrent requests (0 = bounded by --max-connections only)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take end to end, migrations included, before it is cancelled "
                   "(504); default 600, the OpenAI client's own")
    g = p.add_argument_group("security and limits")
    g.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on the API (repeat for several keys; default: "
                   "$TURBINE_API_KEY if set, else no authentication); /health stays open")
    g.add_argument("--tls-certfile", default=None, help="serve HTTPS with this certificate chain (PEM)")
    g.add_argument("--tls-keyfile", default=None, help="the certificate's private key (PEM)")
    g.add_argument("--max-connections", type=int, default=None,
                   help="client connections (default: the file-descriptor limit less a reserve); at the cap the "
                   "longest-idle keep-alive connection is closed, or the newcomer gets a 503")
    g.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024, help="largest request body (413 beyond)")
    g.add_argument("--keepalive-timeout", type=float, default=30.0, help="seconds an idle connection is kept")
    g.add_argument("--header-timeout", type=float, default=15.0,
                   help="seconds a client has to send a request's headers (408 after)")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM: stop accepting, and give running requests this long to finish")
    g = p.add_argument_group("disaggregated serving (models with prefill and decode workers)")
    g.add_argument("--disagg-min-prefill-tokens", type=int, default=512,
                   help="prompts with fewer uncached tokens (on the chosen decode worker) are prefilled there")
    g.add_argument("--disagg-max-prefill-queue", type=int, default=32768,
                   help="when every prefill worker has this many prompt tokens queued, prefill on the decode worker")
    g.add_argument("--disagg-hold", type=float, default=30.0,
                   help="seconds a prefill worker keeps a prompt's KV for the decode worker's pull, at most")
    p.add_argument("--no-dashboard", action="store_true",
                   help="do not serve the live fleet page at /dashboard/ (it answers 404; the routers keep no decision log)")


def _add_fleet_args(p: argparse.ArgumentParser, *, required: bool = True, planes: bool = False) -> None:
    g = p.add_argument_group("fleet (discovery, the planes' address and token)")
    d = g.add_mutually_exclusive_group(required=required)
    d.add_argument("--discovery", default=None, metavar="URL",
                   help="how the fleet finds itself: file:///DIR (processes of one machine), "
                   "etcd://HOST:2379[,HOST:PORT...][/PREFIX] (machines; leases), mem:// (this process only)"
                   + ("" if required else "; default mem://"))
    d.add_argument("--discovery-dir", type=Path, default=None, help="the same as --discovery file://DIR")
    g.add_argument("--discovery-ttl", type=float, default=None, metavar="S",
                   help="seconds a dead process stays in discovery (file: 3, etcd: 5, the lease's TTL)")
    g.add_argument("--cluster-token", default=None,
                   help="the fleet's shared secret, required by the request and event planes (default: "
                   "$TURBINE_CLUSTER_TOKEN, else with file discovery a token file the first process creates in "
                   "its directory, readable by its user only); a fleet across machines must set it")
    if planes:
        g.add_argument("--advertise-host", default=None, metavar="HOST",
                       help="the address other machines reach this process's request and event planes at, "
                       "published in discovery (default 127.0.0.1: this machine only); the planes bind it too "
                       "unless --host says otherwise")


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False everywhere: a prefix must never stand for an option (`--discovery etcd://`
    # silently meaning `--discovery-dir`).
    parser = argparse.ArgumentParser(prog="turbine", description=__doc__, allow_abbrev=False)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_parser = sub.add_parser

    def add_parser(name: str, **kw):  # type: ignore[no-untyped-def]
        return _add_parser(name, allow_abbrev=False, **kw)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    p = sub.add_parser("serve", help="frontend + router + workers in one process (embedded discovery)")
    _add_model_args(p, required=False)
    _add_frontend_args(p)
    p.add_argument("--workers", type=int, default=None,
                   help="aggregated workers (default 1, or 0 with --prefill-workers/--decode-workers)")
    p.add_argument("--prefill-workers", type=int, default=0, help="prefill workers (disaggregated serving)")
    p.add_argument("--decode-workers", type=int, default=0, help="decode workers (disaggregated serving)")
    p.add_argument("--planner", action="store_true",
                   help="an SLA planner grows and drains this process's workers (needs --profile and the --sla-* "
                   "targets); pools: aggregated, or prefill + decode when those are given")
    from turbine.planner.planner_command import add_planner_args, add_policy_args

    add_policy_args(p)
    _add_fleet_args(p, required=False, planes=True)
    from turbine.deploy.ray_command import add_serve_ray_args

    add_serve_ray_args(p)

    p = sub.add_parser("frontend", help="the HTTP frontend and router, finding workers by discovery")
    _add_frontend_args(p)
    _add_fleet_args(p)
    p.add_argument("--reuse-port", action="store_true", help="SO_REUSEPORT, to run several frontends on one port")
    p.add_argument("--stall-timeout", type=float, default=10.0,
                   help="seconds without a frame from a worker (it pings every second while busy) before its "
                   "streams move to another worker")

    p = sub.add_parser("worker", help="serve a model as worker(s) registered in discovery")
    _add_model_args(p, required=True)
    _add_fleet_args(p, planes=True)
    p.add_argument("--num-workers", type=int, default=1, help="simulated workers in this process (mock engine)")
    p.add_argument("--role", default="agg", choices=["agg", "prefill", "decode"],
                   help="agg: serve requests whole; prefill/decode: one half of a disaggregated model (a model "
                   "with both is served disaggregated; with no prefill worker, decode workers serve whole)")
    p.add_argument("--host", default=None,
                   help="bind address of the request and event planes (default: --advertise-host, else 127.0.0.1)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM: leave discovery, refuse new requests, and give running ones this long")
    p.add_argument("--vllm-metrics-port", type=int, default=None,
                   help="--engine vllm: serve vLLM's own /metrics and /health on this port")
    p.add_argument("--health-port", type=int, default=None,
                   help="serve GET /health (200 once registered, 503 while starting or draining) and GET /live "
                   "on --host:PORT, for probes (Kubernetes)")

    p = sub.add_parser("make-model", help="write an HF-format model directory (tokenizer trained locally)")
    p.add_argument("dir", type=Path)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("bench", help="drive an OpenAI-compatible endpoint and report latencies "
                       "(--trace FILE: replay a Mooncake trace)")
    from turbine.bench.loadgen import add_loadgen_args
    from turbine.bench.replay import add_trace_args

    add_loadgen_args(p)
    add_trace_args(p.add_argument_group("trace replay (with --trace)"))

    p = sub.add_parser("simulate", help="replay a trace through a simulated fleet (router + mocker, virtual clock)")
    from turbine.sim.command import add_simulate_args

    add_simulate_args(p)
    _add_engine_args(p, builtin=False)
    p.set_defaults(block_size=64, num_gpu_blocks=16384)  # the mocker's (Dynamo's) defaults

    p = sub.add_parser("profile", help="measure an engine's step times into a mocker timing profile (JSON, plots)")
    from turbine.profiler.command import add_profile_args

    add_profile_args(p)

    p = sub.add_parser("plan", help="what to deploy for a workload and an SLA: Pareto frontier, recommendation "
                       "checked in the simulator, the commands that start it")
    from turbine.planner.plan_command import add_plan_args

    add_plan_args(p)

    p = sub.add_parser("planner", help="a live SLA planner beside a frontend: sizes the worker pools to the load "
                       "(local processes or Kubernetes)")
    add_planner_args(p)
    from turbine.runtime.tracing import add_tracing_args

    for name in ("serve", "frontend", "worker"):
        add_tracing_args(sub.choices[name])

    p = sub.add_parser("deploy", help="render a fleet for a cluster: `deploy k8s` prints Kubernetes manifests")
    from turbine.deploy.k8s_command import add_deploy_args

    add_deploy_args(p)
    return parser


def _worker_options(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from turbine.engine.builtin_config import BuiltinConfig
    from turbine.launch import WorkerOptions, default_model_dir
    from turbine.mocker.core import ASYNC_SCHEDULING_FLAGS, MockerConfig

    model_dir = args.model if args.model is not None else default_model_dir(weights=args.engine == "builtin")
    if not model_dir.is_dir():
        raise SystemExit(f"turbine: model directory {model_dir} does not exist")
    for name, v in (("--workers", getattr(args, "workers", None) or 1),
                    ("--num-workers", getattr(args, "num_workers", 1)),
                    ("--block-size", args.block_size), ("--num-gpu-blocks", args.num_gpu_blocks),
                    ("--max-num-seqs", args.max_num_seqs), ("--max-num-batched-tokens", args.max_num_batched_tokens)):
        if v is not None and v < 1:
            raise SystemExit(f"turbine: {name} must be at least 1")
    if args.speedup_ratio <= 0:
        raise SystemExit("turbine: --speedup-ratio must be positive")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise SystemExit("turbine: --gpu-memory-utilization must be in (0, 1]")
    if args.context_length is not None and args.context_length < 2:
        raise SystemExit("turbine: --context-length must be at least 2")
    if not 0 < args.load_interval_ms <= 1000:
        raise SystemExit("turbine: --load-interval-ms must be in (0, 1000]")
    shared = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    try:
        mocker = MockerConfig(block_size=args.block_size or 64, num_gpu_blocks=args.num_gpu_blocks or 16384,
                              speedup_ratio=args.speedup_ratio, profile=args.profile,
                              async_scheduling=ASYNC_SCHEDULING_FLAGS[args.mock_async_scheduling],
                              kv_bytes_per_token=args.kv_bytes_per_token,
                              transfer_bandwidth_gbps=args.transfer_bandwidth,
                              transfer_latency_s=args.transfer_latency, host_kv_gb=args.host_kv_gb,
                              disk_kv_gb=args.disk_kv_gb, host_kv_bandwidth_gbps=args.host_kv_bandwidth,
                              disk_kv_bandwidth_gbps=args.disk_kv_bandwidth, **shared)
    except ValueError as e:
        raise SystemExit(f"turbine: {e}") from None
    try:
        builtin = BuiltinConfig(device=args.device, dtype=args.dtype, block_size=args.block_size or 16,
                                num_gpu_blocks=args.num_gpu_blocks, gpu_memory_utilization=args.gpu_memory_utilization,
                                tensor_parallel_size=args.tensor_parallel_size,
                                host_kv_gb=args.host_kv_gb, disk_kv_gb=args.disk_kv_gb, disk_kv_dir=args.disk_kv_dir,
                                **shared)
    except ValueError as e:
        raise SystemExit(f"turbine: {e}") from None
    opts = WorkerOptions(model_dir=model_dir, model_name=args.model_name, engine=args.engine, mocker=mocker,
                         builtin=builtin, host=getattr(args, "host", "127.0.0.1"),
                         context_length=args.context_length, role=getattr(args, "role", "agg"),
                         kv_transfer=args.kv_transfer, load_interval_s=args.load_interval_ms / 1e3)
    if args.engine == "vllm":
        opts.vllm = _vllm_options(args)
        opts.context_length = None  # translated into vLLM's --max-model-len when given
    return opts


# --- --engine vllm: Turbine's engine flags translated, everything else to vLLM's parser ----------
def _vllm_options(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from turbine.adapters.vllm_args import SHARED_FLAGS, VllmOptions, vllm_argv

    values = {flag: getattr(args, flag[2:].replace("-", "_"), None) for flag in SHARED_FLAGS}
    try:
        engine_args = vllm_argv(values, getattr(args, "vllm_given", []), getattr(args, "vllm_extra", []))
    except ValueError as e:
        raise SystemExit(f"turbine: {e}") from None
    port = getattr(args, "vllm_metrics_port", None)
    if port is not None and not 0 <= port < 65536:
        raise SystemExit("turbine: --vllm-metrics-port must be in [0, 65535]")
    return VllmOptions(engine_args=engine_args, metrics_port=port, metrics_host=getattr(args, "host", "127.0.0.1"))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse; with --engine vllm, arguments Turbine does not know are kept for vLLM."""
    parser = build_parser()
    raw = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(raw)
    if extra and getattr(args, "engine", None) != "vllm":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "engine", None) == "vllm":
        from turbine.adapters.vllm_args import FOREIGN_FLAGS, SHARED_FLAGS, given_flags

        args.vllm_extra = extra
        args.vllm_given = given_flags(raw, [*SHARED_FLAGS, *FOREIGN_FLAGS])
    return args


def _runtime_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """How this process joins its fleet (turbine/runtime/config.py), built and checked once. A
    worker's --host is where its planes bind; serve's and a frontend's --host is HTTP's."""
    from turbine.runtime.config import RuntimeConfig

    url = args.discovery or (f"file://{args.discovery_dir}" if args.discovery_dir is not None else "mem://")
    try:
        cfg = RuntimeConfig.build(url, discovery_ttl_s=args.discovery_ttl,
                                  host=args.host if args.cmd == "worker" else None,
                                  advertise_host=getattr(args, "advertise_host", None), cluster_token=args.cluster_token,
                                  stall_timeout_s=getattr(args, "stall_timeout", 10.0))
    except ValueError as e:
        raise SystemExit(f"turbine {args.cmd}: {e}") from None
    if cfg.inproc and args.cmd != "serve":
        raise SystemExit(f"turbine {args.cmd}: mem:// is one process's discovery; a fleet of processes needs "
                         "file:///DIR or etcd://HOST:PORT")
    if args.cmd == "worker":
        args.host = cfg.bind_host  # the health endpoint and vLLM's metrics bind there too
    return cfg


def _frontend_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The frontend's whole configuration, built and validated once."""
    import os

    from turbine.dashboard import DashboardConfig
    from turbine.disagg import DisaggConfig
    from turbine.frontend.http_server import HttpLimits
    from turbine.frontend.service import FrontendConfig

    keys = args.api_key or ([os.environ["TURBINE_API_KEY"]] if os.environ.get("TURBINE_API_KEY") else [])
    try:
        limits = HttpLimits(max_body_bytes=args.max_body_bytes, keepalive_timeout_s=args.keepalive_timeout,
                            header_timeout_s=args.header_timeout, max_connections=args.max_connections)
        disagg = DisaggConfig(min_remote_prefill_tokens=args.disagg_min_prefill_tokens,
                              max_prefill_queue_tokens=args.disagg_max_prefill_queue, hold_s=args.disagg_hold)
        return FrontendConfig(host=args.host, port=args.port, router=_router_config(args), http=limits, disagg=disagg,
                              max_inflight=args.max_inflight, request_timeout_s=args.request_timeout,
                              api_keys=tuple(keys), tls_certfile=args.tls_certfile, tls_keyfile=args.tls_keyfile,
                              reuse_port=getattr(args, "reuse_port", False), drain_timeout_s=args.drain_timeout,
                              dashboard=DashboardConfig(enabled=not args.no_dashboard))
    except ValueError as e:
        raise SystemExit(f"turbine: {e}") from None


def _router_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from turbine.frontend.service import RouterConfig

    if args.router_temperature < 0:
        raise SystemExit("turbine: --router-temperature must be >= 0")
    if args.kv_overlap_weight < 0:
        raise SystemExit("turbine: --kv-overlap-weight must be >= 0")
    if args.router_approx and args.router not in ("kv", "predicted"):
        raise SystemExit("turbine: --router-approx applies to --router kv and predicted only")
    if not (0 <= args.kv_host_weight <= 1 and 0 <= args.kv_disk_weight <= 1):
        raise SystemExit("turbine: --kv-host-weight and --kv-disk-weight must be in [0, 1]")
    if args.router_max_itl_ms < 0 or args.router_max_queued < 0 or args.router_queue_size < 0:
        raise SystemExit("turbine: --router-max-itl-ms, --router-max-queued and --router-queue-size must be >= 0")
    return RouterConfig(policy=args.router, overlap_weight=args.kv_overlap_weight,
                        max_itl_ms=args.router_max_itl_ms, max_queued=args.router_max_queued,
                        queue_size=args.router_queue_size, shared_load=not args.router_own_load_only,
                        temperature=args.router_temperature, approx=args.router_approx,
                        host_tier_weight=args.kv_host_weight, disk_tier_weight=args.kv_disk_weight)


async def _run(args: argparse.Namespace) -> None:
    from turbine import launch
    from turbine.runtime import tracing

    try:  # request traces (OpenTelemetry), when --otlp-endpoint or the OTEL_* environment asks for them
        tracing.configure(service_name="turbine" if args.cmd == "serve" else f"turbine-{args.cmd}",
                          endpoint=args.otlp_endpoint)
    except tracing.TracingUnavailable as e:
        raise SystemExit(f"turbine: {e}") from None
    planner = health = None
    if args.cmd == "serve":
        disagg = args.prefill_workers or args.decode_workers
        workers = args.workers if args.workers is not None else (0 if disagg else 1)
        if min(workers, args.prefill_workers, args.decode_workers) < 0 or not (workers or args.decode_workers):
            raise SystemExit("turbine: serve needs at least one --workers or --decode-workers worker")
        runtime = _runtime_config(args)
        opts, frontend = _worker_options(args), _frontend_config(args)
        if args.planner:
            from turbine.planner.planner_command import planner_config

            try:  # check the planner's options before anything starts
                planner_config(args, "disagg" if disagg else "agg")
            except ValueError as e:
                raise SystemExit(f"turbine: {e}") from None
        if args.ray is not None:
            from turbine.deploy.ray_command import run_serve

            await run_serve(args, workers=workers)
            return
        dep = await launch.start_all_in_one(opts, workers=workers, frontend=frontend, runtime=runtime,
                                            prefill_workers=args.prefill_workers, decode_workers=args.decode_workers)
        assert dep.frontend is not None
        if args.planner:
            planner = await _start_planner(args, dep, "disagg" if disagg else "agg")
        names = ", ".join(m.name for m in dep.frontend.registry.served())
        print(f"Turbine is serving {names} at {dep.frontend.url}/v1  (Ctrl-C to stop)", flush=True)
        if dep.frontend.dashboard is not None:
            print(f"Dashboard at {dep.frontend.url}/dashboard/", flush=True)
    elif args.cmd == "frontend":
        if args.stall_timeout <= 1.0:
            raise SystemExit("turbine: --stall-timeout must exceed the workers' 1 s heartbeat")
        dep = await launch.start_frontend(runtime=_runtime_config(args), frontend=_frontend_config(args))
        assert dep.frontend is not None
        print(f"Turbine frontend at {dep.frontend.url}/v1  (Ctrl-C to stop)", flush=True)
        if dep.frontend.dashboard is not None:
            print(f"Dashboard at {dep.frontend.url}/dashboard/", flush=True)
    else:
        if args.drain_timeout < 0:
            raise SystemExit("turbine: --drain-timeout must be >= 0")
        if args.health_port is not None and not 0 <= args.health_port < 65536:
            raise SystemExit("turbine: --health-port must be in [0, 65535]")
        runtime = _runtime_config(args)
        dep = await launch.start_worker_process(_worker_options(args), runtime=runtime, num_workers=args.num_workers,
                                                drain_timeout_s=args.drain_timeout)
        if args.health_port is not None:
            health = await _start_health(dep, args.host, args.health_port)
        print(f"Turbine worker(s) {', '.join(w.worker_id for w in dep.workers)} ready", flush=True)
    abort = None
    try:
        abort = await launch.wait_for_signal()
    finally:
        if health is not None:
            health.draining = True  # not ready from the signal on
        if planner is not None:
            await planner()
        await dep.stop(abort=abort)
        if health is not None:
            await health.close()


async def _start_health(dep, host: str, port: int):  # type: ignore[no-untyped-def]
    """The worker process's health endpoint (turbine/worker/health.py)."""
    from turbine.worker.health import HealthServer

    health = HealthServer(lambda: dep.workers, host=host, port=port)
    try:
        await health.start()
    except OSError:
        await dep.stop(grace_s=0)
        raise
    return health


async def _start_planner(args: argparse.Namespace, dep, mode: str):  # type: ignore[no-untyped-def]
    """Start `serve --planner`'s planner; returns the coroutine function that stops it."""
    from turbine.planner.planner_command import serve_planner, start_planner

    try:
        runner, connector = serve_planner(args, dep, mode)
    except ValueError as e:
        await dep.stop(grace_s=0)
        raise SystemExit(f"turbine: {e}") from None
    if dep.frontend.dashboard is not None:
        dep.frontend.dashboard.attach_planner(runner)  # its actions and reasons on the page
    return start_planner(runner, connector)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cmd == "make-model":
        from turbine.model_maker.make_model import make_model

        try:
            path = make_model(args.dir, preset=args.preset, overwrite=args.overwrite)
        except (ValueError, FileExistsError) as e:
            raise SystemExit(f"turbine make-model: {e}") from None
        print(f"wrote {path}")
        return
    if args.cmd == "bench":
        if args.trace is not None:
            from turbine.bench.replay import main_from_args as replay_main

            sys.exit(replay_main(args))
        from turbine.bench.loadgen import main_from_args

        sys.exit(main_from_args(args))
    if args.cmd == "simulate":
        from turbine.sim.command import main_from_args as simulate_main

        sys.exit(simulate_main(args))
    if args.cmd == "profile":
        from turbine.profiler.command import main_from_args as profile_main

        sys.exit(profile_main(args))
    if args.cmd == "plan":
        from turbine.planner.plan_command import main_from_args as plan_main

        sys.exit(plan_main(args))
    if args.cmd == "planner":
        from turbine.planner.planner_command import main_from_args as planner_main

        sys.exit(planner_main(args))
    if args.cmd == "deploy":
        from turbine.deploy.k8s_command import main_from_args as deploy_main

        sys.exit(deploy_main(args))
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_run(args))
    except KeyboardInterrupt:
        pass
    except OSError as e:
        raise SystemExit(f"turbine: {e}") from None
    from turbine.launch import engine_failure

    if engine_failure() is not None:  # it drained; exit now, not through a broken process group's teardown
        logging.shutdown()
        os._exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
