"""Normalisation layers by name; one factory so new kinds slot in."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ofs_scale.model.batchless import BatchlessNorm
from ofs_scale.model.psbn import PostShiftBatchNorm

if TYPE_CHECKING:
    from ofs_scale.config import ModelConfig
    from ofs_scale.model.layers import ParallelLayers


def build_norm(
    kind: str,
    dim: int,
    bias: bool = False,
    layers: ParallelLayers | None = None,
    cfg: ModelConfig | None = None,
) -> nn.Module:
    """`layernorm`, `rmsnorm` (with gain), `srms` (RMSNorm without gain), `none`, `batchless`
    (learned statistics, aux loss weight `cfg.bln_weight`) or `psbn` (batch norm synchronised
    over `layers.dp_group`, post-shift `cfg.psbn_alpha`)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, bias=bias)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim)
    if kind == "srms":
        return nn.RMSNorm(dim, elementwise_affine=False)
    if kind == "none":
        return nn.Identity()
    dp_group = getattr(layers, "dp_group", None)
    if kind == "batchless":
        weight = cfg.bln_weight if cfg is not None else 1.0
        data_init = cfg.bln_data_init if cfg is not None else False
        return BatchlessNorm(dim, bias, weight, data_init, dp_group)
    if kind == "psbn":
        alpha = cfg.psbn_alpha if cfg is not None else 0.1
        return PostShiftBatchNorm(dim, bias, alpha, dp_group)
    raise ValueError(
        f"model.norm={kind!r} is not available; "
        "use layernorm, rmsnorm, srms, none, batchless or psbn"
    )
