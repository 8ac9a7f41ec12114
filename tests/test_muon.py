"""Muon: the Newton-Schulz iteration against a written-out one and against the polynomial it
applies to singular values, the optimizer against pytorch-optimizer's Muon, ZeRO-1 and TP=2
against the single-process optimizer on full matrices, and the Trainer under TP/PP/DP."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from ofs_scale.config import OptimConfig, load_config
from ofs_scale.optim import Muon, ShardedOptimizer, build_optimizer
from ofs_scale.optim.muon import newton_schulz, update_scale, uses_muon
from ofs_scale.parallel.gather import full_named
from ofs_scale.parallel.mesh import init_mesh
from ofs_scale.testing.distributed import run_distributed
from tests.helpers import Losses, tiny_overrides

pytestmark = pytest.mark.usefixtures("single_thread")

COEFFS = (3.4445, -4.7750, 2.0315)
CFG = {"lr": 0.02, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
# name, full shape, TP split dim (-1: not split); the names route embed/head to AdamW
SHAPES = [
    ("embed.tok.weight", (24, 8), 0),
    ("layers.0.attn.qkv.weight", (24, 8), 0),
    ("layers.0.attn.proj.weight", (8, 8), 1),
    ("layers.0.mlp.up.weight", (32, 8), 0),
    ("layers.0.mlp.down.weight", (8, 32), 1),
    ("layers.0.norm1.weight", (8,), -1),
    ("head.weight", (24, 8), 0),
]


def written_out_ns(g: torch.Tensor, steps: int) -> torch.Tensor:
    """The quintic iteration spelled out term by term in fp64, on the wide orientation."""
    a, b, c = COEFFS
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (torch.linalg.matrix_norm(x) + 1e-7)
    for _ in range(steps):
        xxt = x @ x.T
        x = a * x + b * (xxt @ x) + c * (xxt @ xxt @ x)
    return (x.T if tall else x).float()


@pytest.mark.parametrize("shape", [(16, 40), (40, 16), (24, 24)])
def test_newton_schulz_matches_written_out_and_svd_polynomial(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    got = newton_schulz(g, 5, COEFFS)
    torch.testing.assert_close(got, written_out_ns(g, 5), rtol=1e-4, atol=1e-5)
    # NS acts on singular values only: U diag(p^5(s / ||G||_F)) V^T, p(s) = a s + b s^3 + c s^5
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    s = s / (torch.linalg.matrix_norm(g.double()) + 1e-7)
    a, b, c = COEFFS
    for _ in range(5):
        s = a * s + b * s**3 + c * s**5
    torch.testing.assert_close(got, (u * s) @ vh, rtol=1e-4, atol=1e-5, check_dtype=False)
    sv = torch.linalg.svdvals(got)
    assert float(sv.min()) > 0.6 and float(sv.max()) < 1.25  # near-orthogonal, not exactly


def test_update_scale_gives_the_target_rms():
    g = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    q = torch.linalg.svd(g, full_matrices=False)
    o = q.U @ q.Vh  # exactly orthogonal
    rms = float((o * update_scale(32, 128, 0.2)).pow(2).mean().sqrt())
    assert rms == pytest.approx(0.2, rel=1e-5)


def make_params(seed: int = 0) -> list[tuple[str, nn.Parameter]]:
    gen = torch.Generator().manual_seed(seed)
    return [(n, nn.Parameter(torch.randn(s, generator=gen) * 0.3)) for n, s, _ in SHAPES]


def full_grad(name: str, w: torch.Tensor, step: int, index: int) -> torch.Tensor:
    """A gradient of the full weight: a function of the weight plus noise seeded by position."""
    gen = torch.Generator().manual_seed(1000 * step + index)
    return w * 0.5 + torch.randn(w.shape, generator=gen)


def test_muon_routes_embeddings_head_and_vectors_to_adamw():
    named = make_params()
    routed = {n: uses_muon(n, p, ["embed", "head"]) for n, p in named}
    assert [n for n, m in routed.items() if m] == [n for n, _, _ in SHAPES[1:5]]
    assert all(uses_muon(n, p, []) for n, p in named if p.ndim == 2)


def test_matches_pytorch_optimizer_muon(monkeypatch):
    po = pytest.importorskip("pytorch_optimizer")
    from pytorch_optimizer.optimizer.muon import base

    # The reference iterates in bf16 by default; fp32 makes the comparison one of rounding.
    fp32_ns = functools.partial(base.zero_power_via_newton_schulz_5, dtype=torch.float32)
    monkeypatch.setattr(base, "zero_power_via_newton_schulz_5", fp32_ns)
    cfg = OptimConfig(name="muon", **CFG)
    ours, theirs = make_params(), make_params()
    opt = Muon(ours, cfg)
    muon = [p for n, p in theirs if uses_muon(n, p, cfg.muon_adamw)]
    adam_2d = [p for n, p in theirs if p.ndim == 2 and not uses_muon(n, p, cfg.muon_adamw)]
    vectors = [p for _, p in theirs if p.ndim < 2]
    ref = po.Muon(
        [
            {"params": muon, "use_muon": True, "weight_decay": cfg.weight_decay},
            {"params": adam_2d, "use_muon": False, "weight_decay": cfg.weight_decay},
            {"params": vectors, "use_muon": False, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        momentum=0.95,
        nesterov=True,
        ns_steps=5,
        ns_coeffs=COEFFS,
        use_adjusted_lr=True,  # Moonlight's 0.2 * sqrt(max(A, B))
        adamw_lr=cfg.lr,
        adamw_betas=cfg.betas,
        adamw_eps=cfg.eps,
        foreach=False,
    )
    for step in range(6):
        for named, o in ((ours, opt), (theirs, ref)):
            for i, (n, p) in enumerate(named):
                p.grad = full_grad(n, p.detach(), step, i)
            o.step()
    start = make_params()
    for (n, a), (_, b), (_, w0) in zip(ours, theirs, start):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
        assert float((a - w0).abs().max()) > 1e-2, n  # every parameter moved


def shard(t: torch.Tensor, dim: int, tp: int, rank: int) -> torch.Tensor:
    return t if dim < 0 or tp == 1 else t.chunk(tp, dim=dim)[rank].clone()


def _tp_dp_vs_full(rank: int) -> dict:
    """Muon through build_optimizer at TP=2 x DP=2 (ZeRO-1 over DP, gathers over TP) against
    the plain optimizer on full matrices in this process."""
    mesh = init_mesh(2, 1)
    cfg = OptimConfig(name="muon", **CFG)
    full, ref_named = make_params(), make_params()
    named = []
    for (n, w), (_, _, dim) in zip(full, SHAPES):
        p = nn.Parameter(shard(w.detach(), dim, mesh.tp, mesh.tp_rank))
        if dim >= 0:
            p.tensor_model_parallel, p.partition_dim = True, dim
        named.append((n, p))
    opt = build_optimizer(named, cfg, mesh)
    ref = Muon(ref_named, cfg)
    for step in range(4):
        for i, ((n, p), (_, q), (_, _, dim)) in enumerate(zip(named, ref_named, SHAPES)):
            q.grad = full_grad(n, q.detach(), step, i)
            p.grad = shard(q.grad, dim, mesh.tp, mesh.tp_rank)
        opt.step()
        ref.step()
    got = full_named(named, mesh)
    diff = {n: float((got[n] - q.detach()).abs().max()) for n, q in ref_named}
    return {"sharded": isinstance(opt, ShardedOptimizer), "diff": diff, "owned": opt.owned_names()}


def test_tp2_dp2_equals_full_matrix_optimizer():
    results = run_distributed(_tp_dp_vs_full, 4)
    for r in results:
        assert r["sharded"]
        assert max(r["diff"].values()) < 1e-5, r["diff"]
    # TP peers (ranks 0,1 and 2,3) own the same parameters; the DP ranks split them
    assert results[0]["owned"] == results[1]["owned"]
    assert results[2]["owned"] == results[3]["owned"]
    assert set(results[0]["owned"]).isdisjoint(results[2]["owned"])
    assert set(results[0]["owned"]) | set(results[2]["owned"]) == {n for n, _, _ in SHAPES}


def _train(rank: int, overrides: list[str], ckpt: bool = False) -> tuple[list[float], dict]:
    from ofs_scale.trainer.checkpointing import CheckpointCallback
    from ofs_scale.trainer.loop import Trainer

    cfg = load_config(None, overrides)
    rec = Losses()
    trainer = Trainer(cfg, callbacks=[rec, CheckpointCallback()] if ckpt else [rec])
    trainer.fit()
    return rec.losses, full_named(trainer.named_params, trainer.mesh)


def test_trainer_muon_tp2_pp2_dp2_match_single_process(tiny_corpus, cache_dir, tmp_path):
    base = [*tiny_overrides(tiny_corpus, cache_dir, tmp_path / "m"), "optim.name=muon"]
    base += ["optim.lr=3e-3", "model.n_layers=4"]
    (losses, weights), *_ = run_distributed(_train, 1, base)
    assert losses[-1] < losses[0]
    for layout in (["parallel.tp=2"], ["parallel.pp=2"], []):  # [] on 2 ranks: DP=2
        results = run_distributed(_train, 2, [*base, *layout])
        got_weights: dict = {}
        for got_losses, got in results:
            torch.testing.assert_close(
                torch.tensor(got_losses), torch.tensor(losses), rtol=1e-5, atol=0
            )
            got_weights.update(got)
        for n, w in weights.items():
            torch.testing.assert_close(got_weights[n], w, rtol=1e-4, atol=1e-5, msg=f"{layout} {n}")


def test_checkpoint_at_tp1_resumes_at_tp2_dp1_exactly(tiny_corpus, cache_dir, tmp_path):
    """Momentum and AdamW moments are elementwise: a TP=1 checkpoint continues under TP=2."""
    base = [*tiny_overrides(tiny_corpus, cache_dir, tmp_path / "s"), "optim.name=muon"]
    full = "train.stages=[{name: a, steps: 3, lr_schedule: constant}, {name: b, steps: 2}]"
    half = "train.stages=[{name: a, steps: 3, lr_schedule: constant}]"
    (losses, weights), *_ = run_distributed(_train, 1, [*base, full])
    out = f"run.out_dir={tmp_path / 'r'}"
    run_distributed(_train, 1, [*base, half, out], True)
    results = run_distributed(_train, 2, [*base, full, out, "parallel.tp=2"], True)
    got_weights: dict = {}
    for got_losses, got in results:
        torch.testing.assert_close(
            torch.tensor(got_losses), torch.tensor(losses[3:]), rtol=1e-5, atol=0
        )
        got_weights.update(got)
    for n, w in weights.items():
        torch.testing.assert_close(got_weights[n], w, rtol=1e-4, atol=1e-5, msg=n)
