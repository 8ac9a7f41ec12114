"""Optimizers behind one interface: `step`, `zero_grad`, `param_groups`, `named_state`.

Each optimizer is one entry of `registry.OPTIMIZER_SPECS`; `build_optimizer` reads it.
"""

from __future__ import annotations

from torch import nn

from ofs_scale.optim.adamw import NamedAdamW
from ofs_scale.optim.master import MasterOptimizer
from ofs_scale.optim.muon import Muon
from ofs_scale.optim.registry import OPTIMIZER_SPECS, OPTIMIZERS
from ofs_scale.optim.schedule import lr_at, stage_at
from ofs_scale.optim.settings import OptimSettings
from ofs_scale.optim.shampoo import Shampoo
from ofs_scale.optim.sharded import ShardedOptimizer
from ofs_scale.optim.soap import SOAP
from ofs_scale.parallel.mesh import Mesh

__all__ = [
    "OPTIMIZERS",
    "OPTIMIZER_SPECS",
    "SOAP",
    "MasterOptimizer",
    "Muon",
    "NamedAdamW",
    "Shampoo",
    "ShardedOptimizer",
    "build_optimizer",
    "lr_at",
    "stage_at",
]


def build_optimizer(
    named: list[tuple[str, nn.Parameter]], cfg: OptimSettings, mesh: Mesh, master: bool = False
):
    """The optimizer named by `cfg.name` over this rank's parameters; its state is sharded over
    the data-parallel group when `cfg.shard` is true (default: when DP > 1). `master`: it
    updates fp32 masters of the (then bf16) parameters, `optim/master.py`."""
    if cfg.name not in OPTIMIZER_SPECS:
        raise ValueError(f"optim.name={cfg.name!r} is unknown; use one of {sorted(OPTIMIZERS)}")
    spec = OPTIMIZER_SPECS[cfg.name]
    extra = {"tp_group": mesh.tp_group} if spec.tp_group and mesh.tp > 1 else {}
    shard = mesh.dp > 1 if cfg.shard is None else cfg.shard
    if shard and mesh.dp > 1:
        return ShardedOptimizer(named, cfg, mesh, spec.cls, extra, master=master)
    if master:
        return MasterOptimizer(named, cfg, spec.cls, extra)
    return spec.cls(named, cfg, **extra)
