"""Load an HF-format checkpoint directory into a Turbine model, straight onto its device.

    config.json ─▶ ModelConfig ─▶ model built on "meta" (no memory) ─▶ names and shapes checked
    against the safetensors headers ─▶ to_empty(device) in the target dtype ─▶ shard by shard,
    tensor by tensor: read, cast, copy into its (possibly fused) parameter rows

Peak host memory is one tensor, not the checkpoint; an 8B model never allocates random fp32
weights first. Every tensor name, shape and count is validated before a byte is copied, so a
bad checkpoint fails fast with the offending names.

Tied embeddings: with ``tie_word_embeddings`` the model has no lm_head and a stray
``lm_head.weight`` in the checkpoint is ignored; an untied config whose checkpoint lacks
``lm_head.weight`` gets a copy of ``embed_tokens`` (logged).

Tensor parallelism (``tp``): the model is rank r's shard (models/parallel.py) and the layout
names the rows or columns of each tensor the rank holds; they are read with safetensors'
``get_slice``, so a rank reads its slice's bytes only (names and whole shapes are checked as at
TP=1). Rows no tensor fills (the last vocabulary shard's padding) are zeros.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from safetensors import safe_open
from torch import nn

from turbine.engine.models import ModelConfig, model_class
from turbine.engine.models.dtypes import torch_dtype

if TYPE_CHECKING:
    from turbine.engine.models.llama import ParamSlice
    from turbine.engine.models.parallel import Collectives

__all__ = ["LoadedModel", "checkpoint_files", "load_model", "resolve_dtype"]

log = logging.getLogger(__name__)

_INDEX = "model.safetensors.index.json"
_LM_HEAD = "lm_head.weight"
_EMBED = "model.embed_tokens.weight"


class LoadedModel(NamedTuple):
    model: nn.Module  # a CausalLM (attention_api), in eval mode, no grads, on `device` in `dtype`
    config: ModelConfig


def resolve_dtype(dtype: torch.dtype | str | None, config: ModelConfig) -> torch.dtype:
    """None -> the checkpoint's dtype; a name ("bfloat16", "bf16") or a torch.dtype of the three supported."""
    return torch_dtype(config.torch_dtype if dtype is None else dtype)


def checkpoint_files(model_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (from the index, else every *.safetensors)."""
    path = Path(model_dir)
    index = path / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index ({e!r})") from None
        files = {name: path / file for name, file in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise FileNotFoundError(f"{index} names {f.name}, which is missing")
        return files
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        other = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {', '.join(sorted(other)[:3])}: only safetensors is supported)" if other else ""
        raise FileNotFoundError(f"no *.safetensors weights in {path}{hint}")
    files: dict[str, Path] = {}
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if name in files:
                    raise ValueError(f"tensor {name!r} appears in both {files[name].name} and {shard.name}")
                files[name] = shard
    return files


def load_model(
    model_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    tp: Collectives | None = None,
) -> LoadedModel:
    """Build the model for ``model_dir``'s architecture and load its weights onto ``device``.

    ``dtype`` None keeps the checkpoint's dtype; otherwise every tensor is cast while copying.
    ``tp``: load tensor-parallel rank ``tp.rank``'s shard only (a group, or a ``Shard``).
    Raises ValueError for an unsupported architecture or config, and for missing, unexpected or
    wrongly shaped tensors; FileNotFoundError when there is no config or no safetensors.
    """
    config = ModelConfig.from_dir(model_dir)
    cls = model_class(config.architecture)
    target_dtype = resolve_dtype(dtype, config)
    device = torch.device(device)
    files = checkpoint_files(model_dir)

    with torch.device("meta"):
        model = cls(config) if tp is None else cls(config, tp=tp)
    model.to(target_dtype)
    plan = _plan(model.checkpoint_layout(), files, config)
    _check_shapes(model.checkpoint_layout(), plan, Path(model_dir))

    model.to_empty(device=device)
    model.rotary.to(device)
    layout = model.checkpoint_layout()  # to_empty made new parameters
    with torch.no_grad():
        _zero_uncovered(layout)
        for shard in sorted(set(plan.values())):
            with safe_open(shard, framework="pt", device="cpu") as f:
                for name in (n for n, s in plan.items() if s == shard):
                    dst = layout[name]
                    if dst.rows:
                        dst.param.narrow(0, dst.offset, dst.rows).copy_(dst.read(f, name))
        if _LM_HEAD in layout and _LM_HEAD not in plan:
            log.warning("%s: no %s in the checkpoint; using a copy of %s", model_dir, _LM_HEAD, _EMBED)
            layout[_LM_HEAD].param.copy_(layout[_EMBED].param)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model, config)


def _zero_uncovered(layout: dict[str, ParamSlice]) -> None:
    """Zero the parameters whose rows no checkpoint tensor fills completely (to_empty leaves
    garbage; a tensor-parallel vocabulary shard is padded)."""
    rows: dict[int, int] = {}
    params = {}
    for s in layout.values():
        rows[id(s.param)] = rows.get(id(s.param), 0) + s.rows
        params[id(s.param)] = s.param
    for key, param in params.items():
        if rows[key] < param.shape[0]:
            param.zero_()


def _plan(layout: dict[str, ParamSlice], files: dict[str, Path], config: ModelConfig) -> dict[str, Path]:
    """Which file each expected tensor comes from; raises on missing or unexpected names."""
    present = set(files)
    ignored = {n for n in present if n.endswith("rotary_emb.inv_freq")}  # old Llama saves
    if config.tie_word_embeddings:
        ignored.add(_LM_HEAD)
    expected = set(layout)
    missing = expected - present
    if _LM_HEAD in missing and _EMBED in present:
        missing.discard(_LM_HEAD)  # untied but absent: copied from the embeddings
    unexpected = present - expected - ignored
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s) ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s) ({_few(unexpected)})")
        raise ValueError(f"checkpoint does not match {config.architecture}: " + "; ".join(parts))
    return {name: files[name] for name in layout if name in present}


def _check_shapes(layout: dict[str, ParamSlice], plan: dict[str, Path], model_dir: Path) -> None:
    bad: list[str] = []
    for shard in sorted(set(plan.values())):
        with safe_open(shard, framework="pt") as f:
            for name in (n for n, s in plan.items() if s == shard):
                shape = tuple(f.get_slice(name).get_shape())
                if shape != layout[name].shape:
                    bad.append(f"{name}: checkpoint {list(shape)}, model expects {list(layout[name].shape)}")
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ValueError(f"{model_dir}: tensor shape mismatch: " + "; ".join(bad[:5]) + more)


def _few(names: Iterable[str], n: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")
