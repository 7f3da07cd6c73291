"""A profile records the tensor-parallel layout it was measured at, in the form the planner's
performance model reads (meta "parallel", as its own predicted profiles write it)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from turbine.engine.builtin_config import BuiltinConfig
from turbine.planner.perf_model import Parallel, profile_parallel
from turbine.profiler.command import builtin_meta


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_builtin_meta_names_the_layout(tp: int) -> None:
    core = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32,
                           config=BuiltinConfig(tensor_parallel_size=tp))
    meta = builtin_meta(core, "/models/tiny")
    assert (meta["tensor_parallel_size"], meta["parallel"], meta["gpus"]) == (tp, f"TP{tp}", tp)
    assert profile_parallel({"meta": meta}) == Parallel(tp=tp)
