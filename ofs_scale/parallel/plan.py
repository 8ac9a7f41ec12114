"""Where layers go under pipeline parallelism, and what each rank holds (no allocation)."""

from __future__ import annotations

from ofs_scale.config import Config
from ofs_scale.model.layers import is_tp_sharded


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


def per_rank_param_counts(cfg: Config, vocab_size: int) -> list[int]:
    """Parameters held by one rank of each pipeline stage (all TP ranks hold the same count),
    from the model built on the meta device."""
    import torch.distributed as dist

    from ofs_scale.model import meta_model
    from ofs_scale.parallel.mesh import init_mesh

    if not dist.is_initialized():
        init_mesh(1, 1)
    model = meta_model(cfg, vocab_size, dist.group.WORLD)
    p = cfg.parallel
    chunks = layer_chunks(cfg.model.n_layers, p.pp * p.virtual_stages)
    owner = {}
    for c, ids in enumerate(chunks):
        for i in ids:
            owner[i] = c % p.pp
    counts = [0] * p.pp
    vocab_padded = model.vocab_size
    for name, t in model.named_parameters():
        if name.startswith("layers."):
            stage = owner[int(name.split(".")[1])]
        elif name.startswith(("head", "final_norm")):
            stage = p.pp - 1
        else:
            stage = 0
        n = t.numel()
        if is_tp_sharded(t):
            # vocab rows are padded to a multiple of tp; other sharded dims divide exactly
            if t.shape[0] == vocab_padded:
                from ofs_scale.model.layers import padded_vocab_size

                n = n // vocab_padded * padded_vocab_size(vocab_size, p.tp) // p.tp
            else:
                n //= p.tp
        counts[stage] += n
    return counts
