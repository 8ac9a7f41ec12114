"""Where layers go under pipeline parallelism, and what each rank holds (no allocation)."""

from __future__ import annotations

import math

from ofs_scale.config import Config


def layer_chunks(n_layers: int, num_chunks: int) -> list[list[int]]:
    """Contiguous, balanced layer ranges for `num_chunks` pipeline chunks (earlier chunks get
    the extra layer, since the last chunk also carries the head and loss)."""
    base, extra = divmod(n_layers, num_chunks)
    out, start = [], 0
    for c in range(num_chunks):
        size = base + (1 if c < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def rank_chunks(n_layers: int, pp: int, virtual_stages: int, pp_rank: int) -> list[int]:
    """Chunk indices held by pipeline rank `pp_rank` (interleaved: rank, rank+pp, ...)."""
    return [pp_rank + v * pp for v in range(virtual_stages)]


def stage_param_shapes(cfg: Config, vocab_size: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """(name, shape on one TP rank) of every parameter, per pipeline stage."""
    import torch.distributed as dist

    from ofs_scale.model import meta_model
    from ofs_scale.model.layers import is_tp_sharded, padded_vocab_size, tp_partition_dim
    from ofs_scale.parallel.mesh import init_mesh

    if not dist.is_initialized():
        init_mesh(1, 1)
    if dist.get_world_size() != 1:
        raise RuntimeError("the memory planner runs in a single process (python tools/plan.py)")
    p = cfg.parallel
    model = meta_model(cfg, vocab_size, dist.group.WORLD)
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
