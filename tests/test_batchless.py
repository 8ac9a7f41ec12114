"""Batchless norm: statistics converge, gradients flow as specified, micro batching is exact."""

from __future__ import annotations

import pytest
import torch

from ofs_scale.config import load_config
from ofs_scale.instruments.batchless import BatchlessAuxCallback
from ofs_scale.model.batchless import (
    BatchlessNorm,
    aux_loss,
    configure_aux_scaling,
)
from ofs_scale.model.norms import build_norm
from ofs_scale.testing.distributed import run_distributed
from ofs_scale.trainer.loop import Trainer
from tests.helpers import Records, assert_weights_close, first_step_grads, tiny_overrides


def test_mu_sigma_converge_to_data_statistics():
    g = torch.Generator().manual_seed(0)
    mean_D = torch.tensor([2.0, -1.0, 0.0, 0.5])
    std_D = torch.tensor([0.5, 3.0, 1.0, 0.05])
    norm = BatchlessNorm(4)
    opt = torch.optim.Adam([norm.mu, norm.log_sigma], lr=0.05)
    for step in range(600):
        for group in opt.param_groups:
            group["lr"] = 0.05 if step < 400 else 0.005
        x_NTD = mean_D + std_D * torch.randn(64, 8, 4, generator=g)
        opt.zero_grad()
        norm(x_NTD).sum().backward()
        opt.step()
    rel = (norm.log_sigma.detach().exp() / std_D - 1).abs()
    assert rel.max() < 0.05, rel
    assert ((norm.mu.detach() - mean_D).abs() / std_D).max() < 0.05


def test_gradients_flow_exactly_as_stated():
    torch.manual_seed(1)
    x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    norm = BatchlessNorm(6, bias=True, aux_weight=0.7).double()
    with torch.no_grad():
        norm.mu.normal_()
        norm.log_sigma.normal_(0, 0.3)
        norm.weight.normal_()
        norm.bias.normal_()
    target = torch.randn(3, 5, 6, dtype=torch.float64)
    task = ((norm(x) - target) ** 2).sum()
    task.backward()

    # Reference with ordinary autograd: the task loss sees mu/sigma as constants ...
    x_ref = x.detach().clone().requires_grad_(True)
    mu, ls = norm.mu.detach().clone(), norm.log_sigma.detach().clone()
    gamma = norm.weight.detach().clone().requires_grad_(True)
    beta = norm.bias.detach().clone().requires_grad_(True)
    y_ref = (x_ref - mu) / ls.exp() * gamma + beta
    ((y_ref - target) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm.weight.grad, gamma.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm.bias.grad, beta.grad, rtol=1e-12, atol=1e-12)
    # ... and mu/sigma see only the aux loss, which never reaches x.
    mu_r, ls_r = mu.clone().requires_grad_(True), ls.clone().requires_grad_(True)
    x_aux = x.detach().clone().requires_grad_(True)
    (0.7 * aux_loss(x_aux, mu_r, ls_r)).backward()
    assert x_aux.grad is None
    torch.testing.assert_close(norm.mu.grad, mu_r.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm.log_sigma.grad, ls_r.grad, rtol=1e-12, atol=1e-12)

    # With weight 0 the task loss leaves mu/sigma untouched; with n micro batches the aux
    # gradient is divided by n, like the engine's task loss.
    norm.zero_grad()
    configure_aux_scaling(norm, 4)
    norm(x.detach()).sum().backward()
    torch.testing.assert_close(norm.mu.grad, mu_r.grad / 4, rtol=1e-12, atol=1e-12)
    zero = BatchlessNorm(6, aux_weight=0.0).double()
    zero(x.detach()).pow(2).sum().backward()
    assert not zero.mu.grad.any() and not zero.log_sigma.grad.any()


def test_data_init_and_factory(tiny_cfg):
    cfg = tiny_cfg("model.norm=batchless", "model.bln_weight=0.5", "model.bln_data_init=true")
    norm = build_norm("batchless", 4, cfg=cfg.model)
    assert norm.aux_weight == 0.5 and norm.data_init
    x = torch.randn(10, 4) * 3 + 1
    with torch.no_grad():
        norm.eval()(x)
    assert not bool(norm.initialized)  # eval never initialises
    norm.train()(x)
    torch.testing.assert_close(norm.mu.detach(), x.mean(0))
    torch.testing.assert_close(
        norm.log_sigma.detach().exp(), x.std(0, unbiased=False), rtol=1e-4, atol=0
    )
    norm.train()(x * 5)  # only once
    torch.testing.assert_close(norm.mu.detach(), x.mean(0))
    assert "initialized" in norm.state_dict()
    with pytest.raises(ValueError, match="bln_weight"):
        BatchlessNorm(4, aux_weight=-1.0)


