"""`turbine profile`: measure the built-in engine's step times into a mocker timing profile.

    turbine profile --model DIR --out profile.json --plots plots/ [--quick]

The engine is driven directly through ``BuiltinCore`` (no HTTP, no event loop), so the profile
holds forward + scheduling time only. torch is imported here only when the command runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from turbine.profiler.profile import DEFAULT_GRID, QUICK_GRID, ProfileGrid, Profiler

__all__ = ["add_profile_args", "builtin_meta", "load_builtin_core", "main_from_args", "write_profile"]


def add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="HF-format model directory")
    p.add_argument("--engine", default="builtin", choices=["builtin"], help="the engine to measure")
    p.add_argument("--out", type=Path, required=True, help="profile JSON to write (mocker --profile reads it)")
    p.add_argument("--plots", type=Path, default=None, help="directory for prefill.png and decode.png")
    p.add_argument("--quick", action="store_true", help="a small grid (minutes on CPU become seconds)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per point (median kept)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before each point")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("engine")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights and KV dtype (default: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--num-gpu-blocks", type=int, default=None, help="KV blocks (default: sized from free memory)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    g.add_argument("--max-num-seqs", type=int, default=256, help="largest decode batch measured")
    g.add_argument("--max-num-batched-tokens", type=int, default=16384,
                   help="largest prefill step measured (a serving engine's budget may be smaller)")
    g.add_argument("--context-length", type=int, default=None, help="default: the model's max_position_embeddings")
    g.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="measure the engine split over N ranks (recorded in the profile's meta)")


def load_builtin_core(model: Path, *, device: str | None = None, dtype: str | None = None, block_size: int = 16,
                      num_gpu_blocks: int | None = None, gpu_memory_utilization: float = 0.85,
                      max_num_seqs: int = 256, max_num_batched_tokens: int = 16384,
                      context_length: int | None = None, tensor_parallel_size: int = 1) -> Any:
    """A ``BuiltinCore`` over ``model`` (blocking: loads the weights)."""
    from turbine.engine.builtin_core import BuiltinConfig, BuiltinCore

    config = BuiltinConfig(device=device, dtype=dtype, block_size=block_size, num_gpu_blocks=num_gpu_blocks,
                           gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
                           max_num_batched_tokens=max_num_batched_tokens, context_length=context_length,
                           tensor_parallel_size=tensor_parallel_size)
    return BuiltinCore.load(model, config)


def builtin_meta(core: Any, model: str | os.PathLike[str]) -> dict[str, Any]:
    """What a profile of a ``BuiltinCore`` was measured on (the profile's "meta")."""
    import torch

    dev = core.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    tp = int(getattr(core.config, "tensor_parallel_size", 1))
    # "parallel" and "gpus" as the planner's predicted profiles write them (perf_model.profile_for):
    # the planner anchors its model to the layout a profile was measured at.
    return {"model": Path(model).name, "model_dir": str(model), "engine": "builtin", "device": name,
            "device_type": dev.type, "dtype": str(core.dtype).removeprefix("torch."), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "block_size": core.config.block_size,
            "tensor_parallel_size": tp, "parallel": f"TP{tp}", "gpus": tp}


def builtin_sync(core: Any) -> Any:
    """``torch.cuda.synchronize`` on the core's device, or None on CPU."""
    import torch

    dev = core.device
    return (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else None


def write_profile(path: str | os.PathLike[str], profile: dict[str, Any]) -> Path:
    """Write the profile as JSON for people too: one key per line, one table row per line."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sections = []
    for key in ("version", "meta", "prefill", "decode", "mixed"):
        if key not in profile:
            continue
        value = profile[key]
        if not isinstance(value, dict):
            sections.append(f" {json.dumps(key)}: {json.dumps(value)}")
            continue
        items = []
        for k, v in value.items():
            if k == "ms" and v and isinstance(v[0], list):
                rows = ",\n   ".join(json.dumps(row) for row in v)
                items.append(f"  {json.dumps(k)}: [\n   {rows}\n  ]")
            else:
                items.append(f"  {json.dumps(k)}: {json.dumps(v)}")
        sections.append(f" {json.dumps(key)}: {{\n" + ",\n".join(items) + "\n }")
    text = "{\n" + ",\n".join(sections) + "\n}\n"
    json.loads(text)  # the hand layout must stay valid JSON
    out.write_text(text, encoding="utf-8")
    return out


def main_from_args(a: argparse.Namespace) -> int:
    """Run ``turbine profile``; 0 on success, 2 on bad input."""
    for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "num_gpu_blocks", "repeats", "warmup",
                 "tensor_parallel_size"):
        v = getattr(a, name)
        if v is not None and v < (0 if name == "warmup" else 1):
            print(f"error: --{name.replace('_', '-')} must be at least {0 if name == 'warmup' else 1}", file=sys.stderr)
            return 2
    if not (a.model / "config.json").is_file():
        print(f"error: {a.model} holds no config.json (make one: turbine make-model DIR)", file=sys.stderr)
        return 2
    grid: ProfileGrid = QUICK_GRID if a.quick else DEFAULT_GRID
    import msgspec

    grid = msgspec.structs.replace(grid, repeats=a.repeats or grid.repeats,
                                   warmup=grid.warmup if a.warmup is None else a.warmup)
    try:
        core = load_builtin_core(a.model, device=a.device, dtype=a.dtype, block_size=a.block_size,
                                 num_gpu_blocks=a.num_gpu_blocks, gpu_memory_utilization=a.gpu_memory_utilization,
                                 max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
                                 context_length=a.context_length, tensor_parallel_size=a.tensor_parallel_size)
    except ImportError as e:
        print(f"error: the builtin engine needs the engine extra (pip install 'turbine[engine]'): {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"error: cannot load {a.model}: {e}", file=sys.stderr)
        return 2
    try:
        profile = Profiler(core, grid, sync=builtin_sync(core), progress=not a.no_progress).run()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        core.close()
    profile["meta"] = {**builtin_meta(core, a.model), "grid": "quick" if a.quick else "default", **profile["meta"]}
    path = write_profile(a.out, profile)
    print(f"wrote {path} ({profile['meta']['profile_s']} s of measuring)")
    if a.plots is not None:
        from turbine.profiler.plots import plot_profile

        for line in plot_profile(profile, a.plots):
            print(line)
    return 0
