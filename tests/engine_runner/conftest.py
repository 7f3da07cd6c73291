"""Fixtures of the built-in engine tests (torch is optional: without it they are skipped)."""
from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("torch") is None:  # the engine extra is not installed
    collect_ignore_glob = ["test_*.py"]
else:
    from runner_toys import ToyConfig, ToyLM

    from turbine.engine.builtin_core import BuiltinConfig, BuiltinCore


@pytest.fixture(scope="session")
def toy_model() -> ToyLM:
    return ToyLM(ToyConfig()).eval()


@pytest.fixture
def make_core(toy_model: ToyLM):  # type: ignore[no-untyped-def]
    def make(**kw: object) -> BuiltinCore:
        kw.setdefault("device", "cpu")
        kw.setdefault("block_size", 4)
        kw.setdefault("num_gpu_blocks", 256)
        return BuiltinCore(toy_model, toy_model.cfg, BuiltinConfig(**kw))  # type: ignore[arg-type]

    return make


@pytest.fixture(scope="session")
def real_tiny_dir(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The model maker's tiny Llama with weights of std 0.2: at the default 0.02 its greedy output
    just repeats the last prompt token, which would hide attention bugs."""
    from turbine.model_maker.make_model import make_model
    from turbine.model_maker.weights import write_random_weights

    return make_model(tmp_path_factory.mktemp("models") / "tiny-std02", preset="tiny",
                      write_weights=lambda d, c: write_random_weights(d, c, std=0.2))
