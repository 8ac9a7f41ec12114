"""Simulated int8: quantise-dequantise in floating point, so it runs on any device and layout.

Weights are symmetric int8 (integers -127..127, zero exactly representable, no zero point), per
tensor or per output channel. Activations are asymmetric uint8 (0..255 with a zero point) over a
range that always contains 0, so that zero padding and ReLU zeros stay exact.

Shapes: O output features, I input features, N any leading dims, C the last (channel) dim.
Under tensor parallelism a range over a dimension that is split across ranks is reduced over the
tensor-parallel group, so every rank quantises with the range the full tensor would have.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

WEIGHT_QMAX = 127
ACT_LEVELS = 255
# A range narrower than this is treated as this wide: avoids dividing by zero on constant inputs.
MIN_RANGE = 1e-8


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)


def weight_scale(
    w_OI: torch.Tensor,
    per_channel: bool,
    tp_group: dist.ProcessGroup | None = None,
    partition_dim: int = -1,
) -> torch.Tensor:
    """Step size of symmetric int8 for `w_OI`: a scalar, or (O, 1) per output channel.

    `partition_dim` is the dimension split over `tp_group` (0: outputs, 1: inputs, -1: none);
    the maximum is reduced over the group whenever the range spans the split dimension."""
    w = w_OI.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
    if partition_dim == 1 or (partition_dim == 0 and not per_channel):
        _all_reduce(amax, dist.ReduceOp.MAX, tp_group)
    return amax.clamp(min=MIN_RANGE) / WEIGHT_QMAX


def fake_quant_weight(
    w_OI: torch.Tensor,
    per_channel: bool,
    tp_group: dist.ProcessGroup | None = None,
    partition_dim: int = -1,
) -> torch.Tensor:
    """`w_OI` rounded to symmetric int8 and mapped back to its dtype."""
    scale = weight_scale(w_OI, per_channel, tp_group, partition_dim)
    q = torch.clamp(torch.round(w_OI.float() / scale), -WEIGHT_QMAX, WEIGHT_QMAX)
    return (q * scale).to(w_OI.dtype)


def fake_quant_asym(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """`x` rounded to uint8 over [lo, hi] (broadcast against x; widened to contain 0).

    Values outside the range saturate; inside, the error is at most half a step."""
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    scale = (hi - lo).clamp(min=MIN_RANGE) / ACT_LEVELS
    zero_point = torch.round(-lo / scale)
    q = torch.clamp(torch.round(x.float() / scale) + zero_point, 0, ACT_LEVELS)
    return ((q - zero_point) * scale).to(x.dtype)


def token_range(
    x_NC: torch.Tensor, tp_group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (last-dim) minimum and maximum, shapes (N, 1); reduced over `tp_group` when
    the last dim is split across it (the input of a row-parallel layer)."""
    lo = x_NC.detach().float().amin(dim=-1, keepdim=True)
    hi = x_NC.detach().float().amax(dim=-1, keepdim=True)
    _all_reduce(lo, dist.ReduceOp.MIN, tp_group)
    _all_reduce(hi, dist.ReduceOp.MAX, tp_group)
    return lo, hi


def fake_quant_dynamic(x_NC: torch.Tensor, tp_group: dist.ProcessGroup | None = None):
    """`x_NC` rounded to uint8 with a fresh range per token (row of the last dim)."""
    lo, hi = token_range(x_NC, tp_group)
    return fake_quant_asym(x_NC, lo, hi)
