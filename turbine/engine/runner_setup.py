"""One rank's device side, built the same way wherever it runs: device and dtype, the KV cache's
shape and size, the runner and its CUDA graphs.

``BuiltinCore`` builds rank 0's (the only one at TP=1) and every other tensor-parallel rank
builds its own with the same functions (parallel/rank.py), so the ranks' caches, graph buckets
and start-up collectives (the CUDA memory-profiling forward, the graph captures) are the same
on every rank and happen in the same order:

    resolve_device ─▶ load the model (its shard) ─▶ kv_spec ─▶ local_num_blocks
        (the ranks agree on the smallest) ─▶ build_runner: KVCache, ModelRunner, graphs
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from turbine.engine.attention_api import CausalLM
from turbine.engine.kv_cache import (
    CPU_DEFAULT_BYTES,
    CPU_DEFAULT_MAX_TOKENS,
    KVCache,
    KVCacheSpec,
    num_blocks_for_bytes,
)
from turbine.engine.model_runner import ModelRunner, profile_activation_bytes
from turbine.engine.models.dtypes import torch_dtype

if TYPE_CHECKING:
    from turbine.engine.builtin_config import BuiltinConfig
    from turbine.engine.parallel.group import TPGroup

__all__ = ["build_runner", "kv_spec", "local_heads", "local_num_blocks", "piecewise_tokens",
           "rank_device", "resolve_device", "uses_graphs"]



def resolve_device(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """The device and compute dtype a config asks for (auto: CUDA + bf16, else CPU + fp32)."""
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    if dtype is not None:
        return dev, torch_dtype(dtype)
    return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32


def rank_device(device: torch.device, rank: int, size: int) -> torch.device:
    """Tensor-parallel rank ``rank``'s device: ``cuda:K`` (or ``cuda``, K = 0) gives ranks
    ``cuda:K .. cuda:K+size-1``; CPU ranks all run on the CPU."""
    if device.type != "cuda":
        return device
    base = device.index or 0
    if base + size > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size {size} from {device} needs GPUs {base}..{base + size - 1}, "
                         f"but {torch.cuda.device_count()} are visible")
    return torch.device("cuda", base + rank)


def local_heads(model_config: Any, tp: TPGroup | None) -> tuple[int, int]:
    """(query heads, KV heads) this rank computes (all of them without tensor parallelism)."""
    if tp is None or tp.size == 1:
        return int(model_config.num_attention_heads), int(model_config.num_key_value_heads)
    from turbine.engine.models.parallel import TPShape

    shard = TPShape.of(model_config, tp.rank, tp.size)
    return shard.num_heads, shard.num_kv_heads


def kv_spec(model_config: Any, config: BuiltinConfig, dtype: torch.dtype, tp: TPGroup | None) -> KVCacheSpec:
    """This rank's KV cache shape: its KV heads only."""
    return KVCacheSpec(num_layers=int(model_config.num_hidden_layers), num_kv_heads=local_heads(model_config, tp)[1],
                       head_dim=int(model_config.head_dim), block_size=config.block_size, dtype=dtype)


def uses_graphs(config: BuiltinConfig, device: torch.device) -> bool:
    return config.cuda_graphs and device.type == "cuda"


def piecewise_tokens(config: BuiltinConfig, device: torch.device) -> int:
    """The largest step the piecewise graphs cover (0: none)."""
    return min(config.piecewise_graph_tokens, config.max_num_batched_tokens) if uses_graphs(config, device) else 0


def local_num_blocks(model: CausalLM, spec: KVCacheSpec, config: BuiltinConfig, device: torch.device,
                     vocab_size: int) -> int:
    """The KV blocks this rank has room for: ``num_gpu_blocks`` when set; on CUDA
    ``total x gpu_memory_utilization - memory in use - activation peak`` (a profiling forward:
    a collective one under tensor parallelism, so every rank runs it); on CPU a fixed budget."""
    if config.num_gpu_blocks:
        return config.num_gpu_blocks
    if device.type != "cuda":
        tokens = min(CPU_DEFAULT_BYTES // spec.bytes_per_token, CPU_DEFAULT_MAX_TOKENS)
        return max(1, tokens // spec.block_size)
    peak = profile_activation_bytes(model, num_tokens=config.max_num_batched_tokens,
                                    num_seqs=config.max_num_seqs, vocab_size=vocab_size, device=device)
    # gpu_memory_utilization is this engine's share of the device (several engines may share
    # one GPU, as a prefill and a decode worker do): what this process holds counts against it,
    # what other processes hold only limits it through the free memory.
    free, total = torch.cuda.mem_get_info(device)
    own = torch.cuda.memory_reserved(device)
    budget = min(total * config.gpu_memory_utilization - own, free - (1 << 30)) - peak
    if config.cuda_graphs:  # the graphs' logits (model dtype) at the largest batch, and the pad block
        logit_bytes = next(model.parameters()).element_size()
        budget -= config.max_num_seqs * vocab_size * logit_bytes + spec.bytes_per_block
        # the piecewise graphs' pool holds a step's activations at their largest bucket
        budget -= peak * piecewise_tokens(config, device) // config.max_num_batched_tokens
    n = num_blocks_for_bytes(spec, int(budget))
    if n < 1:
        raise ValueError(
            f"no room for a KV cache: {total / 2**30:.1f} GiB x {config.gpu_memory_utilization} (of which "
            f"{free / 2**30:.1f} GiB free) leaves {budget / 2**30:.2f} GiB after this engine's "
            f"{own / 2**30:.2f} GiB of weights and {peak / 2**30:.2f} GiB of activations; raise "
            "gpu_memory_utilization or lower max_num_batched_tokens"
        )
    return n


def build_runner(model: CausalLM, model_config: Any, config: BuiltinConfig, *, device: torch.device,
                 spec: KVCacheSpec, num_blocks: int, tp: TPGroup | None) -> ModelRunner:
    """The rank's KV cache (``num_blocks``, plus one pad block with graphs) and runner, its
    graphs captured."""
    graphs = uses_graphs(config, device)
    # With graphs one extra block, owned by no sequence, takes the padded rows' KV writes.
    kv_cache = KVCache(spec, num_blocks + 1 if graphs else num_blocks, device)
    context_length = int(config.context_length or model_config.max_position_embeddings)
    runner = ModelRunner(model, kv_cache, num_heads=local_heads(model_config, tp)[0],
                         vocab_size=int(model_config.vocab_size), eos_token_ids=tuple(model_config.eos_token_ids),
                         sampler_seed=config.seed, decode_kernel=config.decode_kernel, max_model_len=context_length,
                         pad_block=num_blocks if graphs else None, tp=tp)
    runner.share_tokens = tp is not None and tp.size > 1 and config.async_scheduling
    if graphs and runner.attn.use_triton:
        runner.capture_graphs(config.max_num_seqs)
    pw = piecewise_tokens(config, device)
    if pw:
        runner.capture_piecewise(pw)
    return runner
