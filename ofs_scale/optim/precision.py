"""`optim.precond_precision`: the precision of the matmuls that refresh SOAP's eigenbases
(F @ Q before the QR step) and rebuild Shampoo's roots (V diag(s) V^T after eigh).

These matmuls are cubic in the factor size and run every `precondition_frequency` steps; eigh
and QR themselves always run in fp32 (fp64 for Shampoo's eigh), and so do the per-step
preconditioner products. Choices:

* `fp32`: plain fp32 matmuls.
* `tf32`: TF32 tensor-core matmuls on CUDA (operands rounded to a 10-bit mantissa, fp32
  accumulation), switched on only around these matmuls. CPUs have no TF32, so on CPU the operands
  are rounded the same way before an fp32 matmul: the same numbers, for accuracy studies.
* `bf16`: operands cast to bf16 (7-bit mantissa), fp32 result.

The default is `fp32`: in SOAP a reduced-precision F @ Q loses the small-eigenvalue directions
of the basis, and the next update moves by ~36% (TF32) or ~200% (bf16) relative to fp32's, far
above fp32's own ~0.1% against fp64 (benchmarks/bench_precond_precision.py, docs/optimizers.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

PRECISIONS = ("fp32", "tf32", "bf16")
TF32_DROPPED_BITS = 13  # fp32 has 23 mantissa bits, TF32 keeps 10


def check_precision(precision: str) -> str:
    """`precision` if it is one of PRECISIONS, else a ValueError naming the choices."""
    if precision not in PRECISIONS:
        raise ValueError(f"optim.precond_precision={precision!r}; use one of {PRECISIONS}")
    return precision


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 `x` rounded to the nearest TF32 value (ties away from zero), kept in fp32."""
    bits = x.contiguous().view(torch.int32)
    half = 1 << (TF32_DROPPED_BITS - 1)
    rounded = (bits + half) & ~((1 << TF32_DROPPED_BITS) - 1)
    out = rounded.view(torch.float32)
    return torch.where(torch.isfinite(x), out, x)


def refresh_mm(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """a @ b in fp32 out, its operands in `precision` (see the module docstring)."""
    if precision == "bf16":
        return (a.bfloat16() @ b.bfloat16()).float()
    if precision != "tf32":
        return a @ b
    if a.device.type != "cuda":
        return round_to_tf32(a) @ round_to_tf32(b)
    with _tf32_matmuls():
        return a @ b


@contextmanager
def _tf32_matmuls() -> Iterator[None]:
    """TF32 for CUDA fp32 matmuls inside (only this matmul: QR and eigh stay fp32)."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = before
