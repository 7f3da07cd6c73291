"""Benchmarking: a load generator for OpenAI-compatible endpoints and its reports.

Names are imported lazily so `python -m turbine.bench.loadgen` does not import the module twice
(runpy warns when a package's __init__ has already imported the module it is asked to run).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CpuMeter": "cpu",
    "Target": "cpu",
    "parse_pids": "cpu",
    "LoadConfig": "loadgen",
    "add_loadgen_args": "loadgen",
    "main_from_args": "loadgen",
    "run_load": "loadgen",
    "build_prompts": "prompts",
    "LoadReport": "stats",
    "Percentiles": "stats",
    "RequestResult": "stats",
    "format_table": "stats",
    "percentile": "stats",
    "print_table": "stats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'turbine.bench' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"turbine.bench.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
