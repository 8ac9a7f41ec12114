"""Optimizers behind one interface: `step`, `zero_grad`, `param_groups`, `named_state`."""

from __future__ import annotations

from torch import nn

from ofs_scale.config import OptimConfig
from ofs_scale.optim.adamw import NamedAdamW
from ofs_scale.optim.schedule import lr_at, stage_at
from ofs_scale.optim.shampoo import Shampoo
from ofs_scale.optim.sharded import ShardedOptimizer
from ofs_scale.optim.soap import SOAP
from ofs_scale.parallel.mesh import Mesh

__all__ = [
    "SOAP",
    "NamedAdamW",
    "Shampoo",
    "ShardedOptimizer",
    "build_optimizer",
    "lr_at",
    "stage_at",
]

OPTIMIZERS = {"adamw": NamedAdamW, "soap": SOAP, "shampoo": Shampoo}


def build_optimizer(named: list[tuple[str, nn.Parameter]], cfg: OptimConfig, mesh: Mesh):
    """The optimizer named by `cfg.name` over this rank's parameters; its state is sharded over
    the data-parallel group when `cfg.shard` is true (default: when DP > 1)."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"optim.name={cfg.name!r} is unknown; use one of {sorted(OPTIMIZERS)}")
    cls = OPTIMIZERS[cfg.name]
    shard = mesh.dp > 1 if cfg.shard is None else cfg.shard
    if shard and mesh.dp > 1:
        return ShardedOptimizer(named, cfg, mesh, cls)
    return cls(named, cfg)
