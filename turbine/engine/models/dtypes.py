"""The one table from dtype names to torch dtypes (the loader, the runner, the model maker and
the CUDA-IPC transfer all read it). Names and aliases are ``config.py``'s, which torch-free code
(sizing, the mocker, the planner) uses without this module."""
from __future__ import annotations

from typing import Any

import torch

from turbine.engine.models.config import DTYPE_BYTES, dtype_name

__all__ = ["DTYPES", "torch_dtype"]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
assert DTYPES.keys() == DTYPE_BYTES.keys()


def torch_dtype(value: Any) -> torch.dtype:
    """A supported torch dtype, or its name or alias ("bf16", "torch.float16") -> the torch dtype;
    anything else is a ValueError naming the supported ones."""
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise ValueError(f"dtype {value} is not supported; use one of {', '.join(DTYPES)}")
        return value
    return DTYPES[dtype_name(value)]
