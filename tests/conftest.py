"""Shared fixtures: a generated tiny model, and Turbine servers running on a background loop."""
from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from testkit import ServerThread


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from turbine.model_maker.make_model import make_model

    return make_model(tmp_path_factory.mktemp("models") / "tiny-test", preset="tiny")


@pytest.fixture(scope="session")
def weighted_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with random weights (for the built-in engine; needs torch)."""
    pytest.importorskip("torch")
    from turbine.model_maker.make_model import make_model

    path = make_model(tmp_path_factory.mktemp("models") / "tiny-weights", preset="tiny")
    assert (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists()
    return path


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ServerThread]:
    with ServerThread(model_dir, workers=2, speedup=50.0) as s:
        yield s


@pytest.fixture(scope="session")
def server_factory() -> type[ServerThread]:
    """Start a differently configured server: ``with server_factory(model_dir, workers=1) as s``."""
    return ServerThread


@pytest.fixture
def procs():  # type: ignore[no-untyped-def]
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    for p in started:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# --- a real etcd (Debian's etcd-server, installed on demand: tests/etcdkit.py) ----------------
@pytest.fixture(scope="session")
def etcd_bin() -> str:
    from etcdkit import etcd_binary

    path, why = etcd_binary()
    if path is None:
        pytest.skip(why)
    return path


@pytest.fixture(scope="session")
def etcd(etcd_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """One etcd for the session; tests keep apart by key prefix (etcd://host:port/<prefix>)."""
    from etcdkit import EtcdServer

    with EtcdServer(etcd_bin, tmp_path_factory.mktemp("etcd") / "data") as server:
        yield server


@pytest.fixture
def etcd_private(etcd_bin: str, tmp_path: Path) -> Iterator:
    """An etcd of this test's own, for tests that kill or restart it."""
    from etcdkit import EtcdServer

    with EtcdServer(etcd_bin, tmp_path / "etcd-data") as server:
        yield server
