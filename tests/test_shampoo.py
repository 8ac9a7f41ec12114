"""Blocked, Adam-grafted Shampoo against a dense single-tensor reference; AdamW before it starts;
eigh failures fall back without a crash."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from ofs_scale.config import OptimConfig
from ofs_scale.optim import Shampoo
from tests.helpers import make_problem

pytestmark = pytest.mark.usefixtures("single_thread")
META_EPS = 1e-4  # a regulariser the fp32 roots resolve (Meta's default is 1e-12)

CFG = {
    "lr": 3e-3,
    "betas": (0.9, 0.95),
    "eps": 1e-8,
    "weight_decay": 0.01,
    "precondition_frequency": 4,
    "max_precond_dim": 4,
    "start_preconditioning_step": 3,
}


def inv_root_reference(f, eps_rel, eps_abs=None, exponent=0.25):
    """(F + eps I)^(-exponent) in fp64 through an eigendecomposition; eps = eps_rel * lambda_max
    (ofs mode) or the absolute eps_abs (Meta's)."""
    evals, evecs = torch.linalg.eigh(f.double())
    evals = evals.clamp(min=0)
    reg = max(eps_rel * float(evals.max()), 1e-30) if eps_abs is None else eps_abs
    return (evecs @ torch.diag((evals + reg) ** -exponent) @ evecs.T).float()


def meta_root(f, t, sb):
    """Meta's Distributed Shampoo root: bias-corrected factor plus the absolute epsilon."""
    return inv_root_reference(f / (1 - sb**t), 0.0, META_EPS, 0.25 if f.ndim == 2 else 0.5)


def meta_vector_reference(w, grads_fn, steps, lr, b1, b2, eps, freq, start, sb):
    """A 1-D parameter under Meta's Distributed Shampoo: one D x D factor, exponent -1/2, the
    direction P m grafted to Adam's norm; no weight decay on vectors."""
    w = w.clone()
    fl = torch.zeros(w.numel(), w.numel())
    exp_m, exp_v, root = torch.zeros_like(w), torch.zeros_like(w), None
    for t in range(1, steps + 1):
        g = grads_fn(w, t - 1)
        exp_m = b1 * exp_m + (1 - b1) * g
        exp_v = b2 * exp_v + (1 - b2) * g * g
        adam = (exp_m / (1 - b1**t)) / ((exp_v / (1 - b2**t)).sqrt() + eps)
        fl = sb * fl + (1 - sb) * torch.outer(g, g)
        update = adam
        if t >= start:
            if t % freq == 0 or t == start:
                evals, evecs = torch.linalg.eigh((fl / (1 - sb**t)).double())
                root = evecs @ torch.diag((evals.clamp(min=0) + META_EPS) ** -0.5) @ evecs.T
                root = root.float()
            d = root @ exp_m
            update = d * adam.norm() / d.norm()
        w = w - lr * update
    return w


def shampoo_reference(w, grads_fn, steps, lr, b1, b2, eps, wd, freq, block, start, sb, meta=False):
    """Dense blocked Shampoo grafted to Adam, from the algorithm's description (`meta`: Meta's
    bias-corrected factors, absolute epsilon and root schedule)."""
    w = w.clone()
    m_rows, n_cols = w.shape
    rows = [(a, min(a + block, m_rows)) for a in range(0, m_rows, block)]
    cols = [(a, min(a + block, n_cols)) for a in range(0, n_cols, block)]
    blocks = [(r, c) for r in rows for c in cols]
    fl = {b: torch.zeros(b[0][1] - b[0][0], b[0][1] - b[0][0]) for b in blocks}
    fr = {b: torch.zeros(b[1][1] - b[1][0], b[1][1] - b[1][0]) for b in blocks}
    pl, pr = {}, {}
    exp_m, exp_v = torch.zeros_like(w), torch.zeros_like(w)
    for t in range(1, steps + 1):
        g = grads_fn(w, t - 1)
        exp_m = b1 * exp_m + (1 - b1) * g
        exp_v = b2 * exp_v + (1 - b2) * g * g
        adam = (exp_m / (1 - b1**t)) / ((exp_v / (1 - b2**t)).sqrt() + eps)
        for b in blocks:
            (r0, r1), (c0, c1) = b
            gb = g[r0:r1, c0:c1]
            fl[b] = sb * fl[b] + (1 - sb) * gb @ gb.T
            fr[b] = sb * fr[b] + (1 - sb) * gb.T @ gb
        update = adam.clone()
        if t >= start:
            if meta and (t % freq == 0 or t == start):
                pl = {b: meta_root(fl[b], t, sb) for b in blocks}
                pr = {b: meta_root(fr[b], t, sb) for b in blocks}
            elif not meta and (t - start) % freq == 0:
                pl = {b: inv_root_reference(fl[b], 1e-6) for b in blocks}
                pr = {b: inv_root_reference(fr[b], 1e-6) for b in blocks}
            for b in blocks:
                (r0, r1), (c0, c1) = b
                d = pl[b] @ exp_m[r0:r1, c0:c1] @ pr[b]
                update[r0:r1, c0:c1] = d * adam[r0:r1, c0:c1].norm() / d.norm()
        w = w * (1 - lr * wd) - lr * update
    return w


def run_shampoo(params, grad_fns, steps, **cfg_kw):
    cfg = OptimConfig(name="shampoo", **{**CFG, **cfg_kw})
    named = [(f"p{i}", nn.Parameter(w.clone())) for i, w in enumerate(params)]
    opt = Shampoo(named, cfg)
    for t in range(steps):
        for (_, p), fn in zip(named, grad_fns):
            p.grad = fn(p.detach(), t)
        opt.step()
    return [p.detach() for _, p in named], opt


def test_shampoo_matches_dense_reference():
    shapes = [(6, 10), (4, 4), (3, 7)]  # blocks 4+2 x 4+4+2, one block, 3 x 4+3
    problems = [make_problem(s, 10 + seed) for seed, s in enumerate(shapes)]
    got, opt = run_shampoo([w for w, _ in problems], [g for _, g in problems], 25)
    for (w0, fn), w in zip(problems, got):
        ref = shampoo_reference(w0, fn, 25, 3e-3, 0.9, 0.95, 1e-8, 0.01, 4, 4, 3, 0.95)
        torch.testing.assert_close(w, ref, rtol=1e-5, atol=1e-6)
    st = opt.named_state()["p0"]
    assert {k for k in st if k.startswith("PL_")} == {
        f"PL_{i}_{j}" for i in (0, 1) for j in (0, 1, 2)
    }
    assert st["R_1_2"].shape == (2, 2) and st["L_1_2"].shape == (2, 2)


def test_shampoo_meta_mode_matches_written_out_reference():
    """shampoo_mode=meta: bias-corrected factors with an absolute epsilon, roots on multiples of
    the frequency (and at the start), vectors preconditioned with exponent -1/2."""
    shapes = [(6, 10), (4, 4)]
    problems = [make_problem(s, 30 + seed) for seed, s in enumerate(shapes)]
    noise = torch.randn(64, 4, generator=torch.Generator().manual_seed(3))
    vec = (torch.ones(4), lambda w, t: w * torch.arange(1.0, 5.0) + noise[t])
    long_vec = (torch.ones(6), lambda w, t: w - 2.0)  # 6 > max_precond_dim 4: AdamW
    kw = {"shampoo_mode": "meta", "shampoo_epsilon": META_EPS, "start_preconditioning_step": 6}
    params = [w for w, _ in problems] + [vec[0], long_vec[0]]
    fns = [g for _, g in problems] + [vec[1], long_vec[1]]
    got, opt = run_shampoo(params, fns, 25, **kw)
    for (w0, fn), w in zip(problems, got):
        ref = shampoo_reference(w0, fn, 25, 3e-3, 0.9, 0.95, 1e-8, 0.01, 4, 4, 6, 0.95, True)
        torch.testing.assert_close(w, ref, rtol=1e-5, atol=1e-6)
    ref = meta_vector_reference(vec[0], vec[1], 25, 3e-3, 0.9, 0.95, 1e-8, 4, 6, 0.95)
    torch.testing.assert_close(got[2], ref, rtol=1e-5, atol=1e-6)
    assert "PL_0_0" in opt.named_state()["p2"] and "PL_0_0" not in opt.named_state()["p3"]
    # the ofs mode takes vectors by AdamW and schedules roots from the start step: it differs
    ofs, _ = run_shampoo(params, fns, 25, **{**kw, "shampoo_mode": "ofs"})
    assert not torch.allclose(ofs[2], got[2], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ofs[0], got[0], rtol=1e-5, atol=1e-6)


def test_shampoo_is_adamw_before_preconditioning_starts():
    w0, fn = make_problem((5, 3), 20)
    (got,), _ = run_shampoo([w0], [fn], 6, start_preconditioning_step=100)
    ref = nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([ref], lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    for t in range(6):
        ref.grad = fn(ref.detach(), t)
        opt.step()
    torch.testing.assert_close(got, ref.detach(), rtol=1e-6, atol=1e-7)


def test_shampoo_eigh_failure_keeps_identity_and_warns(caplog, monkeypatch):
    def broken(mat):
        raise torch.linalg.LinAlgError("injected failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    w0, fn = make_problem((3, 3), 21)
    with caplog.at_level(logging.WARNING, logger="ofs_scale.optim"):
        (got,), opt = run_shampoo([w0], [fn], 4, start_preconditioning_step=2)
    st = opt.named_state()["p0"]
    assert torch.equal(st["PL_0_0"], torch.eye(3)) and torch.equal(st["PR_0_0"], torch.eye(3))
    assert any("failed (tried float64)" in r.message for r in caplog.records)
    assert torch.isfinite(got).all() and not torch.equal(got, w0)


def test_shampoo_cost_sums_blocks():
    cfg = OptimConfig(name="shampoo", max_precond_dim=4)
    assert Shampoo.cost((8, 4), cfg) == 2 * Shampoo.cost((4, 4), cfg)
    assert Shampoo.cost((7,), cfg) == 7.0
