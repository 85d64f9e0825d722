"""Model FLOPs per token, for TFLOP/s and MFU in logs and benchmarks.

Training FLOPs per token = 6 * N_matmul + 12 * L * d * s_eff, where
  N_matmul = parameters that take part in a matrix multiply per token: per layer 4*d^2 + 2*d*f (QKV, output
             projection, fc1, fc2) plus the LM head (d^2 dense + d*V tied decoder); embeddings are a lookup;
  12 * L * d * s_eff = attention scores and weighted values (2 * 2 * d * s per layer forward, times 3 for
             forward + backward), with s_eff = sum(len^2) / sum(len) over the packed batch, because a token of a
             sequence of length len attends to len keys.
Biases, norms and elementwise work are left out, as in the usual MFU convention (PaLM, Megatron). The LM head term
counts every token even though we run the head only at masked positions: MFU then measures useful work the same way
for every implementation, and the saving shows up as a higher rate.
"""

from __future__ import annotations

from collections.abc import Sequence

from recipe.model.config import EsmConfig


def matmul_params(config: EsmConfig) -> int:
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    return config.num_layers * (4 * d * d + 2 * d * f) + d * d + d * v


def effective_seqlen(lengths: Sequence[int]) -> float:
    total = sum(lengths)
    return sum(n * n for n in lengths) / total if total else 0.0


def flops_per_token(config: EsmConfig, s_eff: float) -> float:
    """Training (forward + backward) FLOPs per token at effective sequence length s_eff."""
    return 6.0 * matmul_params(config) + 12.0 * config.num_layers * config.hidden_size * s_eff


def batch_flops(config: EsmConfig, lengths: Sequence[int]) -> float:
    """Training FLOPs of one packed batch with these (unpadded) sequence lengths."""
    return flops_per_token(config, effective_seqlen(lengths)) * sum(lengths)
