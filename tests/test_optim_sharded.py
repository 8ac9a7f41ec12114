"""ZeRO-1 sharded AdamW/SOAP/Shampoo/Muon: DP=2 equals the single-process optimizer, state is
balanced and disjoint, and Trainer checkpoints reshard DP=2 <-> DP=1 with identical next steps."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from ofs_scale.config import OptimConfig, load_config
from ofs_scale.optim import OPTIMIZERS, ShardedOptimizer, build_optimizer
from ofs_scale.optim.adamw import numel_cost
from ofs_scale.optim.sharded import assign_owners, state_bytes
from ofs_scale.parallel.mesh import Mesh, init_mesh
from ofs_scale.testing.distributed import run_distributed
from ofs_scale.trainer.checkpointing import CheckpointCallback
from ofs_scale.trainer.loop import Trainer
from tests.helpers import Losses, assert_weights_close, tiny_overrides

pytestmark = pytest.mark.usefixtures("single_thread")

CFG = {
    "lr": 3e-3,
    "betas": (0.95, 0.95),
    "weight_decay": 0.01,
    "precondition_frequency": 2,
    "start_preconditioning_step": 2,
}


def transformer_shapes(num_layers: int = 4, d: int = 32) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of a small transformer without embeddings (16 matrices)."""
    out = []
    for i in range(num_layers):
        out += [
            (f"blocks.{i}.attn.qkv.weight", (3 * d, d)),
            (f"blocks.{i}.attn.proj.weight", (d, d)),
            (f"blocks.{i}.mlp.fc1.weight", (4 * d, d)),
            (f"blocks.{i}.mlp.fc2.weight", (d, 4 * d)),
            (f"blocks.{i}.norm.weight", (d,)),
            (f"blocks.{i}.mlp.fc1.bias", (4 * d,)),
        ]
    return out


def make_params(seed: int = 0) -> list[tuple[str, nn.Parameter]]:
    gen = torch.Generator().manual_seed(seed)
    return [(n, nn.Parameter(torch.randn(s, generator=gen) * 0.1)) for n, s in transformer_shapes()]


def set_grads(named, step: int) -> None:
    """The same 'already DP-averaged' gradient on every rank: a function of the weights plus noise
    seeded by (step, position)."""
    for i, (_, p) in enumerate(named):
        gen = torch.Generator().manual_seed(1000 * step + i)
        p.grad = p.detach() * 0.5 + torch.randn(p.shape, generator=gen)


def single_rank_mesh() -> Mesh:
    """A DP=1 mesh for code paths that never communicate at one rank."""
    return Mesh(1, 0, 1, 1, 1, 0, 0, 0, None, None, None, torch.device("cpu"), "gloo")


def test_lpt_ownership_balances_state_bytes():
    for name in ("soap", "shampoo", "adamw", "muon"):
        cfg = OptimConfig(name=name, max_precond_dim=64, **CFG)
        named = make_params()
        per_param = {n: state_bytes(OPTIMIZERS[name]([(n, p)], cfg)) for n, p in named}
        total = sum(per_param.values())
        cost = getattr(OPTIMIZERS[name], "cost", numel_cost)
        for dp in (2, 4):
            owner = assign_owners(named, cost, cfg, dp)
            held = [sum(b for n, b in per_param.items() if owner[n] == r) for r in range(dp)]
            assert max(held) <= 1.15 * total / dp, (name, dp, held, total)
            assert owner == assign_owners(list(reversed(named)), cost, cfg, dp)  # order-free


def test_sharded_at_one_rank_is_exactly_the_plain_optimizer():
    for name in ("soap", "shampoo", "adamw", "muon"):
        cfg = OptimConfig(name=name, shard=True, **CFG)
        named_a, named_b = make_params(), make_params()
        plain = build_optimizer(named_a, cfg, single_rank_mesh())
        sharded = ShardedOptimizer(named_b, cfg, single_rank_mesh(), OPTIMIZERS[name])
        assert type(plain) is OPTIMIZERS[name]
        for step in range(5):
            for named, opt in ((named_a, plain), (named_b, sharded)):
                set_grads(named, step)
                opt.step()
                opt.zero_grad(set_to_none=True)
        for (_, pa), (_, pb) in zip(named_a, named_b):
            assert torch.equal(pa, pb) and pb.grad is None


def _dp2_vs_plain(rank: int) -> dict:
    mesh = init_mesh(1, 1)
    out = {}
    for name in ("soap", "shampoo", "adamw", "muon"):
        cfg = OptimConfig(name=name, max_precond_dim=64, **CFG)
        named_s, named_p = make_params(), make_params()
        sharded = build_optimizer(named_s, cfg, mesh)
        plain = OPTIMIZERS[name](named_p, cfg)
        for step in range(5):
            for named, opt in ((named_s, sharded), (named_p, plain)):
                for group in opt.param_groups:
                    group["lr"] = 3e-3 * (step + 1) / 5  # the trainer's per-step write
                set_grads(named, step)
                opt.step()
                opt.zero_grad(set_to_none=True)
        diff = max(float((a - b).abs().max()) for (_, a), (_, b) in zip(named_s, named_p))
        moved = min(float((a - b).abs().max()) for (_, a), (_, b) in zip(named_s, make_params()))
        out[name] = {
            "sharded": isinstance(sharded, ShardedOptimizer),
            "diff": diff,
            "moved": moved,
            "owned": sorted(sharded.named_state()),
            "bytes": state_bytes(sharded),
            "total": state_bytes(plain),
        }
    return out


