"""The model without memory: meta-device builds, parameter counts and per-stage shapes, for dry
runs and the memory planner."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ofs_scale.config import Config
from ofs_scale.model.gpt import GPT
from ofs_scale.model.layers import ParallelLayers
from ofs_scale.parallel.mesh import init_mesh
from ofs_scale.parallel.stages import layer_chunks
from ofs_scale.parallel.tp import is_tp_sharded, padded_vocab_size, tp_partition_dim


def count_params(model: nn.Module, tp: int) -> tuple[int, int]:
    """(parameters on this rank, parameters of the full layer set this rank's chunk covers)."""
    local = full = 0
    for p in model.parameters():
        n = p.numel()
        local += n
        full += n * tp if is_tp_sharded(p) else n
    return local, full


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


def _single_process_meta_model(cfg: Config, vocab_size: int) -> GPT:
    """The whole model at TP=1 on the meta device, in this (single) process."""
    if not dist.is_initialized():
        init_mesh(1, 1)
    if dist.get_world_size() != 1:
        raise RuntimeError("the memory planner runs in a single process (ofs-scale plan)")
    return meta_model(cfg, vocab_size, dist.group.WORLD)


def param_count(cfg: Config, vocab_size: int) -> int:
    """Total parameter count of the full model (vocabulary padded as at TP=1), counted on the
    meta-device build: exact for every model option, and no memory (a 7B model takes ~1 s)."""
    return count_params(_single_process_meta_model(cfg, vocab_size), 1)[0]


def stage_param_shapes(cfg: Config, vocab_size: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """(name, shape on one TP rank) of every parameter, per pipeline stage."""
    p = cfg.parallel
    model = _single_process_meta_model(cfg, vocab_size)
    owner = {}
    for c, ids in enumerate(layer_chunks(cfg.model.n_layers, p.pp * p.virtual_stages)):
        for i in ids:
            owner[i] = c % p.pp
    stages: list[list[tuple[str, tuple[int, ...]]]] = [[] for _ in range(p.pp)]
    vocab_tp = padded_vocab_size(vocab_size, p.tp)
    for name, t in model.named_parameters():
        if name.startswith("layers."):
            stage = owner[int(name.split(".")[1])]
        elif name.startswith(("head", "final_norm")):
            stage = p.pp - 1
        else:
            stage = 0
        shape = list(t.shape)
        if is_tp_sharded(t):
            dim = tp_partition_dim(t)
            if shape[dim] == model.vocab_size:
                shape[dim] = vocab_tp // p.tp
            else:
                shape[dim] //= p.tp
        stages[stage].append((name, tuple(shape)))
    return stages


def per_rank_param_counts(cfg: Config, vocab_size: int) -> list[int]:
    """Parameters held by one rank of each pipeline stage (all TP ranks hold the same count)."""
    return [
        sum(math.prod(shape) for _, shape in stage) for stage in stage_param_shapes(cfg, vocab_size)
    ]
