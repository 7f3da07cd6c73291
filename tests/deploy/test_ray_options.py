"""Ray placement without a Ray cluster: Turbine's core never imports ray, the options parse and are
checked, and each engine's workers ask for the GPUs they use (the same for Ray and Kubernetes)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from turbine.cli import _parse
from turbine.deploy.ray_command import fleet_discovery
from turbine.deploy.resources import worker_gpus


def test_core_imports_never_import_ray() -> None:
    code = ("import sys\n"
            "import turbine, turbine.cli, turbine.launch, turbine.planner.planner_command, turbine.deploy.k8s\n"
            "import turbine.deploy.ray_command, turbine.deploy.k8s_command\n"
            "turbine.cli.build_parser()\n"
            "turbine.cli._parse(['serve', '--ray', '--workers', '2'])\n"
            "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_without_the_extra_serve_ray_says_what_to_install() -> None:
    code = ("import sys; sys.modules['ray'] = None\n"  # as if ray were not installed
            "from turbine.cli import main\n"
            "main(['serve', '--ray', '--workers', '1'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "pip install 'turbine[ray]'" in out.stderr, out.stderr


def test_serve_ray_options() -> None:
    a = _parse(["serve", "--workers", "2"])
    assert a.ray is None  # not on Ray
    a = _parse(["serve", "--ray"])
    assert a.ray == "" and a.ray_num_gpus is None and a.ray_max_restarts == -1
    a = _parse(["serve", "--ray", "10.0.0.1:6379", "--ray-num-gpus", "0.5", "--ray-num-cpus", "2"])
    assert (a.ray, a.ray_num_gpus, a.ray_num_cpus) == ("10.0.0.1:6379", 0.5, 2.0)


def test_placement_is_checked() -> None:
    from turbine.deploy.ray_command import placement

    for bad in (["--ray-num-gpus", "-1"], ["--ray-num-cpus", "-1"], ["--ray-max-restarts", "-2"]):
        with pytest.raises(ValueError):
            placement(_parse(["serve", "--ray", *bad]))


def test_actors_share_a_discovery_and_a_token(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("TURBINE_CLUSTER_TOKEN", raising=False)
    url, token = fleet_discovery(_parse(["serve", "--ray"]))  # default: a new directory, a random token
    assert url.startswith("file:///") and len(token) >= 32
    url, token = fleet_discovery(_parse(["serve", "--ray", "--discovery-dir", str(tmp_path), "--cluster-token", "t"]))
    assert (url, token) == (f"file://{tmp_path}", "t")
    monkeypatch.setenv("TURBINE_CLUSTER_TOKEN", "from-env")
    url, token = fleet_discovery(_parse(["serve", "--ray", "--discovery", "etcd://10.0.0.1:2379"]))
    assert (url, token) == ("etcd://10.0.0.1:2379", "from-env")


@pytest.mark.parametrize(("engine", "args", "gpus"), [
    ("mock", [], 0),
    ("builtin", [], 1),
    ("builtin", ["--device", "cpu"], 0),
    ("builtin", ["--device=cuda:1"], 1),
    ("builtin", ["--tensor-parallel-size", "2"], 2),
    ("builtin", ["--device", "cpu", "--tensor-parallel-size", "2"], 0),
    ("vllm", [], 1),
    ("vllm", ["--", "--tensor-parallel-size", "4"], 4),
    ("vllm", ["-tp", "2", "--pipeline-parallel-size=2"], 4),
])
def test_worker_gpus(engine: str, args: list[str], gpus: int) -> None:
    assert worker_gpus(engine, args) == gpus


def test_a_workers_parsed_options_give_its_gpus() -> None:
    pytest.importorskip("ray")
    from turbine.deploy.ray_fleet import engine_gpus

    ns = _parse(["serve", "--engine", "builtin"])
    assert engine_gpus(ns) == 1
    ns.tensor_parallel_size = 2  # --tensor-parallel-size 2
    assert engine_gpus(ns) == 2
    assert engine_gpus(_parse(["serve", "--engine", "builtin", "--device", "cpu"])) == 0
    assert engine_gpus(_parse(["serve"])) == 0


def test_worker_gpus_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        worker_gpus("vllm", ["-tp", "two"])
    with pytest.raises(ValueError):
        worker_gpus("vllm", ["-tp", "0"])
    with pytest.raises(ValueError):
        worker_gpus("tensorrt", [])
