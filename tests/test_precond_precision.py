"""`optim.precond_precision`: TF32 rounding, the reduced-precision refresh matmuls, and their
effect on SOAP and Shampoo against fp32 (benchmarks/bench_precond_precision.py has the
figures)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ofs_scale.config import OptimConfig
from ofs_scale.optim import SOAP, Shampoo
from ofs_scale.optim.precision import refresh_mm, round_to_tf32
from tests.helpers import make_problem

pytestmark = pytest.mark.usefixtures("single_thread")


def test_tf32_rounding_keeps_ten_mantissa_bits():
    x = torch.tensor([1 + 2**-10, 1 + 2**-11, 1 + 2**-12, -(1 + 2**-11), 3.0, float("inf")])
    want = torch.tensor([1 + 2**-10, 1 + 2**-10, 1.0, -(1 + 2**-10), 3.0, float("inf")])
    assert torch.equal(round_to_tf32(x), want)


def test_refresh_matmul_errors_match_the_formats():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 64, generator=gen), torch.randn(64, 64, generator=gen)
    exact = a.double() @ b.double()

    def err(precision: str) -> float:
        got = refresh_mm(a, b, precision).double()
        return float((got - exact).norm() / exact.norm())

    assert err("fp32") < 1e-6
    assert 1e-5 < err("tf32") < 2e-3  # unit roundoff 2^-11
    assert 2e-4 < err("bf16") < 1e-2  # unit roundoff 2^-8
    with pytest.raises(ValueError, match="precond_precision='fp16'"):
        SOAP([("w", nn.Parameter(torch.zeros(2, 2)))], OptimConfig(precond_precision="fp16"))


def _train(cls, precision: str, steps: int = 30) -> torch.Tensor:
    w0, grad = make_problem((24, 16), seed=3)
    p = nn.Parameter(w0.clone())
    cfg = OptimConfig(
        name="soap" if cls is SOAP else "shampoo",
        precondition_frequency=3,
        start_preconditioning_step=1,
        precond_precision=precision,
    )
    opt = cls([("w", p)], cfg)
    for t in range(steps):
        p.grad = grad(p.detach(), t)
        opt.step()
    return p.detach()


@pytest.mark.parametrize("cls", [SOAP, Shampoo])
def test_reduced_precision_refresh_stays_near_fp32(cls):
    ref = _train(cls, "fp32")
    for precision, bound in (("tf32", 0.02), ("bf16", 0.1)):
        w = _train(cls, precision)
        rel = float((w - ref).norm() / ref.norm())
        assert 0 < rel < bound, (precision, rel)  # applied (differs), and close
