"""What one worker asks a cluster scheduler for: GPUs, from its engine and parallel layout; and
what each Ray actor asks Ray for (`RayPlacement`, no Ray import here).

Shared by the Kubernetes manifests (``nvidia.com/gpu``) and the Ray actors (``num_gpus``), so the
two agree: the mocker needs none; the built-in engine its ``--tensor-parallel-size`` (none with
``--device cpu``); a vLLM worker its tensor x pipeline parallel size (vLLM runs those ranks inside
the worker's GPUs).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

_TP = ("--tensor-parallel-size", "-tp")
_PP = ("--pipeline-parallel-size", "-pp")


def _flag_int(args: Sequence[str], names: Sequence[str]) -> int | None:
    """The last value of any of ``names`` in ``args`` (``--f N`` or ``--f=N``), as an int."""
    value = None
    for i, tok in enumerate(args):
        for name in names:
            if tok == name and i + 1 < len(args):
                value = args[i + 1]
            elif tok.startswith(name + "="):
                value = tok.split("=", 1)[1]
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{names[0]} {value!r} is not an integer") from None
    if n < 1:
        raise ValueError(f"{names[0]} must be at least 1")
    return n


def worker_gpus(engine: str, args: Sequence[str] = ()) -> int:
    """GPUs one worker of ``engine`` started with ``args`` (its command-line options) uses."""
    if engine == "mock":
        return 0
    if engine == "builtin":
        device = None
        for i, tok in enumerate(args):
            if tok == "--device" and i + 1 < len(args):
                device = args[i + 1]
            elif tok.startswith("--device="):
                device = tok.split("=", 1)[1]
        return 0 if device == "cpu" else (_flag_int(args, _TP) or 1)
    if engine == "vllm":
        return (_flag_int(args, _TP) or 1) * (_flag_int(args, _PP) or 1)
    raise ValueError(f"unknown engine {engine!r}")


@dataclass(frozen=True)
class RayPlacement:
    """What each actor asks Ray for, and how Ray keeps it alive."""

    num_gpus: float | None = None  # per worker; None: from the engine and its parallel layout
    num_cpus: float = 1.0  # per worker and for the frontend
    max_restarts: int = -1  # per actor; -1: restart it whenever its process dies
    start_timeout_s: float = 600.0  # an actor scheduled and serving (a model load included)

    def __post_init__(self) -> None:
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ValueError("--ray-num-gpus must be >= 0")
        if self.num_cpus < 0:
            raise ValueError("--ray-num-cpus must be >= 0")
        if self.max_restarts < -1:
            raise ValueError("--ray-max-restarts must be >= -1 (-1: always)")
        if self.start_timeout_s <= 0:
            raise ValueError("the start timeout must be > 0")


__all__ = ["RayPlacement", "worker_gpus"]
