"""Model FLOPs per token (the PaLM / Megatron-LM count that MFU is measured against).

Training one token costs 6 FLOPs per matmul weight it meets (2 in the forward pass, 4 in the
backward pass) plus the attention scores, which no weight holds: per layer the forward pass does
Q K^T and P V, 2 * 2 * T * d FLOPs for a token attending over T positions, three times that
with the backward pass, so 12 * L * T * d in all (no causal halving, as PaLM counts it):

    flops_per_token = 6 * N + 12 * L * T * d
    N = L * (4 d^2 + k * d * f) + V * d

N counts the matmul weights: per layer the Q, K, V and output projections (4 d^2) and the MLP
(k = 2 matrices of d x f, 3 with SwiGLU's gate, f = int(ffn_mult * d)), and the output head
(V * d, counted even when tied to the embedding: the logits matmul runs either way). Embedding
lookups, norms, biases and element-wise work are left out. Recomputation (activation
checkpointing) is not counted: this is model FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

from ofs_scale.config import Config
from ofs_scale.model.gpt import resolved


def matmul_params(cfg: Config, vocab_size: int) -> int:
    """N: the weights of every matmul a token passes through (see the module doc)."""
    m = cfg.model
    d, f = m.d_model, int(m.ffn_mult * m.d_model)
    mlp_matrices = 3 if resolved(m)["activation"] == "swiglu" else 2
    return m.n_layers * (4 * d * d + mlp_matrices * d * f) + vocab_size * d


def flops_per_token(cfg: Config, vocab_size: int) -> float:
    """Training FLOPs per token, 6 N + 12 L T d (forward and backward, see the module doc)."""
    m = cfg.model
    attention = 12 * m.n_layers * cfg.data.seq_len * m.d_model
    return 6.0 * matmul_params(cfg, vocab_size) + attention
