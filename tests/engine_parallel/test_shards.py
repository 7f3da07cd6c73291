"""Each rank's shard of a checkpoint, loaded without a process group: the slices of the whole
model it should hold, read through ``get_slice`` (no rank reads another's rows)."""
from __future__ import annotations

from pathlib import Path
from typing import Self

import pytest
import torch
from tp_models import SHAPES

from turbine.engine.loader import load_model
from turbine.engine.models import ModelConfig
from turbine.engine.models.parallel import Shard, TPShape


def _cat(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    return torch.cat(parts, dim=dim)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_two_shards_are_the_whole_model(tp_models: dict[str, Path], name: str) -> None:
    whole, cfg = load_model(tp_models[name])
    shards = [load_model(tp_models[name], tp=Shard(r, 2))[0] for r in range(2)]
    w = dict(whole.named_parameters())
    s = [dict(m.named_parameters()) for m in shards]
    d, heads, kv_heads, inter = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        qkv = w[p + "self_attn.qkv_proj.weight"]
        q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d])
        local = [sh[p + "self_attn.qkv_proj.weight"] for sh in s]
        hl = heads // 2 * d
        assert torch.equal(_cat([t[:hl] for t in local]), q)
        if kv_heads >= 2:  # split
            kl = kv_heads // 2 * d
            assert torch.equal(_cat([t[hl:hl + kl] for t in local]), k)
            assert torch.equal(_cat([t[hl + kl:] for t in local]), v)
        else:  # one KV head, replicated on both ranks
            for t in local:
                assert torch.equal(t[hl:hl + d], k) and torch.equal(t[hl + d:], v)
        if cfg.qkv_bias:
            b = [sh[p + "self_attn.qkv_proj.bias"] for sh in s]
            assert torch.equal(_cat([t[:hl] for t in b]), w[p + "self_attn.qkv_proj.bias"][:heads * d])
        assert torch.equal(_cat([sh[p + "self_attn.o_proj.weight"] for sh in s], dim=1), w[p + "self_attn.o_proj.weight"])
        gate, up = w[p + "mlp.gate_up_proj.weight"].split([inter, inter])
        gu = [sh[p + "mlp.gate_up_proj.weight"] for sh in s]
        assert torch.equal(_cat([t[:inter // 2] for t in gu]), gate)
        assert torch.equal(_cat([t[inter // 2:] for t in gu]), up)
        assert torch.equal(_cat([sh[p + "mlp.down_proj.weight"] for sh in s], dim=1), w[p + "mlp.down_proj.weight"])
        for norm in ("input_layernorm", "post_attention_layernorm") + (
                ("self_attn.q_norm", "self_attn.k_norm") if cfg.qk_norm else ()):
            for sh in s:
                assert torch.equal(sh[p + norm + ".weight"], w[p + norm + ".weight"])
    vocab = cfg.vocab_size
    for key in ["model.embed_tokens.weight"] + ([] if cfg.tie_word_embeddings else ["lm_head.weight"]):
        rows = _cat([sh[key] for sh in s])
        assert rows.shape[0] == 2 * -(-vocab // 2)
        assert torch.equal(rows[:vocab], w[key])
        assert not rows[vocab:].any()  # the padding of an odd vocabulary is zeros


def test_a_rank_reads_only_its_slices(tp_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every split tensor goes through get_slice; only replicated ones (norms) are read whole."""
    from turbine.engine import loader

    whole_reads: list[str] = []
    real_open = loader.safe_open

    class Spy:
        def __init__(self, *a: object, **kw: object) -> None:
            self.f = real_open(*a, **kw)

        def __enter__(self) -> Self:
            self.f.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.__exit__(*exc)

        def get_tensor(self, name: str) -> torch.Tensor:
            whole_reads.append(name)
            return self.f.get_tensor(name)

        def __getattr__(self, attr: str) -> object:
            return getattr(self.f, attr)

    monkeypatch.setattr(loader, "safe_open", Spy)
    load_model(tp_models["qwen3"], tp=Shard(1, 2))
    assert whole_reads and all(n.endswith("norm.weight") for n in whole_reads), whole_reads


def test_splits_are_validated() -> None:
    cfg = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
                                 "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                                 "vocab_size": 300})
    assert [TPShape.of(cfg, r, 4).kv_head_start for r in range(4)] == [0, 0, 1, 1]  # 2 KV heads on 4 ranks
    assert [TPShape.of(cfg, r, 2).kv_head_start for r in range(2)] == [0, 1]
    assert TPShape.of(cfg, 3, 4).num_heads == 1 and TPShape.of(cfg, 3, 4).num_kv_heads == 1
    with pytest.raises(ValueError, match="num_attention_heads"):
        TPShape.of(cfg, 0, 8)
    with pytest.raises(ValueError, match="intermediate_size"):
        TPShape.of(ModelConfig.from_dict({**_raw(cfg), "intermediate_size": 90}), 0, 4)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        TPShape.of(ModelConfig.from_dict({**_raw(cfg), "num_attention_heads": 6, "num_key_value_heads": 3,
                                          "hidden_size": 48}), 0, 2)


def _raw(cfg: ModelConfig) -> dict:
    return {"architectures": [cfg.architecture], "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
            "vocab_size": cfg.vocab_size}
