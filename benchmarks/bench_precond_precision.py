"""Accuracy of the SOAP / Shampoo refresh matmuls in TF32 and bf16 against fp32
(`optim.precond_precision`), on a noisy Kronecker-structured least-squares problem.

    .venv/bin/python benchmarks/bench_precond_precision.py [--steps 60] [--shape 256 192]

Two figures per optimizer and precision:

* update error: at every refresh, the reduced-precision optimizer is given the fp32 one's exact
  state, both take the refresh step and the next step on the same gradients, and the relative
  difference of the next step's update ||u - u_fp32|| / ||u_fp32|| is recorded (median, max);
* loss ratio: each precision trains on its own for `--steps` steps; final loss / fp32's;
* a small transformer (d_model 64, 2 layers) trained with SOAP for `--model-steps` steps per
  precision, same data and initial weights: the mean of the last 5 losses against fp32's.

The `fp64` row calibrates the scale: the same refresh matmuls in fp64 (this script swaps them
in), i.e. how far fp32 itself is from exact.

TF32 runs emulated on CPU (operands rounded to TF32's 10-bit mantissa, fp32 accumulation: what
the tensor cores compute, up to the order of the sums).
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from common import parse, smoke_config
from torch import nn

from ofs_scale.config import OptimConfig
from ofs_scale.optim import SOAP, Shampoo, precision, shampoo, soap
from ofs_scale.trainer.loop import Trainer

PRECISIONS = ("fp64", "fp32", "tf32", "bf16")


def refresh_mm(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    """The optimizers' refresh matmul, plus `fp64` (set on the optimizer by `make`)."""
    if mode == "fp64":
        return (a.double() @ b.double()).float()
    return precision.refresh_mm(a, b, mode)


def problem(m: int, n: int, seed: int = 0):
    """(w0, grad(w, step), loss(w)) of 0.5 tr((W - T)^T A (W - T) B) with gradient noise."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(m, m, generator=gen) / math.sqrt(m)
    b = torch.randn(n, n, generator=gen) / math.sqrt(n)
    # eigenvalues spread over ~4 decades, like real gradient factors
    a = a @ torch.diag(torch.logspace(0, -2, m)) @ a.T + 1e-3 * torch.eye(m)
    b = b @ torch.diag(torch.logspace(0, -2, n)) @ b.T + 1e-3 * torch.eye(n)
    target = torch.randn(m, n, generator=gen)
    w0 = torch.randn(m, n, generator=gen)

    def grad(w: torch.Tensor, step: int) -> torch.Tensor:
        noise = torch.randn(m, n, generator=torch.Generator().manual_seed(1000 + step))
        return a @ (w - target) @ b + 0.01 * noise

    def loss(w: torch.Tensor) -> float:
        d = w - target
        return 0.5 * float((d * (a @ d @ b)).sum())

    return w0, grad, loss


def make(cls, w0: torch.Tensor, mode: str, freq: int):
    p = nn.Parameter(w0.clone())
    cfg = OptimConfig(
        name="soap" if cls is SOAP else "shampoo",
        precondition_frequency=freq,
        start_preconditioning_step=1,
        precond_precision="fp32" if mode == "fp64" else mode,
    )
    opt = cls([("w", p)], cfg)
    opt.precond_precision = mode  # fp64 is this script's, past the config's check
    return p, opt


def sync(dst_p, dst, src_p, src) -> None:
    """Give (dst_p, dst) exactly the weight and optimizer state of (src_p, src)."""
    with torch.no_grad():
        dst_p.copy_(src_p)
    dst.state[dst_p] = {
        k: v.clone() if torch.is_tensor(v) else v for k, v in src.state[src_p].items()
    }


def step(p, opt, g: torch.Tensor) -> torch.Tensor:
    """One optimizer step with gradient g; returns the update."""
    before = p.detach().clone()
    p.grad = g.clone()
    opt.step()
    return p.detach() - before


def update_errors(cls, w0, grad, mode: str, steps: int, freq: int) -> list[float]:
    ref_p, ref = make(cls, w0, "fp32", freq)
    p, opt = make(cls, w0, mode, freq)
    errors = []
    for t in range(steps):
        g = grad(ref_p.detach(), t)
        refresh = t > 0 and t % freq == 0
        if refresh:
            sync(p, opt, ref_p, ref)
        u_ref, u = step(ref_p, ref, g), step(p, opt, g)
        if t > freq and (t - 1) % freq == 0:  # the first update through a refreshed basis
            errors.append(float((u - u_ref).norm() / u_ref.norm()))
    return errors


def final_loss(cls, w0, grad, loss, mode: str, steps: int, freq: int) -> float:
    p, opt = make(cls, w0, mode, freq)
    for t in range(steps):
        step(p, opt, grad(p.detach(), t))
    return loss(p.detach())


def model_losses(steps: int, overrides: list[str]) -> dict[str, list[float]]:
    """Training losses of a small transformer with SOAP, per refresh precision (same data,
    same initial weights)."""
    out = {}
    for mode in PRECISIONS[1:]:
        cfg = smoke_config(
            steps,
            "optim.name=soap",
            "optim.precondition_frequency=5",
            f"optim.precond_precision={mode}",
            *SMALL_MODEL,
            *overrides,
        )
        trainer = Trainer(cfg, callbacks=[])
        out[mode] = [float(trainer.train_step()["loss"]) for _ in range(steps)]
    return out


SMALL_MODEL = ["model.d_model=64", "model.n_layers=2", "data.seq_len=64", "train.micro_batch=8"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--freq", type=int, default=5, help="precondition_frequency")
    parser.add_argument("--shape", type=int, nargs=2, default=(256, 192))
    parser.add_argument("--model-steps", type=int, default=40, help="0: skip the model runs")
    args = parse(parser, argv)
    w0, grad, loss = problem(*args.shape)
    print(f"problem {args.shape[0]}x{args.shape[1]}, {args.steps} steps, refresh every {args.freq}")
    print(
        f"{'optimizer':<9} {'precision':<9} {'update err median':>18} {'max':>9} {'loss/fp32':>10}"
    )
    soap.refresh_mm = shampoo.refresh_mm = refresh_mm  # adds the fp64 calibration row
    for cls in (SOAP, Shampoo):
        finals = {m: final_loss(cls, w0, grad, loss, m, args.steps, args.freq) for m in PRECISIONS}
        for mode in PRECISIONS:
            errs = update_errors(cls, w0, grad, mode, args.steps, args.freq)
            ratio = finals[mode] / finals["fp32"]
            med, worst = statistics.median(errs), max(errs)
            print(f"{cls.__name__:<9} {mode:<9} {med:>18.2e} {worst:>9.2e} {ratio:>10.4f}")
    if args.model_steps:
        losses = model_losses(args.model_steps, args.overrides)
        tail = {m: statistics.mean(v[-5:]) for m, v in losses.items()}
        print(f"SOAP on {' '.join(SMALL_MODEL)}, {args.model_steps} steps, mean of last 5 losses:")
        for mode, value in tail.items():
            diff = max(abs(a - b) for a, b in zip(losses[mode], losses["fp32"]))
            ratio = value / tail["fp32"]
            print(f"  {mode}: {value:.4f} ({ratio:.4f}x fp32; largest loss difference {diff:.2e})")


if __name__ == "__main__":
    main()
