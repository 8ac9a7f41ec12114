"""Plain PyTorch model code; parallelism enters only through the `ParallelLayers` factory."""

from __future__ import annotations

import torch
from torch import nn

from ofs_scale.config import Config
from ofs_scale.model.batchless import configure_aux_scaling
from ofs_scale.model.gpt import GPT, resolved
from ofs_scale.model.layers import ParallelLayers, is_tp_sharded, padded_vocab_size
from ofs_scale.parallel.mesh import Mesh

__all__ = ["GPT", "ParallelLayers", "build_model", "count_params", "padded_vocab_size", "resolved"]


def build_model(cfg: Config, mesh: Mesh, vocab_size: int, **chunk) -> GPT:
    """The model (or a pipeline chunk, via `layer_ids`/`first`/`last`) on this rank's device."""
    layers = ParallelLayers(mesh.tp_group, dp_group=mesh.dp_group)
    vocab = padded_vocab_size(vocab_size, mesh.tp)
    model = GPT(cfg.model, vocab, cfg.data.seq_len, layers, seed=cfg.run.seed, **chunk)
    model.recompute = cfg.train.activation_checkpointing
    # Batchless aux gradients follow the task loss's micro-batch scaling: the local engine
    # divides each micro-batch loss by their number, the pipeline schedule divides gradients
    # afterwards (see model/batchless.py).
    micro = cfg.train.global_batch // (cfg.train.micro_batch * mesh.dp)
    configure_aux_scaling(model, micro if mesh.pp == 1 else 1)
    return model.to(mesh.device)


def count_params(model: nn.Module, tp: int) -> tuple[int, int]:
    """(parameters on this rank, parameters of the full layer set this rank's chunk covers)."""
    local = full = 0
    for p in model.parameters():
        n = p.numel()
        local += n
        full += n * tp if is_tp_sharded(p) else n
    return local, full


def analytic_param_count(cfg: Config, vocab_size: int) -> int:
    """Total parameter count of the full model, computed without building it."""
    m = cfg.model
    r = resolved(m)
    d, L = m.d_model, m.n_layers
    d_ff = int(m.ffn_mult * d)
    vocab = padded_vocab_size(vocab_size, 1)
    bias = 1 if m.bias else 0
    norm_params = {
        "layernorm": d * (1 + bias),
        "rmsnorm": d,
        "srms": 0,
        "none": 0,
        "batchless": d * (3 + bias),
        "psbn": d * (1 + bias),
    }[m.norm]
    head_dim = d // m.n_heads
    attn = 3 * d * d + 3 * d * bias + d * d + d * bias + (2 * head_dim if r["qk_norm"] else 0)
    n_up = 2 if r["activation"] == "swiglu" else 1
    mlp = n_up * (d * d_ff + d_ff * bias) + d_ff * d + d * bias
    block = attn + mlp
    block += (2 if m.beta_trainable else 0) if m.block == "op" else 2 * norm_params
    total = L * block + vocab * d
    total += cfg.data.seq_len * d if m.position == "learned" else 0
    total += d * (1 + bias) if r["embed_norm"] else 0
    total += norm_params if m.final_norm else 0
    total += 0 if m.tie_embeddings else vocab * d
    return total


def meta_model(cfg: Config, vocab_size: int, tp_group, **chunk) -> GPT:
    """The model (or a chunk) on the meta device: shapes only, no memory, no initialisation."""
    layers = ParallelLayers(tp_group, perform_initialization=False)
    with torch.device("meta"):
        return GPT(
            cfg.model,
            padded_vocab_size(vocab_size, layers.tp),
            cfg.data.seq_len,
            layers,
            seed=cfg.run.seed,
            **chunk,
        )