def _trainer_runs(rank: int, jobs: list[tuple[list[str], bool]], with_synthetic: bool) -> dict:
    """Trainer runs in this process group, one after the other (and the synthetic checks when
    asked, to share the spawn)."""
    out = {"synthetic": _dp2_vs_plain(rank) if with_synthetic else None, "runs": []}
    for overrides, with_ckpt in jobs:
        cfg = load_config(None, overrides)
        rec = Losses()
        trainer = Trainer(cfg, callbacks=[rec, CheckpointCallback()] if with_ckpt else [rec])
        trainer.fit()
        params = {n: p.detach().clone() for n, p in trainer.named_params}
        out["runs"].append((rec.losses, params, sorted(trainer.optimizer.named_state())))
    return out


@pytest.fixture(scope="module")
def dp_runs(tiny_corpus, cache_dir, tmp_path_factory) -> dict:
    """SOAP through the Trainer: DP=1 and DP=2 straight runs of 5 steps; 3-step runs whose
    checkpoints are resumed under the other DP size; all spawns of this file."""
    tmp = tmp_path_factory.mktemp("sharded")
    base = [
        *tiny_overrides(tiny_corpus, cache_dir, tmp / "x"),
        "optim.name=soap",
        "optim.lr=3e-3",
        "optim.betas=[0.95, 0.95]",
        "optim.weight_decay=0.01",
        "optim.precondition_frequency=2",
    ]
    full = "train.stages=[{name: a, steps: 3, lr_schedule: constant}, {name: b, steps: 2}]"
    half = "train.stages=[{name: a, steps: 3, lr_schedule: constant}]"

    def job(stages, out, ckpt=False):
        return ([*base, stages, f"run.out_dir={tmp / out}"], ckpt)

    dp1 = run_distributed(_trainer_runs, 1, [job(full, "s1"), job(half, "h1", True)], False)
    shutil.copytree(tmp / "h1/checkpoints", tmp / "r2/checkpoints")
    jobs2 = [job(full, "s2"), job(half, "h2", True), job(full, "r2", True)]
    dp2 = run_distributed(_trainer_runs, 2, jobs2, True)
    shutil.copytree(tmp / "h2/checkpoints", tmp / "r1/checkpoints")
    resumed1 = run_distributed(_trainer_runs, 1, [job(full, "r1", True)], False)
    return {"dp1": dp1[0]["runs"], "dp2": dp2, "resumed1": resumed1[0]["runs"][0]}


def test_dp2_sharded_equals_plain_and_splits_state(dp_runs):
    ranks = [r["synthetic"] for r in dp_runs["dp2"]]
    names = {n for n, _ in transformer_shapes()}
    for name in ("soap", "shampoo", "adamw", "muon"):
        r0, r1 = ranks[0][name], ranks[1][name]
        assert r0["sharded"] and r1["sharded"]
        assert r0["diff"] == 0.0 and r1["diff"] == 0.0, name
        assert r0["moved"] > 0 and r1["moved"] > 0
        assert set(r0["owned"]).isdisjoint(r1["owned"])
        assert set(r0["owned"]) | set(r1["owned"]) == names
        assert r0["bytes"] + r1["bytes"] == r0["total"]
        print(f"{name}: per-rank state bytes {r0['bytes']}, {r1['bytes']} of {r0['total']}")
        assert max(r0["bytes"], r1["bytes"]) <= 1.15 * r0["total"] / 2


def test_trainer_soap_dp2_equals_dp1_and_reshards(dp_runs):
    (losses, params, owned), _ = dp_runs["dp1"]
    resumed1 = dp_runs["resumed1"]
    dp2 = [r["runs"] for r in dp_runs["dp2"]]
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert len(resumed1[0]) == 2 and all(len(r[2][0]) == 2 for r in dp2)
    for straight2, half2, resumed2 in dp2:
        # DP=2 sharded == DP=1; DP=1 -> DP=2 (resumed2) and DP=2 -> DP=1 (resumed1) continue exactly
        for got in (straight2, resumed2, resumed1):
            want = losses if len(got[0]) == 5 else losses[3:]
            torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(want), rtol=1e-5, atol=0)
            assert_weights_close(got[1], params, lr=3e-3)
        torch.testing.assert_close(
            torch.tensor(half2[0]), torch.tensor(losses[:3]), rtol=1e-5, atol=0
        )
    assert set(dp2[0][0][2]).isdisjoint(dp2[1][0][2])
    assert set(dp2[0][0][2]) | set(dp2[1][0][2]) == set(owned) == set(params)
