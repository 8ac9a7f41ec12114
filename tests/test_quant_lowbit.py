"""FP8 (E4M3, E5M2) and INT4 per-group fake quantisation: against written-out
quantise-dequantise, the orderings planted outliers should give, and TP exactness."""

from __future__ import annotations

import math

import pytest
import torch

from ofs_scale.quant.fake import (
    fake_fp8,
    fake_int4_groups,
    fake_quant_asym,
    fake_quant_weight,
)
from ofs_scale.testing.distributed import run_distributed

# format -> (mantissa bits, smallest normal exponent, largest finite value)
FP8 = {"e4m3": (3, -6, 448.0), "e5m2": (2, -14, 57344.0)}


def written_out_fp8(x: torch.Tensor, amax: float, fmt: str) -> torch.Tensor:
    """Scale so amax -> the format's max, round to the nearest representable value (ties to
    even mantissa) element by element, saturate, unscale."""
    mant, emin, top = FP8[fmt]
    scale = amax / top
    out = []
    for v in (x.double() / scale).tolist():
        v = max(-top, min(top, v))
        if v == 0.0:
            out.append(0.0)
            continue
        e = max(math.floor(math.log2(abs(v))), emin)  # subnormals share the smallest exponent
        step = 2.0 ** (e - mant)
        q = v / step
        r = math.floor(q + 0.5)
        if q + 0.5 == r and r % 2:  # a tie: round half to even
            r -= 1
        out.append(max(-top, min(top, r * step)) * scale)
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape).float()


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_matches_written_out(fmt):
    gen = torch.Generator().manual_seed(0)
    # normal values, values near zero (subnormal after scaling), a saturating one, exact zero
    x = torch.cat([torch.randn(300, generator=gen), torch.randn(50, generator=gen) * 1e-4])
    x = torch.cat([x, torch.tensor([0.0, 7.5, -7.5])])
    amax = 3.0  # below the largest |x|: values beyond it saturate
    got = fake_fp8(x, torch.tensor(amax), fmt)
    torch.testing.assert_close(got, written_out_fp8(x, amax, fmt), rtol=1e-6, atol=1e-12)
    assert float(got.abs().max()) == pytest.approx(amax)
    assert not torch.isnan(got).any()


def written_out_int4_groups(w: torch.Tensor, group: int) -> torch.Tensor:
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], group):
            g = w[r, c0 : c0 + group]
            scale = max(float(g.abs().max()), 1e-8) / 7
            out[r, c0 : c0 + group] = torch.clamp(torch.round(g / scale), -7, 7) * scale
    return out


def test_int4_groups_match_written_out_with_a_short_last_group():
    w = torch.randn(6, 200, generator=torch.Generator().manual_seed(1))
    got = fake_int4_groups(w, 128)  # groups of 128 and 72 columns
    torch.testing.assert_close(got, written_out_int4_groups(w, 128))
    assert all(len(torch.unique(got[r, :128].abs())) <= 8 for r in range(6))
    # group_size 0: one int4 scale per tensor
    per_tensor = fake_quant_weight(w, False, fmt="int4", group_size=0)
    scale = float(w.abs().max()) / 7
    torch.testing.assert_close(per_tensor, torch.clamp(torch.round(w / scale), -7, 7) * scale)


def test_activation_outlier_hurts_int8_per_tensor_more_than_fp8_e4m3():
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(2))
    x[:, 3] *= 100.0  # one outlier channel
    lo, hi = x.min(), x.max()
    normal = torch.ones(64, dtype=torch.bool)
    normal[3] = False
    err_int8 = (fake_quant_asym(x, lo, hi) - x)[:, normal].pow(2).mean()
    amax = torch.maximum(-lo, hi)
    err_e4m3 = (fake_fp8(x, amax, "e4m3") - x)[:, normal].pow(2).mean()
    err_e5m2 = (fake_fp8(x, amax, "e5m2") - x)[:, normal].pow(2).mean()
    # int8's step is ~range/255 for every value; FP8's exponent keeps ~3 (2) mantissa bits
    assert float(err_int8) > 10 * float(err_e4m3)
    assert float(err_e5m2) > float(err_e4m3)  # fewer mantissa bits
    # without the outlier, int8 per tensor is the finer grid for Gaussian data
    y = x.clone()
    y[:, 3] /= 100.0
    e8 = (fake_quant_asym(y, y.min(), y.max()) - y).pow(2).mean()
    e4 = (fake_fp8(y, torch.maximum(-y.min(), y.max()), "e4m3") - y).pow(2).mean()
    assert float(e8) < float(e4)


def test_weight_outlier_hurts_int4_per_tensor_more_than_per_group():
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(3)) * 0.02
    w[5, 7] = 2.0  # one outlier weight
    per_tensor = (fake_quant_weight(w, False, fmt="int4", group_size=0) - w).pow(2).mean()
    per_group = (fake_quant_weight(w, False, fmt="int4", group_size=128) - w).pow(2).mean()
    assert float(per_tensor) > 10 * float(per_group)


def _tp_shards(rank: int) -> dict:
    """Quantise shards of one matrix split along each dim over two ranks; compare with the
    full matrix quantised in this process."""
    import torch.distributed as dist

    group = dist.group.WORLD
    w = torch.randn(8, 200, generator=torch.Generator().manual_seed(4))
    w[2, 130] = 9.0
    out = {}
    cases = [("int4", 128, False), ("int4", 0, False), ("e4m3", 0, False), ("e5m2", 0, True)]
    for fmt, gs, per_channel in cases:
        full = fake_quant_weight(w, per_channel, fmt=fmt, group_size=gs)
        for dim in (0, 1):
            local = w.chunk(2, dim=dim)[rank].clone()
            got = fake_quant_weight(local, per_channel, group, dim, fmt, gs)
            out[(fmt, gs, dim)] = torch.equal(got, full.chunk(2, dim=dim)[rank])
    return out


def test_tp_shards_quantise_as_the_full_matrix():
    for result in run_distributed(_tp_shards, 2):
        assert all(result.values()), result
