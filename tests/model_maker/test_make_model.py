from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from turbine.model_maker import MODEL_FILES, PRESETS, SPECIAL_TOKENS, get_preset, make_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny"), write_weights=None)  # weights: tests/engine_models


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny / "tokenizer.json"))


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_writes_hf_layout(tiny: Path) -> None:
    assert sorted(p.name for p in tiny.iterdir()) == sorted(MODEL_FILES)
    config = _json(tiny / "config.json")
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["num_attention_heads"] * config["head_dim"] == config["hidden_size"]
    assert config["num_attention_heads"] % config["num_key_value_heads"] == 0
    assert config["max_position_embeddings"] == 4096
    assert config["vocab_size"] == 4096


def test_config_vocab_equals_tokenizer_vocab_and_special_ids(
    tiny: Path, tiny_tokenizer: Tokenizer
) -> None:
    config = _json(tiny / "config.json")
    assert tiny_tokenizer.get_vocab_size(with_added_tokens=True) == config["vocab_size"]
    ids = {t: tiny_tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    assert config["bos_token_id"] == ids["<|begin_of_text|>"]
    assert config["eos_token_id"] == ids["<|eot_id|>"]
    gen = _json(tiny / "generation_config.json")
    assert gen["eos_token_id"] == [ids["<|end_of_text|>"], ids["<|eot_id|>"]]
    specials = {i for i, t in tiny_tokenizer.get_added_tokens_decoder().items() if t.special}
    assert specials == set(ids.values())
    tok_config = _json(tiny / "tokenizer_config.json")
    assert tok_config["bos_token"] == "<|begin_of_text|>"
    assert tok_config["eos_token"] == "<|eot_id|>"
    assert tok_config["model_max_length"] == 4096
    added = tok_config["added_tokens_decoder"].values()
    assert {v["content"] for v in added} == set(SPECIAL_TOKENS)


def test_encode_prepends_bos_and_specials_are_atomic(tiny_tokenizer: Tokenizer) -> None:
    bos = tiny_tokenizer.token_to_id("<|begin_of_text|>")
    eot = tiny_tokenizer.token_to_id("<|eot_id|>")
    assert tiny_tokenizer.encode("def f(): pass").ids[0] == bos
    assert bos not in tiny_tokenizer.encode("def f(): pass", add_special_tokens=False).ids
    ids = tiny_tokenizer.encode("x<|eot_id|>y", add_special_tokens=False).ids
    assert eot in ids
    assert tiny_tokenizer.decode(ids, skip_special_tokens=False) == "x<|eot_id|>y"
    assert tiny_tokenizer.decode(ids) == "xy"


def test_learned_merges_compress_python_source(tiny_tokenizer: Tokenizer) -> None:
    text = "def __init__(self, name):\n        return self.name\n"
    assert len(tiny_tokenizer.encode(text, add_special_tokens=False).ids) < len(text) / 2


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_every_text_round_trips(tiny_tokenizer: Tokenizer, text: str) -> None:
    ids = tiny_tokenizer.encode(text, add_special_tokens=False).ids
    assert tiny_tokenizer.decode(ids, skip_special_tokens=False) == text


def _byte_chars() -> list[str]:
    # GPT-2 byte-to-unicode map used by ByteLevel.
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


_BYTE_CHARS = _byte_chars()


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=64))
def test_every_byte_sequence_round_trips(tiny_tokenizer: Tokenizer, data: bytes) -> None:
    # Byte tokens cover all 256 values, so any byte string has an id sequence; decode must
    # reproduce it exactly (lossy only where the bytes are not UTF-8 to begin with).
    byte_ids = [tiny_tokenizer.token_to_id(_BYTE_CHARS[b]) for b in data]
    assert tiny_tokenizer.decode(byte_ids) == data.decode("utf-8", errors="replace")


def test_every_id_decodes_to_text(tiny_tokenizer: Tokenizer) -> None:
    vocab_size = tiny_tokenizer.get_vocab_size(with_added_tokens=True)
    for token_id in range(vocab_size):
        assert tiny_tokenizer.decode([token_id], skip_special_tokens=False), token_id


def test_chat_template_renders_llama3_layout(tiny: Path) -> None:
    from turbine.frontend.chat_template import compile_chat_template

    template = compile_chat_template(_json(tiny / "tokenizer_config.json")["chat_template"])
    text = template.render(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "}],
        add_generation_prompt=True,
        bos_token="<|begin_of_text|>",
    )
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def _digest(directory: Path) -> dict[str, str]:
    return {n: hashlib.sha256((directory / n).read_bytes()).hexdigest() for n in MODEL_FILES}


def test_output_is_byte_identical_across_processes(tiny: Path, tmp_path: Path) -> None:
    # A fresh interpreter: nothing memoized, different hash seed.
    code = "import sys; from turbine.model_maker import make_model; make_model(sys.argv[1], write_weights=None)"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "again")], check=True, timeout=60)
    assert _digest(tmp_path / "again") == _digest(tiny)


def test_refuses_non_empty_directory_unless_overwrite(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("user file")
    with pytest.raises(FileExistsError):
        make_model(tmp_path)
    make_model(tmp_path, overwrite=True)
    assert (tmp_path / "keep.txt").read_text() == "user file"
    assert (tmp_path / "config.json").is_file()
    with pytest.raises(ValueError, match="unknown model preset"):
        make_model(tmp_path / "other", "gpt-9")


def test_write_weights_hook_gets_directory_and_config(tmp_path: Path) -> None:
    calls = []
    path = make_model(tmp_path / "m", write_weights=lambda d, cfg: calls.append((d, cfg)))
    assert calls == [(path, _json(path / "config.json"))]


REAL_SHAPES = {
    "qwen3-0.6b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=1024,
                       intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       max_position_embeddings=40960, tie_word_embeddings=True),
    "llama3-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256,
                      max_position_embeddings=8192, tie_word_embeddings=False),
}


@pytest.mark.parametrize("name", sorted(REAL_SHAPES))
def test_real_presets_have_real_shapes_and_matching_vocab(name: str, tmp_path: Path) -> None:
    path = make_model(tmp_path, name, write_weights=None)  # 16 GB of llama3-8b weights: not in a unit test
    config = _json(path / "config.json")
    for key, value in REAL_SHAPES[name].items():
        assert config[key] == value, key
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert tok.get_vocab_size(with_added_tokens=True) == config["vocab_size"]
    assert tok.id_to_token(config["bos_token_id"]) == "<|begin_of_text|>"
    # The highest non-special ids are filler merges: still real text.
    assert tok.decode([config["vocab_size"] - len(SPECIAL_TOKENS) - 1]).strip()
    text = "print('héllo, 世界 🎉')"
    assert tok.decode(tok.encode(text).ids) == text


def test_presets_are_data() -> None:
    assert set(PRESETS) == {"tiny", "qwen3-0.6b", "llama3-8b"}
    assert get_preset("tiny").head_dim == 32  # vLLM's CPU attention needs head_dim >= 32
