"""psBN equals batch norm at alpha=0 and is DP-exact; collapse metrics are exact and layout-free."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ofs_scale.config import load_config
from ofs_scale.instruments.collapse import CollapseCallback, dead_fraction, gamma_small_fractions
from ofs_scale.model.psbn import PostShiftBatchNorm
from ofs_scale.testing.distributed import run_distributed
from ofs_scale.trainer.loop import Trainer
from tests.helpers import Records, first_step_grads, tiny_overrides


def _global_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x_BTD = torch.randn(4, 5, 6, generator=g, dtype=torch.float64) * 2 + 1
    target_BTD = torch.randn(4, 5, 6, generator=g, dtype=torch.float64)
    return x_BTD, target_BTD


def _psbn_step(norm: PostShiftBatchNorm, x_BTD: torch.Tensor, target_BTD: torch.Tensor, scale):
    """One train forward/backward of a loss that is the mean over this rank's tokens."""
    x = x_BTD.clone().requires_grad_(True)
    y = norm.train()(x)
    ((y - target_BTD) ** 2 * torch.arange(6.0, dtype=y.dtype)).mean().mul(scale).backward()
    return y.detach(), x.grad


def test_alpha_zero_equals_batch_norm_and_alpha_shifts():
    x_BTD, target_BTD = _global_batch()
    norm = PostShiftBatchNorm(6, bias=True, alpha=0.0).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    ref = nn.BatchNorm1d(6).double()
    ref.load_state_dict(norm.state_dict())  # same names: weight, bias, running stats
    y, gx = _psbn_step(norm, x_BTD, target_BTD, 1.0)
    x = x_BTD.clone().requires_grad_(True)
    y_ref = ref.train()(x.reshape(-1, 6)).reshape(4, 5, 6)
    ((y_ref - target_BTD) ** 2 * torch.arange(6.0, dtype=y.dtype)).mean().backward()
    torch.testing.assert_close(y, y_ref.detach())
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(norm.weight.grad, ref.weight.grad)
    torch.testing.assert_close(norm.bias.grad, ref.bias.grad)
    torch.testing.assert_close(norm.running_mean, ref.running_mean)
    torch.testing.assert_close(norm.running_var, ref.running_var)
    # eval uses the running statistics; alpha is a constant shift after the affine map
    torch.testing.assert_close(
        norm.eval()(x_BTD), ref.eval()(x_BTD.reshape(-1, 6)).reshape(4, 5, 6)
    )
    norm.alpha = 0.1
    torch.testing.assert_close(
        norm.eval()(x_BTD), ref.eval()(x_BTD.reshape(-1, 6)).reshape(4, 5, 6) + 0.1
    )
    assert {"running_mean", "running_var"} <= set(norm.state_dict())
    # a forward on uninitialised (here: NaN) memory leaves the running statistics alone
    before = norm.running_mean.clone(), norm.running_var.clone()
    norm.train()(torch.full_like(x_BTD, float("nan")))
    assert torch.equal(norm.running_mean, before[0]) and torch.equal(norm.running_var, before[1])


def test_dead_fraction_and_small_gains_exact():
    # 5 hidden units; units 1 and 3 never positive over the micro batch (unit 4 fires once).
    h_BTF = -torch.rand(2, 3, 5)
    h_BTF[:, :, 0] = 1.0
    h_BTF[0, 1, 2] = 0.5
    h_BTF[1, 2, 4] = 1e-6
    h_BTF[:, :, 3] = 0.0  # zero is not positive
    assert dead_fraction(h_BTF) == 2 / 5
    model = nn.Module()
    model.a = PostShiftBatchNorm(4)
    model.b = nn.LayerNorm(8)
    model.c = nn.Linear(4, 4)
    with torch.no_grad():
        model.a.weight.copy_(torch.tensor([0.0, 0.5, -0.005, 0.01]))
        model.b.weight[:3] = 1e-3
    assert gamma_small_fractions(model) == {"a": 0.5, "b": 3 / 8}


