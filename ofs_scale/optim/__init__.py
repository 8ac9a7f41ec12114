"""Optimizers behind one interface: `step`, `zero_grad`, `param_groups`, `named_state`."""

from __future__ import annotations

from torch import nn

from ofs_scale.config import OptimConfig
from ofs_scale.optim.adamw import NamedAdamW
from ofs_scale.optim.schedule import lr_at, stage_at
from ofs_scale.parallel.mesh import Mesh

__all__ = ["NamedAdamW", "build_optimizer", "lr_at", "stage_at"]


def build_optimizer(named: list[tuple[str, nn.Parameter]], cfg: OptimConfig, mesh: Mesh):
    """The optimizer named by `cfg.name` over this rank's parameters."""
    if cfg.name == "adamw":
        return NamedAdamW(named, cfg)
    raise ValueError(f"optim.name={cfg.name!r} is not available in this version; use adamw")
