"""Parameter and FLOP accounting. Every MFU figure in the project uses these."""

from __future__ import annotations

import math

import jax

from model.config import ModelConfig
from model.llama import abstract_params


def count_params(cfg: ModelConfig) -> int:
    """Exact number of parameters, from abstract shapes (nothing is allocated)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg)))


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul for every token.

    The input embedding is a lookup and norms are elementwise, so neither
    counts; the output head does (once, also when tied to the embedding).
    """
    d, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_size, cfg.mlp_hidden
    mlp_matrices = 3 if cfg.mlp_gated else 2  # gate, up, down; or up, down (3/2 as wide: the same count)
    per_layer = d * n * h + 2 * d * k * h + n * h * d + mlp_matrices * d * f
    return cfg.n_layers * per_layer + d * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`.

    6 * matmul parameters (2 forward, 4 backward; arXiv:2001.08361 §2.1) plus
    attention scores and weighted values: 2 matmuls * 2 FLOPs * N*H per
    attended key, per layer, three times for training. With a causal mask
    token i attends to i + 1 keys, (seq_len + 1) / 2 on average (the
    non-causal count of arXiv:2204.02311 App. B, halved exactly).
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    attended = (seq_len + 1) / 2
    attention = 3 * 2 * 2 * cfg.n_layers * cfg.n_heads * cfg.head_size * attended
    return 6.0 * matmul_params(cfg) + attention
