from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, processors

from turbine.frontend.chat_template import ChatTemplateError
from turbine.frontend.tokenizer import TurbineTokenizer
from turbine.model_maker import make_model

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tok(tiny_dir: Path) -> TurbineTokenizer:
    return TurbineTokenizer.from_dir(tiny_dir)


def _write(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj), encoding="utf-8")


def test_loads_made_model(tok: TurbineTokenizer) -> None:
    assert tok.vocab_size == 4096
    assert tok.bos_token == "<|begin_of_text|>"
    assert tok.bos_token_id == tok.token_to_id("<|begin_of_text|>")
    eot, end = tok.token_to_id("<|eot_id|>"), tok.token_to_id("<|end_of_text|>")
    assert tok.eos_token_id == eot
    assert tok.eos_token_ids == (eot, end)  # tokenizer_config first, then generation_config
    assert tok.special_token_ids == frozenset(range(4091, 4096))
    assert tok.model_max_length == 4096
    assert tok.max_position_embeddings == 4096
    assert tok.chat_template is not None and "start_header_id" in tok.chat_template


def test_encode_decode(tok: TurbineTokenizer) -> None:
    ids = tok.encode("héllo wörld 🎉")
    assert ids[0] == tok.bos_token_id
    assert tok.encode("héllo wörld 🎉", add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == "héllo wörld 🎉"
    assert tok.decode(ids, skip_special_tokens=False) == "<|begin_of_text|>héllo wörld 🎉"
    assert tok.encode_batch(["a b", "print(x)"]) == [tok.encode("a b"), tok.encode("print(x)")]
    assert tok.id_to_token(tok.bos_token_id) == "<|begin_of_text|>"


def test_chat_prompt_has_exactly_one_bos(tok: TurbineTokenizer) -> None:
    text = tok.apply_chat_template(CHAT)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok.encode_chat(CHAT)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=False) == text
    no_prompt = tok.apply_chat_template(CHAT, add_generation_prompt=False)
    assert no_prompt.endswith("Hello<|eot_id|>")


def test_template_errors_are_value_errors(tok: TurbineTokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="unsupported message role"):
        tok.apply_chat_template([{"role": "wizard", "content": "x"}])
    assert issubclass(ChatTemplateError, ValueError)


def test_kwargs_reach_template_and_override_specials(tok: TurbineTokenizer) -> None:
    template = "{{ bos_token }}|{{ flavour }}|{{ messages | length }}"
    assert tok.apply_chat_template(CHAT, chat_template=template, flavour="x") == (
        "<|begin_of_text|>|x|2"
    )
    assert tok.apply_chat_template(CHAT, chat_template=template, bos_token="B", flavour="y") == (
        "B|y|2"
    )


@pytest.fixture(scope="module")
def qwen_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2.5/3 layout: no BOS, ChatML specials, AddedToken dicts, named templates."""
    root = tmp_path_factory.mktemp("qwen")
    base = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    base.add_special_tokens(
        [AddedToken(t, special=True, normalized=False)
         for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
    )
    base.add_tokens([AddedToken("<think>", special=False, normalized=False)])
    base.post_processor = processors.ByteLevel(trim_offsets=False)
    base.save(str(root / "tokenizer.json"))
    chatml = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    _write(root / "tokenizer_config.json", {
        "bos_token": None,
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
        "pad_token": {"content": "<|endoftext|>"},
        "model_max_length": 1e30,
        "chat_template": [
            {"name": "default", "template": chatml},
            {"name": "tool_use", "template": "TOOLS {{ tools | tojson }}"},
        ],
    })
    _write(root / "generation_config.json", {"eos_token_id": [4098, 4096]})
    _write(root / "config.json", {"eos_token_id": 4096, "bos_token_id": 4096,
                                  "max_position_embeddings": 32768})
    return root


def test_loads_qwen_layout(qwen_dir: Path) -> None:
    tok = TurbineTokenizer.from_dir(qwen_dir)
    assert tok.vocab_size == 4100
    assert tok.bos_token is None and tok.bos_token_id is None
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 4098
    assert tok.eos_token_ids == (4098, 4096)
    assert tok.special_token_ids == frozenset(range(4091, 4099))  # "<think>" is not special
    assert tok.model_max_length is None
    assert tok.max_position_embeddings == 32768
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)
    assert tok.decode(tok.encode("<think>x")) == "<think>x"


def test_named_templates_and_tool_use_selection(qwen_dir: Path) -> None:
    tok = TurbineTokenizer.from_dir(qwen_dir)
    assert set(tok.chat_templates) == {"default", "tool_use"}
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert "{{" not in text  # bos_token=None must not render as "None" either
    tools = [{"type": "function", "function": {"name": "f", "description": "é"}}]
    assert tok.apply_chat_template(CHAT, tools=tools) == "TOOLS " + json.dumps(
        tools, ensure_ascii=False
    )
    assert tok.apply_chat_template(CHAT, chat_template="tool_use", tools=None) == "TOOLS null"
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == tok.token_to_id("<|im_start|>")


def test_chat_template_jinja_file_wins(tiny_dir: Path, tmp_path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_dir / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text("FILE {{ messages[0].content }}")
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "rag.jinja").write_text("RAG")
    tok = TurbineTokenizer.from_dir(tmp_path)
    assert tok.chat_template == "FILE {{ messages[0].content }}"
    assert tok.apply_chat_template(CHAT) == "FILE Be brief."
    assert tok.apply_chat_template(CHAT, chat_template="rag") == "RAG"


def test_no_template_is_a_request_error(tiny_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((tiny_dir / "tokenizer.json").read_bytes())
    tok = TurbineTokenizer.from_dir(tmp_path)
    assert tok.chat_template is None and tok.bos_token_id is None and tok.eos_token_ids == ()
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template(CHAT)


def test_broken_template_fails_at_load(tiny_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((tiny_dir / "tokenizer.json").read_bytes())
    _write(tmp_path / "tokenizer_config.json", {"chat_template": "{% for %}"})
    with pytest.raises(ValueError, match="invalid chat template"):
        TurbineTokenizer.from_dir(tmp_path)


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        TurbineTokenizer.from_dir(tmp_path)


def test_llama_tokenizer_class_honours_add_eos_token(tiny_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((tiny_dir / "tokenizer.json").read_bytes())
    _write(tmp_path / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizerFast", "add_bos_token": True, "add_eos_token": True,
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
    })
    tok = TurbineTokenizer.from_dir(tmp_path)
    ids = tok.encode("hi")
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.encode("hi", add_special_tokens=False) == ids[1:-1]
