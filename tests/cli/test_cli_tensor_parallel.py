"""`--tensor-parallel-size`: the built-in engine's config, and vLLM's own flag under --engine vllm."""
from __future__ import annotations

from pathlib import Path

import pytest

from turbine.cli import _parse, _worker_options


@pytest.mark.parametrize("cmd", [["serve"], ["worker", "--discovery-dir", "/tmp/unused-d"]])
def test_builtin_engine_gets_the_size(cmd: list[str], tmp_path: Path) -> None:
    opts = _worker_options(_parse([*cmd, "--engine", "builtin", "--model", str(tmp_path), "--tensor-parallel-size", "2"]))
    assert opts.builtin.tensor_parallel_size == 2
    assert _worker_options(_parse([*cmd, "--engine", "builtin", "--model", str(tmp_path)])).builtin.tensor_parallel_size == 1


def test_a_size_below_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="tensor_parallel_size"):
        _worker_options(_parse(["serve", "--engine", "builtin", "--model", str(tmp_path), "--tensor-parallel-size", "0"]))


def test_vllm_receives_its_own_flag(tmp_path: Path) -> None:
    opts = _worker_options(_parse(["worker", "--discovery-dir", "/tmp/unused-d", "--engine", "vllm", "--model",
                                   str(tmp_path), "--tensor-parallel-size", "4"]))
    args = opts.vllm.engine_args
    assert args[args.index("--tensor-parallel-size") + 1] == "4"
