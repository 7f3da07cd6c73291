"""Write local HF-format model directories (config + trained tokenizer + chat template).

No downloads and no torch: see make_model.py for the directory layout and presets.py for the
model shapes.
"""
from __future__ import annotations

from turbine.model_maker.make_model import MODEL_FILES, WeightWriter, make_model, model_config
from turbine.model_maker.presets import PRESETS, ModelPreset, get_preset
from turbine.model_maker.tokenizer_trainer import SPECIAL_TOKENS, build_tokenizer_json

__all__ = [
    "MODEL_FILES",
    "PRESETS",
    "SPECIAL_TOKENS",
    "ModelPreset",
    "WeightWriter",
    "build_tokenizer_json",
    "get_preset",
    "make_model",
    "model_config",
]
