"""Where layers go under pipeline parallelism: balanced chunks and the chunks of each rank."""

from __future__ import annotations


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
