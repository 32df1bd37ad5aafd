"""GPU peak throughput and memory, and the FLOPs-per-token formula that MFU and `model plan` share."""
from __future__ import annotations

from dataclasses import dataclass

from .config import GPTConfig


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
        raise ValueError(f"unknown GPU kind {name!r}; known: {', '.join(s.name for s in GPUS.values())} "
                         "(or give its memory and peak TFLOP/s)")
    return GPUS[key]


def matmul_params(config: GPTConfig) -> int:
    """Parameters that take part in a matmul: every one except the position table and the biases/norms,
    the tied embedding counted once (as the LM head). Per block: qkv 3C^2 + proj C^2 + MLP 8C^2."""
    C = config.n_embd
    return 12 * config.n_layer * C * C + config.embedding_rows * C


def attention_flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Forward + backward FLOPs of attention's QK^T and AV products per token, counted over the full
    (not causal-halved) square: 2 matmuls x 2 FLOPs x 3 (fwd + bwd) x C x seq_len per layer."""
    return 12.0 * config.n_layer * config.n_embd * seq_len


def flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token, forward + backward (PaLM, Chowdhery et al. 2022, appendix B):
    6 * N_matmul + 12 * n_layer * n_embd * seq_len (see matmul_params and attention_flops_per_token)."""
    return 6.0 * matmul_params(config) + attention_flops_per_token(config, seq_len)
