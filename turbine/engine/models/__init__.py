"""Model implementations of the built-in engine and their architecture registry.

Importing this package needs no torch (``ModelConfig`` is read by torch-free code too); the
model classes import torch when ``model_class`` first asks for one.
"""
from __future__ import annotations

from typing import Any

from turbine.engine.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeScaling, checkpoint_shapes

__all__ = ["SUPPORTED_ARCHITECTURES", "ModelConfig", "RopeScaling", "checkpoint_shapes", "model_class"]


def model_class(architecture: str) -> Any:
    """The nn.Module class implementing an HF architecture name (a ``CausalLM``)."""
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    # Mistral, Qwen2 and Qwen3 are configurations of the Llama decoder (config.py derives the switches).
    from turbine.engine.models.llama import LlamaForCausalLM

    return LlamaForCausalLM
