from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file

from turbine.engine.loader import checkpoint_files, load_model, resolve_dtype
from turbine.engine.models import SUPPORTED_ARCHITECTURES, ModelConfig, checkpoint_shapes, model_class
from turbine.engine.models.dense_attention import DenseAttention
from turbine.model_maker.weights import write_random_weights

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
          "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
          "vocab_size": 256, "max_position_embeddings": 512, "tie_word_embeddings": False,
          "torch_dtype": "float32"}
ARCH_EXTRAS = {"LlamaForCausalLM": {"attention_bias": True, "mlp_bias": True}, "MistralForCausalLM":
               {"sliding_window": None}, "Qwen2ForCausalLM": {}, "Qwen3ForCausalLM": {"head_dim": 16}}


def _checkpoint(path: Path, **over: Any) -> Path:
    config = {**CONFIG, **over}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    write_random_weights(path, config, seed=1, device="cpu")
    return path


def _logits(model: Any, n: int = 10) -> torch.Tensor:
    ids = torch.arange(n) * 7 % CONFIG["vocab_size"]
    with torch.no_grad():
        return model.compute_logits(model.forward(ids, torch.arange(n), DenseAttention()))


def _rewrite(path: Path, edit: Any) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
@pytest.mark.parametrize("tied", [False, True])
def test_layout_covers_every_parameter_once_and_matches_writer(arch: str, tied: bool) -> None:
    cfg = ModelConfig.from_dict({**CONFIG, "architectures": [arch], "tie_word_embeddings": tied, **ARCH_EXTRAS[arch]})
    with torch.device("meta"):
        model = model_class(arch)(cfg)
    layout = model.checkpoint_layout()
    assert {n: s.shape for n, s in layout.items()} == checkpoint_shapes(cfg)
    covered: dict[int, list[tuple[int, int]]] = {}
    for s in layout.values():
        covered.setdefault(id(s.param), []).append((s.offset, s.offset + s.rows))
    for param in model.parameters():
        spans = sorted(covered.pop(id(param)))
        assert spans[0][0] == 0 and spans[-1][1] == param.shape[0]
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))  # contiguous, no overlap
    assert not covered


def test_sharded_checkpoint_loads_identically(tmp_path: Path) -> None:
    whole = _checkpoint(tmp_path / "whole")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(json.dumps(CONFIG))
    files = write_random_weights(sharded, CONFIG, seed=1, device="cpu", shard_size_bytes=40_000)
    assert len(files) > 3 and (sharded / "model.safetensors.index.json").is_file()
    assert len(set(checkpoint_files(sharded).values())) == len(files)
    a, _ = load_model(whole)
    b, _ = load_model(sharded)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(_logits(a), _logits(b))


def test_unindexed_shards_are_all_read(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:5]}, str(path / "a.safetensors"))
    save_file({n: tensors[n] for n in names[5:]}, str(path / "b.safetensors"))
    (path / "model.safetensors").unlink()
    model, _ = load_model(path)
    assert torch.equal(model.model.embed_tokens.weight, tensors["model.embed_tokens.weight"])


def test_loaded_model_is_on_device_in_dtype_without_grads(tmp_path: Path) -> None:
    model, cfg = load_model(_checkpoint(tmp_path / "m"), device="cpu")
    assert cfg.architecture == "LlamaForCausalLM" and not model.training
    for p in model.parameters():
        assert p.device.type == "cpu" and p.dtype == torch.float32 and not p.requires_grad
    assert _logits(model).dtype == torch.float32


def test_dtype_cast_and_checkpoint_default(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path / "bf16", torch_dtype="bfloat16")
    raw = load_file(path / "model.safetensors")
    assert raw["model.norm.weight"].dtype == torch.bfloat16
    native, _ = load_model(path)
    assert native.model.norm.weight.dtype == torch.bfloat16
    assert torch.equal(native.model.embed_tokens.weight, raw["model.embed_tokens.weight"])
    wide, _ = load_model(path, dtype="float32")
    assert torch.equal(wide.model.embed_tokens.weight, raw["model.embed_tokens.weight"].float())
    half, _ = load_model(path, dtype=torch.float16)
    assert half.lm_head.weight.dtype == torch.float16
    assert (_logits(native).dtype, _logits(half).dtype) == (torch.bfloat16, torch.float16)  # the model dtype
    # The fused q/k/v rows hold the HF tensors in order.
    qkv = wide.model.layers[1].self_attn.qkv_proj.weight
    q, k, v = (raw[f"model.layers.1.self_attn.{n}_proj.weight"].float() for n in "qkv")
    assert torch.equal(qkv, torch.cat([q, k, v]))
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        load_model(path, dtype="int8")
    cfg = ModelConfig.from_dict(CONFIG)
    assert resolve_dtype(None, cfg) == torch.float32 and resolve_dtype("torch.bfloat16", cfg) == torch.bfloat16


def test_tied_embeddings(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path / "tied", tie_word_embeddings=True)
    model, _ = load_model(path)
    assert model.lm_head is None
    hidden = torch.randn(3, CONFIG["hidden_size"])
    torch.testing.assert_close(model.compute_logits(hidden), hidden @ model.model.embed_tokens.weight.T)
    # A tied checkpoint that also saved lm_head.weight: ignored, as transformers does.
    _rewrite(path, lambda t: t.update({"lm_head.weight": torch.zeros(CONFIG["vocab_size"], CONFIG["hidden_size"])}))
    again, _ = load_model(path)
    assert torch.equal(_logits(again), _logits(model))


def test_untied_config_without_lm_head_copies_embeddings(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path / "m")
    _rewrite(path, lambda t: t.pop("lm_head.weight"))
    model, _ = load_model(path)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_old_rotary_buffers_are_ignored(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path / "m")
    _rewrite(path, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(16)}))
    load_model(path)


def test_unknown_architecture_names_the_supported_ones(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path / "m")
    (path / "config.json").write_text(json.dumps({**CONFIG, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError) as e:
        load_model(path)
    message = str(e.value)
    assert "GPT2LMHeadModel" in message and all(name in message for name in SUPPORTED_ARCHITECTURES)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path / "m")
    _rewrite(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"1 missing tensor\(s\) \(model\.layers\.1\.mlp\.up_proj\.weight\)"):
        load_model(path)


def test_unexpected_tensors_are_named(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path / "m")
    _rewrite(path, lambda t: t.update({f"model.layers.{i}.extra.weight": torch.ones(2) for i in range(7)}))
    with pytest.raises(ValueError, match=r"7 unexpected tensor\(s\) \(model\.layers\.0\.extra\.weight, .*, \.\.\.\)"):
        load_model(path)


def test_wrong_shape_is_named_with_both_shapes(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path / "m")
    _rewrite(path, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight: checkpoint \[64, 64\], "
                                         r"model expects \[32, 64\]"):
        load_model(path)


def test_missing_files_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="only safetensors is supported"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        load_model(tmp_path)
