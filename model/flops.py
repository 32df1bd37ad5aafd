"""Training FLOPs per token of a GPT-2 shape: the formula MFU (train) and `model plan` share."""
from __future__ import annotations

from .config import GPTConfig


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
