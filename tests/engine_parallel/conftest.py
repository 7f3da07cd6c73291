"""Fixtures of the tensor-parallel tests (torch optional: without it they are skipped)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

if importlib.util.find_spec("torch") is None:  # the engine extra is not installed
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def tp_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tp_models import SHAPES, write_model

    root = tmp_path_factory.mktemp("tp-models")
    return {name: write_model(root / name, name, seed=i + 3) for i, name in enumerate(SHAPES)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    """Tiny models in one intra-op thread: a second one only spins against the ranks' processes
    on a small machine (each rank process takes its share of the cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
