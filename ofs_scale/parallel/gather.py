"""Assemble full (unsharded) tensors from tensor-parallel shards, for tests and tools."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ofs_scale.parallel.mesh import Mesh
from ofs_scale.parallel.tp import is_tp_sharded, tp_partition_dim


def full_tensor(t: torch.Tensor, param: nn.Parameter, mesh: Mesh) -> torch.Tensor:
    """The whole tensor of which `t` (shaped like `param`) is this rank's TP shard."""
    if mesh.tp == 1 or not is_tp_sharded(param):
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(mesh.tp)]
    dist.all_gather(parts, t.detach().contiguous(), group=mesh.tp_group)
    return torch.cat(parts, dim=tp_partition_dim(param))


def full_named(
    named: list[tuple[str, nn.Parameter]], mesh: Mesh, grads: bool = False
) -> dict[str, torch.Tensor]:
    """Full parameters (or their gradients) of this rank's chunks, by name (collective over TP)."""
    out = {}
    for name, p in named:
        src = p.grad if grads else p.data
        if src is None:
            src = torch.zeros_like(p)
        out[name] = full_tensor(src, p, mesh).cpu()
    return out
