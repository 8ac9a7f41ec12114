"""Normalisation layers by name; one factory so new kinds slot in."""

from __future__ import annotations

from torch import nn


def build_norm(kind: str, dim: int, bias: bool = False) -> nn.Module:
    """`layernorm`, `rmsnorm` (with gain), `srms` (RMSNorm without gain) or `none`."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, bias=bias)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim)
    if kind == "srms":
        return nn.RMSNorm(dim, elementwise_affine=False)
    if kind == "none":
        return nn.Identity()
    raise ValueError(
        f"model.norm={kind!r} is not available in this version; "
        "use layernorm, rmsnorm, srms or none"
    )