def test_data_init_sigma_floor(tiny_cfg):
    """A feature at the 0.02 scale of an initial residual stream starts at sigma = the floor (the
    norm's gain is capped), a wider one at its own std; 0 turns the floor off."""
    x = torch.randn(64, 3) * torch.tensor([0.02, 3.0, 0.5])
    cfg = tiny_cfg("model.norm=batchless", "model.bln_data_init=true")
    norm = build_norm("batchless", 3, cfg=cfg.model)
    assert norm.init_min_sigma == 0.3  # the config default
    norm.train()(x)
    std = x.std(0, unbiased=False)
    expected = torch.stack([torch.tensor(0.3), std[1], std[2]])
    torch.testing.assert_close(norm.log_sigma.detach().exp(), expected, rtol=1e-4, atol=0)
    torch.testing.assert_close(norm.mu.detach(), x.mean(0))
    off = BatchlessNorm(3, data_init=True, init_min_sigma=0.0)
    off.train()(x)
    eps_std = (std.square() + off.eps).sqrt()
    torch.testing.assert_close(off.log_sigma.detach().exp(), eps_std, rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="bln_init_min_sigma"):
        BatchlessNorm(3, init_min_sigma=-1.0)


def _train(rank, runs):
    out = []
    for overrides in runs:
        rec = Records()
        trainer = Trainer(load_config(None, overrides), callbacks=[BatchlessAuxCallback(), rec])
        grads = first_step_grads(trainer)
        trainer.fit()
        params = {n: p.detach().clone() for n, p in trainer.named_params}
        losses = [[r["loss"], r["bln/aux_loss"]] for r in rec.records]
        out.append((losses, params, grads))
    return out


def _base(tiny_corpus, cache_dir, tmp_path) -> list[str]:
    return [
        *tiny_overrides(tiny_corpus, cache_dir, tmp_path / "run"),
        "model.norm=batchless",
        "optim.lr=0.01",
    ]


@pytest.fixture(scope="module")
def single_process_runs(tiny_corpus, cache_dir, tmp_path_factory):
    """The reference: one process, micro batches 1 x 8 and 8 x 1."""
    tmp = tmp_path_factory.mktemp("bln")
    base = _base(tiny_corpus, cache_dir, tmp)
    one = [*base, "train.micro_batch=8", f"run.out_dir={tmp}/a"]
    eight = [*base, "train.micro_batch=1", f"run.out_dir={tmp}/b"]
    return run_distributed(_train, 1, [one, eight])[0]


def _assert_same(run, ref) -> None:
    (losses, params, grads), (l1, p1, g1) = run, ref
    # Gradients (not only Adam's scale-free updates) must agree, mu/log_sigma included.
    assert grads.keys() <= g1.keys() and any(n.endswith(".log_sigma") for n in grads)
    for n, g in grads.items():
        torch.testing.assert_close(g, g1[n], rtol=1e-4, atol=1e-7, msg=n)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(l1), rtol=1e-5, atol=0)
    assert_weights_close(p1, params, lr=0.01)


def test_micro_batching_1x8_equals_8x1(single_process_runs):
    ref, eight = single_process_runs
    losses, _, grads = ref
    assert losses[-1][1] < losses[0][1]  # the aux loss falls
    assert any(grads[n].abs().max() > 0 for n in grads if n.endswith((".mu", ".log_sigma")))
    _assert_same(eight, ref)


def test_dp2_and_pp2_equal_one_process(single_process_runs, tiny_corpus, cache_dir, tmp_path):
    base = _base(tiny_corpus, cache_dir, tmp_path)
    dp2 = [*base, "train.micro_batch=2", f"run.out_dir={tmp_path}/c"]
    pp2 = [*base, "train.micro_batch=1", "parallel.pp=2", f"run.out_dir={tmp_path}/d"]
    for rank_runs in run_distributed(_train, 2, [dp2, pp2]):
        for run in rank_runs:
            _assert_same(run, single_process_runs[0])
