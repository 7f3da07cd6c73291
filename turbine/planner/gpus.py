"""The GPUs the performance model knows: datasheet peaks and what was measured of them.

Peaks are the vendors' dense bf16 and HBM figures (SXM parts). ``hbm_efficiency`` and
``mma_efficiency`` are what a well-tuned kernel reaches, measured on the lent cards where we
could (``../shared/anchors/gpu``: a device-to-device copy reads+writes at 3.03 TB/s on the
H100 and 4.29 TB/s on the H200; an 8192^3 bf16 matmul runs at ~796 TFLOP/s on both) and
assumed equal for the B200, which we have not measured. A measured engine profile overrides
them (`PerfModel` fits both from it); these are the fallback for GPUs without a profile.

NVLink figures are per direction, per GPU (NVLink 4: 450 GB/s; NVLink 5: 900 GB/s); the
inter-node figure is one 400 Gb/s NIC per GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gb: float  # HBM capacity
    hbm_gbps: float  # peak HBM bandwidth, GB/s
    bf16_tflops: float  # dense bf16 tensor-core peak
    fp8_tflops: float  # dense fp8 tensor-core peak
    nvlink_gbps: float  # NVLink bandwidth per direction per GPU, GB/s
    gpus_per_node: int = 8
    internode_gbps: float = 50.0  # one 400 Gb/s NIC per GPU
    hbm_efficiency: float = 0.90  # of hbm_gbps a streaming kernel reaches
    mma_efficiency: float = 0.80  # of bf16_tflops a large matmul reaches
    nvlink_efficiency: float = 0.80  # NCCL bus bandwidth of the NVLink peak (large messages)
    # Latency of one NCCL collective inside a CUDA graph (small message): a fixed part plus a
    # part per rank in the ring. Typical published nccl-tests figures on NVLink: ~8 us at 2
    # GPUs, ~15 us at 8.
    collective_base_s: float = 6e-6
    collective_per_rank_s: float = 1.1e-6

    def __post_init__(self) -> None:
        for f in ("memory_gb", "hbm_gbps", "bf16_tflops", "fp8_tflops", "nvlink_gbps", "internode_gbps"):
            if not getattr(self, f) > 0:
                raise ValueError(f"GPU {self.name!r}: {f} must be positive")
        for f in ("hbm_efficiency", "mma_efficiency", "nvlink_efficiency"):
            if not 0 < getattr(self, f) <= 1:
                raise ValueError(f"GPU {self.name!r}: {f} must be in (0, 1]")

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_gbps * 1e9 * self.hbm_efficiency

    @property
    def flops_per_s(self) -> float:
        return self.bf16_tflops * 1e12 * self.mma_efficiency

    def link_bytes_per_s(self, ranks: int) -> float:
        """Collective bus bandwidth among ``ranks`` GPUs: NVLink inside a node, the NIC across."""
        bw = self.nvlink_gbps if ranks <= self.gpus_per_node else self.internode_gbps
        return bw * 1e9 * self.nvlink_efficiency

    def collective_latency_s(self, ranks: int) -> float:
        return self.collective_base_s + self.collective_per_rank_s * ranks if ranks > 1 else 0.0


GPUS = MappingProxyType({g.name: g for g in (
    GpuSpec("h100", memory_gb=80, hbm_gbps=3350, bf16_tflops=989, fp8_tflops=1979, nvlink_gbps=450,
            hbm_efficiency=3027 / 3350, mma_efficiency=796 / 989),
    GpuSpec("h200", memory_gb=141, hbm_gbps=4800, bf16_tflops=989, fp8_tflops=1979, nvlink_gbps=450,
            hbm_efficiency=4290 / 4800, mma_efficiency=780 / 989),
    GpuSpec("b200", memory_gb=180, hbm_gbps=8000, bf16_tflops=2250, fp8_tflops=4500, nvlink_gbps=900,
            hbm_efficiency=0.90, mma_efficiency=0.80),
)})

# How devices name themselves (torch.cuda.get_device_name, a profile's meta.device) -> our name.
_DEVICE_NAMES = (("H100", "h100"), ("H200", "h200"), ("B200", "b200"))


def get_gpu(name: str) -> GpuSpec:
    """A GPU by our short name (h100, h200, b200) or a device name such as 'NVIDIA H200'."""
    key = name.strip().lower()
    if key in GPUS:
        return GPUS[key]
    for marker, short in _DEVICE_NAMES:
        if marker.lower() in key:
            return GPUS[short]
    raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")


__all__ = ["GPUS", "GpuSpec", "get_gpu"]
