"""Simulated int8, FP8 and INT4: quantise-dequantise in floating point, on any device and layout.

Weights are symmetric int8 (integers -127..127, zero exactly representable, no zero point), per
tensor or per output channel. Activations are asymmetric uint8 (0..255 with a zero point) over a
range that always contains 0, so that zero padding and ReLU zeros stay exact. FP8 (E4M3, E5M2)
scales a tensor so that its absolute maximum lands on the format's largest finite value (per
tensor, as FP8 training recipes do) and casts through torch's float8 dtypes. INT4 weights are
symmetric (-7..7) with one scale per group of `group_size` consecutive input features per output
row (0: one scale per tensor or output channel, as for int8).

Shapes: O output features, I input features, N any leading dims, C the last (channel) dim.
Under tensor parallelism a range over a dimension that is split across ranks is reduced over the
tensor-parallel group, so every rank quantises with the range the full tensor would have.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

WEIGHT_QMAX = 127
INT4_QMAX = 7
FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX = {fmt: float(torch.finfo(dt).max) for fmt, dt in FP8_DTYPES.items()}  # 448, 57344
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
    qmax: float = WEIGHT_QMAX,
) -> torch.Tensor:
    """Step size of symmetric int8 for `w_OI`: a scalar, or (O, 1) per output channel (the
    absolute maximum over `qmax`; `qmax=1` gives the maximum itself).

    `partition_dim` is the dimension split over `tp_group` (0: outputs, 1: inputs, -1: none);
    the maximum is reduced over the group whenever the range spans the split dimension."""
    w = w_OI.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
    if partition_dim == 1 or (partition_dim == 0 and not per_channel):
        _all_reduce(amax, dist.ReduceOp.MAX, tp_group)
    return amax.clamp(min=MIN_RANGE) / qmax


def fake_quant_weight(
    w_OI: torch.Tensor,
    per_channel: bool,
    tp_group: dist.ProcessGroup | None = None,
    partition_dim: int = -1,
    fmt: str = "int8",
    group_size: int = 0,
) -> torch.Tensor:
    """`w_OI` rounded to `fmt` (int8, int4, e4m3, e5m2) and mapped back to its dtype; int4 with
    `group_size` > 0 takes one scale per group of input features (see `fake_int4_groups`)."""
    if fmt in FP8_DTYPES:
        amax = weight_scale(w_OI, per_channel, tp_group, partition_dim, qmax=1.0)
        return fake_fp8(w_OI, amax, fmt)
    if fmt == "int4" and group_size > 0:
        if partition_dim == 1 and tp_group is not None and dist.get_world_size(tp_group) > 1:
            # Groups of the full row may straddle the input shards: quantise the whole matrix.
            tp, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
            parts = [torch.empty_like(w_OI) for _ in range(tp)]
            dist.all_gather(parts, w_OI.detach().contiguous(), group=tp_group)
            full = fake_int4_groups(torch.cat(parts, dim=1), group_size)
            return full.chunk(tp, dim=1)[rank].clone()
        return fake_int4_groups(w_OI, group_size)
    qmax = INT4_QMAX if fmt == "int4" else WEIGHT_QMAX
    scale = weight_scale(w_OI, per_channel, tp_group, partition_dim, qmax=qmax)
    q = torch.clamp(torch.round(w_OI.float() / scale), -qmax, qmax)
    return (q * scale).to(w_OI.dtype)


def fake_int4_groups(w_OI: torch.Tensor, group_size: int) -> torch.Tensor:
    """Symmetric int4 (-7..7) with one scale per `group_size` consecutive input features of
    each output row (the last group of a row may be shorter)."""
    rows, cols = w_OI.shape
    w = torch.nn.functional.pad(w_OI.detach().float(), (0, (-cols) % group_size))
    w_OGS = w.reshape(rows, -1, group_size)
    scale = w_OGS.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_RANGE) / INT4_QMAX
    q = torch.clamp(torch.round(w_OGS / scale), -INT4_QMAX, INT4_QMAX) * scale
    return q.reshape(rows, -1)[:, :cols].to(w_OI.dtype)


def fake_fp8(x: torch.Tensor, amax: torch.Tensor, fmt: str) -> torch.Tensor:
    """`x` scaled so that `amax` (broadcast against x) maps to the largest finite value of FP8
    `fmt` (e4m3: 448, e5m2: 57344), cast to that float8 dtype and back, and unscaled. Values
    beyond amax saturate (E4M3 has no infinity: a cast out of range would give NaN)."""
    top = FP8_MAX[fmt]
    scale = amax.float().clamp(min=MIN_RANGE) / top
    y = torch.clamp(x.float() / scale, -top, top).to(FP8_DTYPES[fmt]).float()
    return (y * scale).to(x.dtype)


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
