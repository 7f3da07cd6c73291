"""Write a local HF-format model directory: no downloads, no torch.

    <directory>/
      config.json             Llama/Qwen3-style architecture (from a preset)
      tokenizer.json          byte-level BPE trained here on local text (tokenizer_trainer.py)
      tokenizer_config.json   bos/eos tokens, model_max_length, Llama-3-style chat_template
      generation_config.json  eos_token_id = [<|end_of_text|>, <|eot_id|>]

Tests, the mocker and benchmarks get a real tokenizer and chat template without network
access. Weights go through the `write_weights` hook; by default ("auto") random-weight
safetensors are written by turbine.model_maker.weights when torch is installed (the `engine`
extra) and skipped with a note on stderr otherwise, so this module itself never imports torch.

`main(argv)` is the command-line entry point: DIR [--preset tiny] [--overwrite].
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from turbine.model_maker.presets import PRESETS, ModelPreset, get_preset
from turbine.model_maker.tokenizer_trainer import (
    BEGIN_OF_TEXT,
    END_OF_TEXT,
    EOT,
    SPECIAL_TOKENS,
    build_tokenizer_json,
    special_token_ids,
)

# Called as write_weights(directory, config) after every other file is written.
WeightWriter = Callable[[Path, dict[str, Any]], None]

MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")

# Llama 3 layout: BOS once, then one header-delimited block per message.
LLAMA3_CHAT_TEMPLATE = r"""{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant', 'tool', 'ipython'] %}
        {{- raise_exception('unsupported message role: ' + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
    {{- (message['content'] or '') | trim }}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""


def make_model(
    directory: str | os.PathLike[str],
    preset: str | ModelPreset = "tiny",
    *,
    overwrite: bool = False,
    write_weights: WeightWriter | Literal["auto"] | None = "auto",
) -> Path:
    """Write the model directory for `preset` and return its path.

    Output is deterministic: the same preset on the same Python installation gives
    byte-identical files. A non-empty existing directory is refused unless `overwrite`, which
    rewrites the files listed in MODEL_FILES and leaves any other file in place.
    `write_weights`, when given, is called last as write_weights(directory, config); "auto"
    writes random weights (seed 0) when torch is importable and prints a note otherwise; None
    writes no weights.
    """
    spec = get_preset(preset) if isinstance(preset, str) else preset
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} is not empty; pass overwrite=True to rewrite it")
    path.mkdir(parents=True, exist_ok=True)

    ids = special_token_ids(spec.vocab_size)
    config = model_config(spec)
    tokenizer_json = build_tokenizer_json(
        spec.vocab_size,
        trained_vocab_size=spec.trained_vocab_size,
        corpus_bytes=spec.corpus_bytes,
    )
    _write(path / "tokenizer.json", tokenizer_json)
    _write_json(path / "tokenizer_config.json", _tokenizer_config(spec, ids))
    _write_json(
        path / "generation_config.json",
        {"bos_token_id": ids[BEGIN_OF_TEXT], "eos_token_id": [ids[END_OF_TEXT], ids[EOT]]},
    )
    _write_json(path / "config.json", config)
    if write_weights == "auto":
        write_weights = _default_weight_writer()
    if write_weights is not None:
        write_weights(path, config)
    return path


def _default_weight_writer() -> WeightWriter | None:
    try:
        from turbine.model_maker.weights import write_random_weights
    except ModuleNotFoundError as e:
        if e.name not in ("torch", "safetensors"):
            raise
        print(f"note: {e.name} is not installed, so no weights were written (config and tokenizer "
              "only); install turbine[engine] for random-weight safetensors", file=sys.stderr)
        return None
    return lambda directory, config: write_random_weights(directory, config)


def model_config(spec: ModelPreset) -> dict[str, Any]:
    """config.json contents for a preset (HF key names)."""
    ids = special_token_ids(spec.vocab_size)
    return {
        "architectures": [spec.architecture],
        "model_type": spec.model_type,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "rope_theta": spec.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": spec.rms_norm_eps,
        "bos_token_id": ids[BEGIN_OF_TEXT],
        "eos_token_id": ids[EOT],
        "tie_word_embeddings": spec.tie_word_embeddings,
        "torch_dtype": spec.torch_dtype,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        **spec.extra_config,
    }


def _tokenizer_config(spec: ModelPreset, ids: dict[str, int]) -> dict[str, Any]:
    added = {
        str(ids[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    return {
        "added_tokens_decoder": added,
        "bos_token": BEGIN_OF_TEXT,
        "eos_token": EOT,
        "chat_template": LLAMA3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": spec.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def _write_json(path: Path, obj: Any) -> None:
    _write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _write(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    print(make_model(args.directory, args.preset, overwrite=args.overwrite))


if __name__ == "__main__":
    main()
