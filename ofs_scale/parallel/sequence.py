"""Sequence parallelism: which part of the sequence a TP rank holds, and the gather / split pair
that moves the sequence-split residual stream in and out of megatron-core's layers on CPU.

With `parallel.sequence_parallel` the residual stream between the tensor-parallel layers is
split along the sequence over the TP ranks. Megatron-core's own path (its layers built with
`sequence_parallel=True`: ColumnParallelLinear all-gathers its input, RowParallelLinear and the
embedding reduce-scatter their outputs) allocates every buffer with `torch.cuda.current_device()`,
so it runs only with CUDA, although gloo itself has `all_gather_into_tensor` and
`reduce_scatter_tensor`. On CPU the layers stay plain TP layers (all-reduce) and these two
functions make the same split: `gather_sequence` before a column layer (forward all-gather;
backward this rank's slice of the gradient, which the column layer has already summed over TP)
and `split_sequence` after a row layer or the embedding (forward this rank's slice; backward
all-gather). Values and gradients equal megatron-core's; only the collectives differ (an
all-reduce where megatron-core reduce-scatters), which costs nothing that matters on CPU.

Tensors are sequence-first here, [T, B, D] as in megatron-core: the sequence is dim 0.
Shapes: T the whole sequence, t = T / tp this rank's part, B batch, D width.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def sequence_shard(length: int, tp: int, tp_rank: int) -> slice:
    """Positions of the whole sequence of `length` tokens that TP rank `tp_rank` holds."""
    if length % tp:
        raise ValueError(
            f"sequence length {length} is not divisible by parallel.tp={tp}: sequence "
            "parallelism splits it evenly; set data.seq_len to a multiple of tp, or "
            "parallel.sequence_parallel=false"
        )
    part = length // tp
    return slice(tp_rank * part, (tp_rank + 1) * part)


def _all_gather(x_tBD: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    tp = dist.get_world_size(group)
    out_TBD = x_tBD.new_empty((tp * x_tBD.shape[0], *x_tBD.shape[1:]))
    dist.all_gather_into_tensor(out_TBD, x_tBD.contiguous(), group=group)
    return out_TBD


def _local_part(x_TBD: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    return x_TBD[sequence_shard(x_TBD.shape[0], tp, rank)].contiguous()


class _SequenceExchange(torch.autograd.Function):
    """Gather ([t, B, D] -> [T, B, D]) or split ([T, B, D] -> [t, B, D]) in forward, the other
    one in backward: next to megatron-core's plain TP layers, whose all-reduces already sum
    over TP, each is the other's adjoint."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, gather: bool) -> torch.Tensor:
        ctx.group, ctx.gather = group, gather
        return _all_gather(x, group) if gather else _local_part(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = _local_part(grad, ctx.group) if ctx.gather else _all_gather(grad, ctx.group)
        return out, None, None


def gather_sequence(x_tBD: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The whole sequence from every TP rank's part (before a column layer that all-reduces
    its input gradient over TP)."""
    return _SequenceExchange.apply(x_tBD, group, True)


def split_sequence(x_TBD: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """This TP rank's part of a sequence replicated over TP (after a row layer's all-reduce)."""
    return _SequenceExchange.apply(x_TBD, group, False)
