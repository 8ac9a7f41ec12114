"""Normalisation layers by name: `NORMS` is the one table of `model.norm` values.

A leaf that ofs_scale.config reads for the allowed names, so it types against `NormOptions`
instead of importing the config (see optim/registry.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from torch import nn

from ofs_scale.model.batchless import BatchlessNorm
from ofs_scale.model.psbn import PostShiftBatchNorm

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from ofs_scale.model.layers import ParallelLayers


class NormOptions(Protocol):
    """The model settings the batchless and psBN norms read (`config.ModelConfig` has them)."""

    bln_weight: float
    bln_data_init: bool
    bln_init_min_sigma: float
    psbn_alpha: float


NormBuilder = Callable[[int, bool, "ProcessGroup | None", "NormOptions | None"], nn.Module]


def _layernorm(dim: int, bias: bool, dp_group, opts) -> nn.Module:
    return nn.LayerNorm(dim, bias=bias)


def _rmsnorm(dim: int, bias: bool, dp_group, opts) -> nn.Module:
    return nn.RMSNorm(dim)


def _srms(dim: int, bias: bool, dp_group, opts) -> nn.Module:
    return nn.RMSNorm(dim, elementwise_affine=False)


def _none(dim: int, bias: bool, dp_group, opts) -> nn.Module:
    return nn.Identity()


def _batchless(dim: int, bias: bool, dp_group, opts) -> nn.Module:
    weight = opts.bln_weight if opts is not None else 1.0
    data_init = opts.bln_data_init if opts is not None else False
    min_sigma = opts.bln_init_min_sigma if opts is not None else 0.0
    return BatchlessNorm(dim, bias, weight, data_init, dp_group, init_min_sigma=min_sigma)


def _psbn(dim: int, bias: bool, dp_group, opts) -> nn.Module:
    alpha = opts.psbn_alpha if opts is not None else 0.1
    return PostShiftBatchNorm(dim, bias, alpha, dp_group)


# name -> builder(dim, bias, dp_group, options); the order is the one messages list them in
NORMS: dict[str, NormBuilder] = {
    "layernorm": _layernorm,
    "rmsnorm": _rmsnorm,
    "srms": _srms,
    "none": _none,
    "batchless": _batchless,
    "psbn": _psbn,
}


def build_norm(
    kind: str,
    dim: int,
    bias: bool = False,
    layers: ParallelLayers | None = None,
    cfg: NormOptions | None = None,
) -> nn.Module:
    """`layernorm`, `rmsnorm` (with gain), `srms` (RMSNorm without gain), `none`, `batchless`
    (learned statistics, aux loss weight `cfg.bln_weight`) or `psbn` (batch norm synchronised
    over `layers.dp_group`, post-shift `cfg.psbn_alpha`)."""
    if kind not in NORMS:
        *rest, last = NORMS
        raise ValueError(f"model.norm={kind!r} is not available; use {', '.join(rest)} or {last}")
    return NORMS[kind](dim, bias, getattr(layers, "dp_group", None), cfg)
