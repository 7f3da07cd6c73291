"""The built-in engine's settings: one Struct, built once (by the CLI or a test) and validated here.

Torch-free, so the CLI and launch code can build it without importing the engine.
"""
from __future__ import annotations

import msgspec

DTYPE_NAMES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16", "half")


class BuiltinConfig(msgspec.Struct, frozen=True, kw_only=True):
    block_size: int = 16
    num_gpu_blocks: int | None = None  # None: from gpu_memory_utilization (CUDA) or a fixed budget (CPU)
    gpu_memory_utilization: float = 0.85  # fraction of the whole device for weights + activations + KV
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    context_length: int | None = None  # None: the model's max_position_embeddings
    device: str | None = None  # None: "cuda" when available, else "cpu"
    dtype: str | None = None  # None: bfloat16 on CUDA, float32 on CPU
    seed: int | None = 0  # generator of unseeded sampling (None: nondeterministic)
    decode_kernel: str = "auto"  # "auto" | "triton" | "torch" (see PagedAttention)
    cuda_graphs: bool = True  # capture decode graphs at start-up (CUDA with the Triton decode kernel)
    # ... and piecewise graphs (piecewise_graphs.py) of steps with prompt tokens up to this many
    # tokens (capped by max_num_batched_tokens; 0: such steps always run eagerly)
    piecewise_graph_tokens: int = 2048
    long_prefill_token_threshold: int | None = None  # cap on one prefill's tokens per step (None: the budget)
    async_scheduling: bool = True  # plan and launch the next step while the device runs this one
    # ... also while a step with prefill tokens runs (off: only behind decode-only steps)
    overlap_prefill_steps: bool = True
    # An eager next step launches ahead only behind a step computing at least this many prompt
    # tokens (its device time covers the launch); otherwise it is staged (module docstring). 0: always.
    eager_overlap_min_tokens: int = 1024
    # KV tiers below the device cache (turbine/kvbm): host memory (pinned on CUDA) and disk
    host_kv_gb: float = 0.0
    disk_kv_gb: float = 0.0
    disk_kv_dir: str | None = None
    # Tensor parallelism (turbine/engine/parallel): the model's heads, MLP and vocabulary split
    # over this many ranks (GPUs device..device+N-1, or CPU processes with gloo); rank 0 is this
    # process. A collective that waits longer than tp_timeout_s fails the engine instead of hanging it.
    tensor_parallel_size: int = 1
    tp_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks <= 0:
            raise ValueError(f"num_gpu_blocks must be positive, got {self.num_gpu_blocks}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.context_length is not None and self.context_length <= 1:
            raise ValueError(f"context_length must be at least 2, got {self.context_length}")
        if self.piecewise_graph_tokens < 0:
            raise ValueError(f"piecewise_graph_tokens must be >= 0, got {self.piecewise_graph_tokens}")
        if self.eager_overlap_min_tokens < 0:
            raise ValueError(f"eager_overlap_min_tokens must be >= 0, got {self.eager_overlap_min_tokens}")
        if self.long_prefill_token_threshold is not None and self.long_prefill_token_threshold <= 0:
            raise ValueError("long_prefill_token_threshold must be positive when set")
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.host_kv_gb < 0 or self.disk_kv_gb < 0:
            raise ValueError("KV tier sizes must be >= 0")
        if self.disk_kv_gb and not self.disk_kv_dir:
            raise ValueError("a disk KV tier (disk_kv_gb) needs a directory (disk_kv_dir)")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")
        if self.tp_timeout_s <= 0:
            raise ValueError(f"tp_timeout_s must be positive, got {self.tp_timeout_s}")
        if self.tensor_parallel_size > 1 and (self.host_kv_gb or self.disk_kv_gb):
            raise ValueError("KV tiers (host_kv_gb, disk_kv_gb) are not supported with tensor_parallel_size > 1 yet")
