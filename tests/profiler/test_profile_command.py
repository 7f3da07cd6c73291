"""`turbine profile` on the tiny model (CPU, --quick), and the mocker loading what it wrote."""
from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from turbine.bench.trace import TraceRequest, write_trace
from turbine.cli import main
from turbine.mocker.core import MockerConfig, MockerCore
from turbine.mocker.timing import ProfileTiming

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Two torch threads on a busy two-core machine can thrash; one never does."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def profile_file(model_dir: Path, tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    out = tmp_path_factory.mktemp("profile")
    with pytest.raises(SystemExit) as ex:
        main(["profile", "--model", str(model_dir), "--device", "cpu", "--quick", "--out", str(out / "p.json"),
              "--plots", str(out), "--max-num-batched-tokens", "2048", "--num-gpu-blocks", "2048", "--no-progress"])
    assert ex.value.code == 0
    return out / "p.json"


def test_profile_writes_what_the_mocker_reads(profile_file: Path) -> None:
    data = json.loads(profile_file.read_text())
    meta = data["meta"]
    assert data["version"] == 1 and meta["engine"] == "builtin" and meta["device_type"] == "cpu"
    assert meta["dtype"] == "float32" and meta["block_size"] == 16 and meta["num_kv_blocks"] == 2048
    assert meta["model"] == Path(meta["model_dir"]).name and meta["torch"] == torch.__version__ and meta["date"]
    assert data["prefill"]["new_tokens"] == [16, 128, 1024] and data["prefill"]["cached_tokens"] == [0, 512]
    assert data["decode"]["batch_size"] == [1, 4, 16, 64] and data["decode"]["context_length"] == [128, 1024]
    timing = ProfileTiming.from_file(profile_file)
    for i, n in enumerate(data["prefill"]["new_tokens"]):
        for j, c in enumerate(data["prefill"]["cached_tokens"]):
            assert 0 < timing.prefill_ms(n, c) == data["prefill"]["ms"][i][j]
    for i, b in enumerate(data["decode"]["batch_size"]):
        for j, L in enumerate(data["decode"]["context_length"]):
            assert 0 < timing.decode_ms(b, L) == data["decode"]["ms"][i][j]
    assert meta["mixed"]["points"] and all(p["ms"] > 0 for p in meta["mixed"]["points"])
    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("prefill.png", "decode.png"):
            assert (profile_file.parent / name).read_bytes()[:4] == b"\x89PNG"


def test_mocker_and_simulator_run_on_the_profile(profile_file: Path, tmp_path: Path) -> None:
    core = MockerCore(MockerConfig(block_size=16, num_gpu_blocks=2048, profile=str(profile_file)), vocab_size=4096)
    assert isinstance(core.timing, ProfileTiming)
    trace = tmp_path / "t.jsonl"
    write_trace(trace, [TraceRequest(timestamp_ms=20.0 * i, input_length=200 + 10 * i, output_length=4,
                                     hash_ids=(i % 2, 10 + i, 50 + i, 90 + i)) for i in range(12)])
    out = tmp_path / "sim.json"
    with pytest.raises(SystemExit) as ex:
        main(["simulate", "--trace", str(trace), "--workers", "2", "--profile", str(profile_file), "--block-size", "16",
              "--num-gpu-blocks", "2048", "--json", str(out), "--no-progress"])
    assert ex.value.code == 0
    d = json.loads(out.read_text())
    assert d["requests"] == 12 and d["errors"] == 0 and d["mocker"]["profile"] == str(profile_file)
    assert d["ttft_ms"]["p50"] > 0


def test_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ex:
        main(["profile", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "p.json")])
    assert ex.value.code == 2 and "config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ex:
        main(["profile", "--model", str(tmp_path), "--out", str(tmp_path / "p.json"), "--repeats", "0"])
    assert ex.value.code == 2 and "--repeats" in capsys.readouterr().err
