"""Gradient reduction over data-parallel ranks and the global gradient norm over every axis."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ofs_scale.parallel.mesh import Mesh
from ofs_scale.parallel.tp import is_sequence_parallel, is_tp_sharded

BUCKET_ELEMS = 1 << 24


def buckets(tensors: list[torch.Tensor], max_elems: int = BUCKET_ELEMS):
    """Consecutive runs of same-dtype tensors of about `max_elems` elements, to be flattened
    into one buffer per collective call."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for t in group:
            bucket.append(t)
            size += t.numel()
            if size >= max_elems:
                yield bucket
                bucket, size = [], 0
        if bucket:
            yield bucket


def average_across_dp(params: list[torch.Tensor], mesh: Mesh) -> None:
    """Average gradients over the data-parallel group, in flat buckets."""
    if mesh.dp == 1:
        return
    for bucket in buckets([p.grad for p in params if p.grad is not None]):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, group=mesh.dp_group)
        flat /= mesh.dp
        for dst, src in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            dst.copy_(src)


def sum_sequence_parallel_grads(params: list[torch.Tensor], mesh: Mesh) -> None:
    """Sum over TP the gradients of the parameters marked `sequence_parallel` (norm gains, OP
    betas, learned positions: replicated, but under sequence parallelism each TP rank saw only
    its part of the sequence), so every TP rank holds the whole gradient. One all-reduce of the
    (small) flattened gradients per step: `.grad`, else the fp32 `main_grad` buffer that the
    GPU step moved it into."""
    if mesh.tp == 1:
        return
    grads = []
    for p in params:
        grad = p.grad if p.grad is not None else getattr(p, "main_grad", None)
        if grad is not None and is_sequence_parallel(p):
            grads.append(grad)
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=mesh.tp_group)
    torch._foreach_copy_(grads, _unflatten_dense_tensors(flat, grads))


def global_grad_norm(
    params: list[torch.Tensor], mesh: Mesh, dp_sharded: bool = False
) -> torch.Tensor:
    """L2 norm of the full model's gradient (TP shards summed, replicas counted once, all
    pipeline stages included). Gradients must already be averaged over DP. `dp_sharded`: each
    gradient is held by one DP rank only (its ZeRO owner), so the partial sums add over DP."""
    dev = mesh.device
    sharded = torch.zeros((), device=dev, dtype=torch.float32)
    replicated = torch.zeros((), device=dev, dtype=torch.float32)
    for p in params:
        if p.grad is None:
            continue
        sq = p.grad.detach().float().pow(2).sum()
        if is_tp_sharded(p):
            sharded += sq
        else:
            replicated += sq
    if mesh.tp > 1:
        dist.all_reduce(sharded, group=mesh.tp_group)
    total = sharded + replicated
    if mesh.pp > 1:
        dist.all_reduce(total, group=mesh.pp_group)
    if dp_sharded and mesh.dp > 1:
        dist.all_reduce(total, group=mesh.dp_group)
    return total.sqrt()


def clip_grads(params: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Scale gradients so that their global norm is at most `max_norm`."""
    if max_norm <= 0 or not torch.isfinite(norm):
        return
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    grads = [p.grad for p in params if p.grad is not None]
    torch._foreach_mul_(grads, scale)
