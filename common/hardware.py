"""The GPU data sheet: peak bf16 throughput and memory of the GPUs MFU and `model plan` know by name."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_bytes: int        # as the driver reports it (nvidia-smi's total)
    peak_bf16_flops: float   # dense, no sparsity


MiB = 1024 ** 2
# Dense bf16 peaks from NVIDIA's data sheets (A100: 312 TFLOP/s; H100 SXM and H200: 989 TFLOP/s);
# memory totals are what nvidia-smi reports on the SXM parts.
GPUS: dict[str, GPUSpec] = {
    "a100-40gb": GPUSpec("A100-40GB", 40960 * MiB, 312e12),
    "a100-80gb": GPUSpec("A100-80GB", 81920 * MiB, 312e12),
    "h100": GPUSpec("H100", 81559 * MiB, 989e12),
    "h200": GPUSpec("H200", 143771 * MiB, 989e12),
}
GPU_ALIASES = {"a100": "a100-80gb", "h100-sxm": "h100", "h100-80gb": "h100"}


def gpu_spec(name: str) -> GPUSpec:
    key = name.strip().lower()
    key = GPU_ALIASES.get(key, key)
    if key not in GPUS:
        raise UsageError(f"unknown GPU kind {name!r}; known: {', '.join(s.name for s in GPUS.values())} "
                         "(or give its memory and peak TFLOP/s)")
    return GPUS[key]