def _dp_module_check(rank: int) -> dict:
    x_BTD, target_BTD = _global_batch()
    norm = PostShiftBatchNorm(6, bias=True, alpha=0.1, dp_group=dist.group.WORLD).double()
    # each rank holds half the sequences; its loss is the mean over its tokens
    y, gx = _psbn_step(
        norm, x_BTD[2 * rank : 2 * rank + 2], target_BTD[2 * rank : 2 * rank + 2], 1.0
    )
    for p in (norm.weight, norm.bias):
        dist.all_reduce(p.grad)
        p.grad /= 2
    return {
        "y": y,
        "gx": gx,
        "gw": norm.weight.grad,
        "gb": norm.bias.grad,
        "rm": norm.running_mean,
        "rv": norm.running_var,
    }


def _train(rank: int, runs: list[list[str]], module_check: bool) -> list:
    out = [_dp_module_check(rank)] if module_check else []
    for overrides in runs:
        rec = Records()
        trainer = Trainer(load_config(None, overrides), callbacks=[CollapseCallback(), rec])
        grads = first_step_grads(trainer)
        trainer.fit()
        buffers = {n: b.clone() for n, b in trainer.engine.state_module.named_buffers()}
        out.append((rec.records, grads, buffers))
    return out


def test_dp2_tp2_equal_dp1(tiny_corpus, cache_dir, tmp_path):
    base = [
        *tiny_overrides(tiny_corpus, cache_dir, tmp_path / "run"),
        "model.norm=psbn",
        "model.activation=relu",
        "metrics.every=2",
        "metrics.sequences=4",  # positions 0, 2, 4, 6: both DP ranks hold measured sequences
        "optim.lr=0.01",
    ]
    ((ref_records, ref_grads, ref_buffers),) = run_distributed(
        _train, 1, [[*base, "train.micro_batch=8"]], False
    )[0]
    dp2 = [*base, "train.micro_batch=4", f"run.out_dir={tmp_path}/dp2"]
    tp2 = [*base, "train.micro_batch=8", "parallel.tp=2", f"run.out_dir={tmp_path}/tp2"]
    results = run_distributed(_train, 2, [dp2, tp2], True)

    # module level: DP=2 halves equal one process on the whole batch
    x_BTD, target_BTD = _global_batch()
    single = PostShiftBatchNorm(6, bias=True, alpha=0.1).double()
    y, gx = _psbn_step(single, x_BTD, target_BTD, 1.0)
    for rank, (mod, _, _) in enumerate(results):
        torch.testing.assert_close(mod["y"], y[2 * rank : 2 * rank + 2])
        # the single-process loss is the mean of the two ranks' losses: its input gradient is half
        torch.testing.assert_close(mod["gx"], 2 * gx[2 * rank : 2 * rank + 2])
        torch.testing.assert_close(mod["gw"], single.weight.grad)
        torch.testing.assert_close(mod["gb"], single.bias.grad)
        torch.testing.assert_close(mod["rm"], single.running_mean)
        torch.testing.assert_close(mod["rv"], single.running_var)

    # trainer level: psBN statistics and collapse metrics do not depend on the layout
    keys = [k for k in ref_records[1] if k.startswith("collapse/")]
    assert (
        "collapse/dead_frac/mlp_00" in keys and "collapse/gamma_small_frac/layers.1.norm2" in keys
    )
    assert not any(k.startswith("collapse/") for k in ref_records[0])  # step 1: no metric step
    for records, grads, buffers in [run for _, *runs in results for run in runs]:
        for rec, want in zip(records, ref_records, strict=True):
            assert rec["loss"] == pytest.approx(want["loss"], rel=1e-5)
            assert {k: rec[k] for k in keys if k in want} == {k: want[k] for k in keys if k in want}
        # first-step gradients (trained weights would let Adam amplify fp32 rounding noise)
        for n, g in ref_grads.items():
            if grads[n].shape == g.shape:  # TP shards are covered by the loss comparison
                torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-7, msg=n)
        running = [n for n in ref_buffers if n.endswith(("running_mean", "running_var"))]
        assert running
        for n in running:
            torch.testing.assert_close(buffers[n], ref_buffers[n], rtol=1e-4, atol=1e-6, msg=n)
