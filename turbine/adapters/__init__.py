"""Other engines as Turbine workers. Importing this package never imports the engines themselves:
``VllmEngine`` loads vLLM on first access (install the ``vllm`` extra)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from turbine.adapters.vllm_args import VllmOptions
from turbine.adapters.vllm_kv import BlockMirror, KvEventRelay

if TYPE_CHECKING:
    from turbine.adapters.vllm_engine import VllmEngine

__all__ = ["BlockMirror", "KvEventRelay", "VllmEngine", "VllmOptions"]


def __getattr__(name: str) -> Any:
    if name == "VllmEngine":
        from turbine.adapters.vllm_engine import VllmEngine

        return VllmEngine
    raise AttributeError(f"module 'turbine.adapters' has no attribute {name!r}")
