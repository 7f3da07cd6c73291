from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors import safe_open

from turbine.engine.loader import load_model
from turbine.engine.models import ModelConfig, checkpoint_shapes
from turbine.engine.models.dense_attention import greedy_generate
from turbine.model_maker import MODEL_FILES, make_model
from turbine.model_maker.weights import write_random_weights

CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
          "intermediate_size": 192, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
          "vocab_size": 300, "max_position_embeddings": 512, "tie_word_embeddings": False,
          "torch_dtype": "bfloat16"}


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            out.update({name: st.get_tensor(name) for name in st.keys()})  # noqa: SIM118 (not a dict)
    return out


def _digest(paths: list[Path]) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def test_names_shapes_and_dtype_follow_the_config(tmp_path: Path) -> None:
    files = write_random_weights(tmp_path, CONFIG, device="cpu")
    assert files == [tmp_path / "model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    tensors = _tensors(tmp_path)
    assert {n: tuple(t.shape) for n, t in tensors.items()} == checkpoint_shapes(ModelConfig.from_dict(CONFIG))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def test_values_are_scaled_for_unit_activations(tmp_path: Path) -> None:
    write_random_weights(tmp_path, {**CONFIG, "torch_dtype": "float32"}, device="cpu")
    t = _tensors(tmp_path)
    assert abs(t["model.layers.0.mlp.down_proj.weight"].std().item() - 192 ** -0.5) < 0.01
    assert abs(t["lm_head.weight"].std().item() - 64 ** -0.5) < 0.01
    assert abs(t["model.embed_tokens.weight"].std().item() - 0.02) < 0.002
    norm = t["model.layers.2.post_attention_layernorm.weight"]
    assert abs(norm.mean().item() - 1.0) < 0.01 and 0 < norm.std().item() < 0.05
    assert t["model.layers.0.self_attn.q_proj.bias"].abs().max().item() < 0.2
    write_random_weights(tmp_path, {**CONFIG, "torch_dtype": "float32"}, device="cpu", std=0.5)
    assert abs(_tensors(tmp_path)["model.layers.0.mlp.down_proj.weight"].std().item() - 0.5) < 0.02


def test_deterministic_per_seed(tmp_path: Path) -> None:
    a = write_random_weights(tmp_path / "a", CONFIG, seed=5, device="cpu")
    b = write_random_weights(tmp_path / "b", CONFIG, seed=5, device="cpu")
    c = write_random_weights(tmp_path / "c", CONFIG, seed=6, device="cpu")
    assert _digest(a) == _digest(b) != _digest(c)
    # Tensors of the same shape still differ from each other.
    t = _tensors(tmp_path / "a")
    assert not torch.equal(t["model.layers.0.mlp.gate_proj.weight"], t["model.layers.0.mlp.up_proj.weight"])


def test_sharding_writes_an_hf_index_and_the_same_tensors(tmp_path: Path) -> None:
    limit = 50_000
    files = write_random_weights(tmp_path / "s", CONFIG, device="cpu", shard_size_bytes=limit)
    n = len(files)
    assert n > 3 and [f.name for f in files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    sharded = _tensors(tmp_path / "s")
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sharded.values())
    assert set(index["weight_map"]) == set(sharded) and set(index["weight_map"].values()) == {f.name for f in files}
    for f in files:
        with safe_open(f, framework="pt") as st:
            names = list(st.keys())
            sizes = [st.get_tensor(k).numel() * 2 for k in names]
        assert sum(sizes) <= limit or len(sizes) == 1  # only a tensor larger than a shard stands alone
        assert all(index["weight_map"][k] == f.name for k in names)
    write_random_weights(tmp_path / "w", CONFIG, device="cpu")
    whole = _tensors(tmp_path / "w")
    assert sharded.keys() == whole.keys() and all(torch.equal(sharded[k], whole[k]) for k in whole)
    # Rewriting unsharded over a sharded checkpoint leaves no stale shard or index behind.
    write_random_weights(tmp_path / "s", CONFIG, device="cpu")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["model.safetensors"]


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shard_size_bytes"):
        write_random_weights(tmp_path, CONFIG, shard_size_bytes=0)
    with pytest.raises(ValueError, match="unsupported architecture"):
        write_random_weights(tmp_path, {**CONFIG, "architectures": ["BertModel"]})


def test_make_model_writes_loadable_weights_by_default(tmp_path: Path) -> None:
    path = make_model(tmp_path / "tiny")
    assert sorted(p.name for p in path.iterdir()) == sorted([*MODEL_FILES, "model.safetensors"])
    model, cfg = load_model(path)
    assert cfg.head_dim == 32 and cfg.tie_word_embeddings
    out = greedy_generate(model, [cfg.bos_token_id, 10, 20, 30], 8)
    assert len(out) == 8 and all(0 <= t < cfg.vocab_size for t in out)
    bare = make_model(tmp_path / "bare", write_weights=None)
    assert sorted(p.name for p in bare.iterdir()) == sorted(MODEL_FILES)


def test_make_model_without_torch_skips_weights_with_a_note(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['torch'] = None\n"
            "from turbine.model_maker import make_model; make_model(sys.argv[1])")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True, check=False,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "torch is not installed" in out.stderr and "no weights" in out.stderr
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted(MODEL_FILES)
