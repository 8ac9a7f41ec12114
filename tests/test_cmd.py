"""CMD: synthetic modes are recovered, incremental a/b equal the batch fit, the online callback
is correct under DP=2 and TP=2 and resumes exactly, and the CLI writes its report and plot."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ofs_scale.analysis.cmd import main as cmd_main
from ofs_scale.config import load_config
from ofs_scale.instruments.cmd_online import CmdCallback, load_trajectory
from ofs_scale.metrics.cmd import (
    IncrementalAffine,
    affine_fit,
    allocate_samples,
    assign_modes,
    decompose,
)
from ofs_scale.testing.distributed import run_distributed
from ofs_scale.trainer.callbacks import Callback
from ofs_scale.trainer.checkpointing import CheckpointCallback
from ofs_scale.trainer.loop import Trainer
from tests.helpers import tiny_overrides


def _synthetic(num_per_mode: int = 20, T: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = np.arange(T, dtype=np.float64)
    profiles = np.stack([np.sin(t / 5.0), np.exp(-t / 8.0), (t / T) ** 3])
    truth = np.repeat(np.arange(3), num_per_mode)
    rng.shuffle(truth)
    a = rng.uniform(0.5, 2.0, truth.size) * rng.choice([-1.0, 1.0], truth.size)
    b = rng.normal(0.0, 1.0, truth.size)
    W_KT = a[:, None] * profiles[truth] + b[:, None]
    return W_KT, truth


def test_synthetic_modes_are_recovered_exactly():
    W_KT, truth = _synthetic()
    groups = [f"layer{i % 4}" for i in range(len(truth))]
    result = decompose(W_KT, 3, groups)
    assert len(result.references) == 3
    # a bijection between found and true modes: the assignment is exact up to renaming
    pairs = set(zip(result.labels.tolist(), truth.tolist()))
    assert len(pairs) == 3 and len({p[0] for p in pairs}) == 3
    assert result.error < 1e-6
    assert set(result.layer_errors) == {"layer0", "layer1", "layer2", "layer3"}
    assert max(result.layer_errors.values()) < 1e-6
    # too few modes cannot reconstruct three independent profiles
    assert decompose(W_KT, 2).error > 1e-2


def test_incremental_affine_equals_batch_least_squares():
    gen = torch.Generator().manual_seed(0)
    M, N, T = 3, 50, 30
    R_MT = 0.02 + torch.cumsum(torch.randn(M, T, generator=gen, dtype=torch.float64), 1) * 1e-3
    R_MT[2] = 0.5  # a constant reference: a = 0, b = mean
    labels = torch.randint(0, M, (N,), generator=gen)
    W_NT = torch.randn(N, 1, dtype=torch.float64, generator=gen) * R_MT[labels]
    W_NT += 1e-4 * torch.randn(N, T, generator=gen, dtype=torch.float64)  # not exactly affine
    want_a, want_b = affine_fit(W_NT, R_MT, labels)
    for dtype, tol in [(torch.float64, 1e-9), (torch.float32, 1e-5)]:
        fit = IncrementalAffine(labels, R_MT[:, 0], dtype=dtype)
        for t in range(T):
            fit.update(W_NT[:, t], R_MT[:, t])
        a, b = fit.coefficients()
        torch.testing.assert_close(a, want_a, rtol=tol, atol=tol * want_a.abs().max())
        torch.testing.assert_close(b, want_b, rtol=tol, atol=tol)
        assert not a[labels == 2].any()
        torch.testing.assert_close(fit.reconstruct(R_MT[:, -1]), want_a * R_MT[labels, -1] + want_b)


def test_allocate_samples():
    counts = allocate_samples([10, 1000, 1, 5000, 40], 200, 3)
    assert sum(counts) == 200 and counts[2] == 1 and min(counts[0], counts[4]) >= 3
    assert counts[3] > counts[1] > counts[4]
    assert allocate_samples([2, 3], 100, 1) == [2, 3]  # never more than a tensor holds


class Trajectories(Callback):
    """Test instrument: every local weight's full trajectory at each CMD record, and the
    records (kept by reference, so keys that later callbacks add are seen)."""

    def __init__(self):
        self.W, self.records, self.evals = [], [], []

    def on_train_start(self, trainer):
        self.W.append([p.detach().double().reshape(-1).clone() for p in trainer.params])

    def post_step(self, trainer, step, record):
        self.W.append([p.detach().double().reshape(-1).clone() for p in trainer.params])
        self.records.append(record)

    def on_eval(self, trainer, step, record):
        self.evals.append(record)


def _abs_corr(W_NT: torch.Tensor, R_MT: torch.Tensor) -> torch.Tensor:
    W = W_NT - W_NT.mean(1, keepdim=True)
    R = R_MT - R_MT.mean(1, keepdim=True)
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-300)
    R = R / R.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return (W @ R.T).abs()


def _online(rank: int, runs: list[list[str]]) -> list[dict]:
    out = []
    for overrides in runs:
        cfg = load_config(None, overrides)
        cmd = CmdCallback()
        traj = Trajectories()
        trainer = Trainer(cfg, callbacks=[traj, cmd])
        trainer.fit()
        # Independent batch computation from the full local trajectories.
        refs = cmd.refs.cpu()
        W_KT = torch.as_tensor(load_trajectory(cfg.run.out_dir)[1]) if rank == 0 else None
        worst_a = worst_b = 0.0
        recon = []
        # reference trajectories: the sampled values at the references are the owners' weights,
        # summed over ranks; rebuild them from every rank's full trajectories
        r_hist = torch.zeros(len(refs), len(traj.W), dtype=torch.float64)
        cols = cmd.sampler.columns
        names = [n for n, _ in trainer.named_params]
        for m, k in enumerate(refs.tolist()):
            c = cols[k]
            if c["tp"] == trainer.mesh.tp_rank and trainer.mesh.dp_rank == 0:
                i = names.index(c["name"])
                r_hist[m] = torch.stack([w[i][c["index"]] for w in traj.W])
        dist.all_reduce(r_hist)
        warm = cfg.metrics.cmd.warmup
        for i, fit in enumerate(cmd.fits):
            W_NT = torch.stack([w[i] for w in traj.W], 1)
            # the callback's mode is the best-correlated reference (up to rounding-level ties:
            # weights that only decay correlate perfectly with several references)
            corr_NM = _abs_corr(W_NT[:, :warm], r_hist[:, :warm])
            labels = fit.labels.cpu()
            best = corr_NM.max(dim=1).values
            assert (corr_NM.gather(1, labels[:, None])[:, 0] >= best - 1e-9).all(), names[i]
            assert torch.equal(
                labels[best < 1 - 1e-6],
                assign_modes(W_NT[:, :warm], r_hist[:, :warm])[best < 1 - 1e-6],
            )
            a, b = affine_fit(W_NT, r_hist, labels)
            fa, fb = fit.coefficients()
            worst_a = max(
                worst_a, float((fa.cpu() - a).abs().max() / a.abs().max().clamp_min(1e-6))
            )
            worst_b = max(
                worst_b, float((fb.cpu() - b).abs().max() / b.abs().max().clamp_min(1e-6))
            )
            recon.append((a * r_hist[labels, -1] + b).float())
        # val_loss_cmd equals evaluating the batch-fitted reconstruction
        saved = [p.detach().clone() for p in trainer.params]
        with torch.no_grad():
            for p, w in zip(trainer.params, recon):
                p.copy_(w.view_as(p))
        direct = trainer.evaluate()["val_loss"]
        with torch.no_grad():
            for p, s in zip(trainer.params, saved):
                p.copy_(s)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, refs.tolist())
        out.append(
            {
                "rel_error": [r.get("cmd/rel_error") for r in traj.records],
                "val_loss_cmd": traj.evals[-1]["val_loss_cmd"],
                "val_loss": traj.evals[-1]["val_loss"],
                "direct": direct,
                "worst_a": worst_a,
                "worst_b": worst_b,
                "same_refs": all(g == gathered[0] for g in gathered),
                "W_KT": W_KT,
                "tp_ranks": sorted({c["tp"] for c in cols}),
            }
        )
    return out


def _base(tiny_corpus, cache_dir, tmp) -> list[str]:
    return [
        *tiny_overrides(tiny_corpus, cache_dir, tmp / "run"),
        "train.stages=[{name: main, steps: 5, lr_schedule: constant}]",
        "optim.lr=0.01",
        "metrics.cmd.every=1",
        "metrics.cmd.num_weights=64",
        "metrics.cmd.warmup=3",
        "metrics.cmd.modes=3",
    ]


def _check_run(r: dict) -> None:
    assert r["same_refs"]
    assert r["worst_a"] < 1e-4 and r["worst_b"] < 1e-4  # a, b are stored in fp32
    assert r["val_loss_cmd"] == pytest.approx(r["direct"], rel=1e-5)
    # records at steps 0, 1, 2 fill the warm-up; from step 2 on the reconstruction is logged
    assert r["rel_error"][0] is None and all(0 <= e < 0.5 for e in r["rel_error"][1:])


@pytest.fixture(scope="module")
def dp1_run(tiny_corpus, cache_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cmd")
    overrides = [*_base(tiny_corpus, cache_dir, tmp), f"run.out_dir={tmp}/dp1"]
    ((one,),) = run_distributed(_online, 1, [overrides])
    return one, tmp / "dp1"


def test_online_cmd_single_process_and_cli(dp1_run):
    one, run_dir = dp1_run
    _check_run(one)
    assert one["W_KT"].shape == (64, 6)  # step 0 plus 5 steps
    assert cmd_main([str(run_dir), "--modes", "3", "--max-modes", "4"]) == 0
    report = json.loads((run_dir / "cmd/report.json").read_text())
    assert report["records"] == 6 and report["modes"] == 3
    errors = [report["error_vs_modes"][str(m)] for m in range(1, 5)]
    assert errors[0] > 0 and errors[-1] <= errors[0]
    assert (run_dir / "cmd/cmd.png").stat().st_size > 0
    assert cmd_main([str(run_dir / "missing")]) == 2


def test_online_cmd_dp2_tp2(dp1_run, tiny_corpus, cache_dir, tmp_path):
    one, _ = dp1_run
    base = _base(tiny_corpus, cache_dir, tmp_path)
    dp2 = [*base, f"run.out_dir={tmp_path}/dp2"]
    tp2 = [*base, "parallel.tp=2", f"run.out_dir={tmp_path}/tp2"]
    (dp2_r0, tp2_r0), (dp2_r1, tp2_r1) = run_distributed(_online, 2, [dp2, tp2])
    for r in [dp2_r0, dp2_r1, tp2_r0, tp2_r1]:
        _check_run(r)
    # DP=2 samples the same weights as DP=1: identical trajectories and CMD results
    # weights after Adam steps: 1% of one step (lr 0.01) absolute, as in assert_weights_close
    np.testing.assert_allclose(dp2_r0["W_KT"], one["W_KT"], rtol=1e-5, atol=1e-4)
    assert dp2_r0["val_loss_cmd"] == pytest.approx(one["val_loss_cmd"], rel=1e-4)
    np.testing.assert_allclose(dp2_r0["rel_error"][1:], one["rel_error"][1:], rtol=1e-3)
    assert dp2_r0["tp_ranks"] == [0] and tp2_r0["tp_ranks"] == [0, 1]  # TP: both ranks' shards


def _stages(n: int) -> str:
    names = ["a", "b", "c"][:n]
    return "train.stages=[" + ", ".join(f"{{name: {x}, steps: 2}}" for x in names) + "]"


def _resumes(rank: int, base: list[str], tmp) -> dict:
    """6 steps straight; stopped at step 2 (mid warm-up) and 4 (after the freeze) and resumed;
    and resumed from a step-2 checkpoint whose CMD state was lost."""
    out = {}
    for name, parts in (("straight", [3]), ("resumed", [1, 2, 3]), ("lost", [1, 3])):
        rel, evals = {}, {}
        for n in parts:
            traj = Trajectories()
            cfg = load_config(None, [*base, _stages(n), f"run.out_dir={tmp}/{name}"])
            Trainer(cfg, callbacks=[traj, CmdCallback(), CheckpointCallback()]).fit()
            rel.update({r["step"]: r.get("cmd/rel_error") for r in traj.records})
            evals.update({e["step"]: e.get("val_loss_cmd") for e in traj.evals})
            shards = tmp / name / "checkpoints/stage_a/shards"
            if name == "lost" and n == 1 and rank == 0:
                assert (shards / "pp0_tp0.pt").is_file()
                for f in shards.iterdir():
                    f.unlink()
            dist.barrier()
        out[name] = (rel, evals)
    return out


def test_online_cmd_resumes_exactly(tiny_corpus, cache_dir, tmp_path):
    base = [*_base(tiny_corpus, cache_dir, tmp_path), "metrics.cmd.warmup=4"]
    for r in run_distributed(_resumes, 2, base, tmp_path):  # DP=2: rank 1 reads rank 0's file
        (rel, evals), (rel2, evals2) = r["straight"], r["resumed"]
        assert rel == rel2 and evals == evals2
        assert rel[2] is None and rel[3] is not None and evals[6] is not None
        # the state was lost: the warm-up restarts with records at steps 3-6 and freezes at 6
        rel3, evals3 = r["lost"]
        assert [rel3[s] for s in (2, 3, 4, 5)] == [None] * 4
        assert rel3[6] is not None and rel3[6] != rel[6] and evals3[6] is not None
