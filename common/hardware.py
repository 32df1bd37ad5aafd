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
# Dense bf16 Tensor Core peaks: NVIDIA's data sheets give them with sparsity, twice these (A100 624; H100 SXM 1,979,
# H100 PCIe 1,513, H100 NVL 1,671; H200 SXM 1,979, H200 NVL 1,671 TFLOP/s). The PCIe and NVL cards run at lower
# clocks and power than the SXM module of the same chip. Memory totals are what nvidia-smi reports.
GPUS: dict[str, GPUSpec] = {
    "a100-40gb": GPUSpec("A100-40GB", 40960 * MiB, 312e12),
    "a100-80gb": GPUSpec("A100-80GB", 81920 * MiB, 312e12),
    "h100": GPUSpec("H100", 81559 * MiB, 989e12),
    "h100-pcie": GPUSpec("H100-PCIe", 81559 * MiB, 756e12),
    "h100-nvl": GPUSpec("H100-NVL", 95830 * MiB, 835e12),
    "h200": GPUSpec("H200", 143771 * MiB, 989e12),
    "h200-nvl": GPUSpec("H200-NVL", 143771 * MiB, 835e12),
}
GPU_ALIASES = {"a100": "a100-80gb", "h100-sxm": "h100", "h100-80gb": "h100", "h200-sxm": "h200"}


def gpu_kind(device_name: str) -> str | None:
    """torch.cuda.get_device_name's string -> a key of GPUS, or None for a GPU not in the table. The names
    (e.g. "NVIDIA H100 80GB HBM3" for the SXM part, "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200",
    "NVIDIA A100-SXM4-40GB") say the form factor, whose peak differs for the same chip."""
    name = device_name.lower()
    for chip in ("h200", "h100"):
        if chip in name:
            if "nvl" in name:
                return f"{chip}-nvl"
            if "pcie" in name:
                return "h100-pcie" if chip == "h100" else None  # no H200 PCIe part exists to score against
            return chip
    if "a100" in name:
        return "a100-80gb" if "80gb" in name.replace(" ", "").replace("-", "") else "a100-40gb"
    return None


def gpu_spec(name: str) -> GPUSpec:
    key = name.strip().lower()
    key = GPU_ALIASES.get(key, key)
    if key not in GPUS:
        raise UsageError(f"unknown GPU kind {name!r}; known: {', '.join(s.name for s in GPUS.values())} "
                         "(or give its memory and peak TFLOP/s)")
    return GPUS[key]
