"""Random-weight safetensors in real HF format, so engines and benchmarks need no downloads.

Names and shapes come from ``checkpoint_shapes`` (the same table the loader is tested
against), values are in the config's ``torch_dtype``. By default a projection ``[out, in]``
(lm_head included) is ``normal(0, 1/sqrt(in))``, so it keeps unit scale at any model size:
attention is neither uniform nor one-hot and greedy decoding wanders instead of repeating one
token (a fixed 0.02 gives a tiny model near-uniform attention and degenerate, bug-hiding
output). Embeddings are ``normal(0, 0.02)``: small next to the layers' outputs in the residual
stream, so a tied model does not just echo its input token. Biases are ``normal(0, 0.02)``,
RMSNorm weights ``1 + normal(0, 0.02)`` (HF initialises them to 1). Each tensor has
its own generator seeded from (seed, name), so the bytes depend only on the seed and the
device type that generated them, never on sharding or order.

Generation runs on ``device`` (CUDA when available: an 8B bf16 checkpoint is seconds of
``randn`` there) one tensor at a time, and a shard is written as soon as it is full, so host
memory holds at most one shard. Larger than ``shard_size_bytes`` -> HF's sharded layout:

    model-00001-of-00003.safetensors ... + model.safetensors.index.json {metadata, weight_map}
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from turbine.engine.models.config import DTYPE_BYTES, ModelConfig, checkpoint_shapes
from turbine.engine.models.dtypes import DTYPES

__all__ = ["DEFAULT_SHARD_SIZE_BYTES", "write_random_weights"]

DEFAULT_SHARD_SIZE_BYTES = 4 << 30
_INDEX = "model.safetensors.index.json"
_SMALL_STD = 0.02  # embeddings, biases, and norm weights around 1


def write_random_weights(
    directory: str | os.PathLike[str],
    config: Mapping[str, Any],
    *,
    seed: int = 0,
    std: float | None = None,
    shard_size_bytes: int = DEFAULT_SHARD_SIZE_BYTES,
    device: torch.device | str | None = None,
) -> list[Path]:
    """Write random weights for the ``config.json`` dict ``config``; return the files written.

    ``std`` None: the scaled init above; a number: that std for every tensor (HF-style
    ``initializer_range``), norms still centred on 1.

    Earlier weights in ``directory`` (model*.safetensors and the index) are removed first, so a
    re-sharded rewrite leaves no stale shard for a loader to pick up.
    """
    if std is not None and std < 0:
        raise ValueError(f"std must be non-negative, got {std}")
    if shard_size_bytes <= 0:
        raise ValueError(f"shard_size_bytes must be positive, got {shard_size_bytes}")
    cfg = ModelConfig.from_dict(config)
    dtype = DTYPES[cfg.torch_dtype]
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    for old in [*path.glob("model*.safetensors"), path / _INDEX]:
        old.unlink(missing_ok=True)

    shards = _group(checkpoint_shapes(cfg), DTYPE_BYTES[cfg.torch_dtype], shard_size_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map: dict[str, str] = {}
    total = 0
    for file_name, shard in zip(names, shards):
        tensors = {name: _random(name, shape, seed, std, dtype, dev) for name, shape in shard.items()}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        _save(tensors, path / file_name)
        weight_map.update(dict.fromkeys(tensors, file_name))
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        tmp = path / f".{_INDEX}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path / _INDEX)
    return [path / n for n in names]


def _group(shapes: dict[str, tuple[int, ...]], itemsize: int, limit: int) -> list[dict[str, tuple[int, ...]]]:
    """Consecutive tensors into shards of at most ``limit`` bytes (a bigger tensor goes alone)."""
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, shape in shapes.items():
        nbytes = itemsize * _numel(shape)
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += nbytes
    return shards


def _random(name: str, shape: tuple[int, ...], seed: int, std: float | None, dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
    if std is None:
        std = shape[-1] ** -0.5 if len(shape) == 2 and name != "model.embed_tokens.weight" else _SMALL_STD
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    gen = torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1)
    t = torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(std)
    if name.endswith("norm.weight"):
        t.add_(1.0)
    return t.cpu()


def _save(tensors: dict[str, torch.Tensor], target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, target)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
