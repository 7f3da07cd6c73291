"""`turbine worker --engine vllm`: Turbine's flags translated, everything else handed to vLLM's parser."""
from __future__ import annotations

from pathlib import Path

import pytest

from turbine.adapters.vllm_args import given_flags, vllm_argv
from turbine.cli import _parse, _worker_options


def worker_argv(tmp_path: Path, *rest: str) -> list[str]:
    return ["worker", "--engine", "vllm", "--model", str(tmp_path), "--discovery-dir", str(tmp_path / "d"), *rest]


def test_unknown_args_and_everything_after_dashdash_go_to_vllm(tmp_path: Path) -> None:
    args = _parse(worker_argv(tmp_path, "--block-size", "32", "--enforce-eager", "--max-model-len=512",
                              "--max-num-seqs", "256", "--vllm-metrics-port", "0", "--", "--dtype", "auto"))
    opts = _worker_options(args)
    assert opts.engine == "vllm" and opts.vllm.metrics_port == 0
    # typed Turbine flags are translated (even at Turbine's default value); untyped ones are not
    assert opts.vllm.engine_args == ["--block-size", "32", "--max-num-seqs", "256", "--enforce-eager",
                                     "--max-model-len=512", "--dtype", "auto"]


def test_shared_flags_map_to_vllms_names(tmp_path: Path) -> None:
    args = _parse(worker_argv(tmp_path, "--num-gpu-blocks", "100", "--context-length", "256",
                              "--gpu-memory-utilization", "0.5", "--dtype=float32"))
    assert _worker_options(args).vllm.engine_args == [
        "--num-gpu-blocks-override", "100", "--max-model-len", "256", "--gpu-memory-utilization", "0.5",
        "--dtype", "float32"]  # in the order typed


def test_other_engines_still_reject_unknown_args(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        _parse(["worker", "--engine", "mock", "--model", str(tmp_path), "--discovery-dir", "d", "--enforce-eager"])


@pytest.mark.parametrize("bad, message", [
    (["--device", "cpu"], "--device"),
    (["--speedup-ratio=2"], "--speedup-ratio"),
    (["--mock-async-scheduling", "on"], "--mock-async-scheduling"),
    (["--", "--kv-events-config", "{}"], "--kv-events-config"),
    (["--", "--model", "x"], "--model"),
])
def test_flags_that_cannot_apply_are_refused(tmp_path: Path, bad: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        _worker_options(_parse(worker_argv(tmp_path, *bad)))


def test_given_flags_stops_at_dashdash() -> None:
    assert given_flags(["--block-size", "8", "--", "--dtype", "x"], ["--block-size", "--dtype"]) == ["--block-size"]
    assert vllm_argv({"--block-size": 8}, ["--block-size"], ["--", "--block-size", "16"]) == \
        ["--block-size", "8", "--block-size", "16"]  # the vLLM-aimed flag comes last: it wins


def test_vllms_own_parser_takes_the_passthrough(tmp_path: Path) -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'turbine[vllm]')")
    from turbine.adapters.vllm_args import parse_engine_args

    ea = parse_engine_args(tmp_path, ["--block-size", "32", "--enforce-eager", "--max-num-seqs", "7"])
    assert (ea.model, ea.block_size, ea.enforce_eager, ea.max_num_seqs) == (str(tmp_path), 32, True, 7)
    with pytest.raises(ValueError, match="unknown vLLM engine arguments"):
        parse_engine_args(tmp_path, ["--no-such-flag"])


def test_turbine_never_imports_vllm_by_itself() -> None:
    import subprocess
    import sys

    code = ("import sys, turbine.adapters as a, turbine.cli, turbine.launch; "
            "assert sorted(a.__all__) == ['BlockMirror', 'KvEventRelay', 'VllmEngine', 'VllmOptions'], a.__all__; "
            "assert not [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
