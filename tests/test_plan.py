"""Memory planner: predicted parameter and optimizer-state bytes match allocated tensors (AdamW,
SOAP, Shampoo; TP=2 shards and ZeRO-1 over DP=2), and `ofs-scale plan` refuses what cannot fit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ofs_scale.analysis.plan import optimizer_state_numel, plan
from ofs_scale.config import load_config
from ofs_scale.testing.distributed import run_distributed
from tests.helpers import random_docs, tiny_overrides, write_indexed_dataset

ROOT = Path(__file__).resolve().parents[1]
# max_precond_dim 48: the 128-wide MLP sides and the 512-row vocab get no SOAP factor and
# several Shampoo blocks, the 32- and 96-wide sides get one.
PLAN_OVERRIDES = ["optim.max_precond_dim=48", "model.block=op"]


def _cfg(out: Path, *extra: str):
    overrides = tiny_overrides(Path("unused"), Path("unused"), out)
    return load_config(None, [*overrides, *PLAN_OVERRIDES, *extra])


def _allocated(rank: int, out: str, layouts: list[tuple[int, list[str]]]) -> list[dict]:
    """Per layout: this rank's parameter count and optimizer-state bytes, really allocated."""
    from ofs_scale.model.build import build_model
    from ofs_scale.optim import build_optimizer
    from ofs_scale.optim.sharded import state_bytes
    from ofs_scale.parallel.mesh import init_mesh

    results = []
    for tp, extra in layouts:
        cfg = _cfg(Path(out), f"parallel.tp={tp}", *extra)
        mesh = init_mesh(tp, 1)
        model = build_model(cfg, mesh, cfg.data.vocab_size)
        named = list(model.named_parameters())
        opt = build_optimizer(named, cfg.optim, mesh)
        numel = sum(p.numel() for _, p in named)
        results.append({"params": numel, "optim": state_bytes(opt)})
    return results


LAYOUTS = [
    (2, ["optim.name=adamw"]),
    (2, ["optim.name=soap"]),
    (2, ["optim.name=shampoo"]),
    (2, ["optim.name=muon"]),
    (1, ["optim.name=soap", "optim.shard=true"]),
    (1, ["optim.name=adamw", "optim.shard=true"]),
]


@pytest.fixture(scope="module")
def single_process():
    """The planner's own single-process group, torn down after this module."""
    yield
    from ofs_scale.parallel.mesh import destroy_mesh

    destroy_mesh()


def test_predictions_match_allocated_tensors(tmp_path, single_process):
    # one rank alone: the whole model, unsharded state
    names = ("adamw", "soap", "shampoo", "muon")
    (single,) = run_distributed(
        _allocated, 1, str(tmp_path), [(1, [f"optim.name={n}"]) for n in names]
    )
    alone = list(zip(names, single))
    # two ranks: TP=2 shards for every optimizer, then DP=2 with ZeRO-1 ownership
    both = run_distributed(_allocated, 2, str(tmp_path), LAYOUTS)
    for name, got in alone:
        p = plan(_cfg(tmp_path, f"optim.name={name}"), gpus=1)
        assert p.params == got["params"]
        assert p.optim_bytes == pytest.approx(got["optim"], rel=0.05), name
    for i, (tp, extra) in enumerate(LAYOUTS):
        p = plan(_cfg(tmp_path, f"parallel.tp={tp}", *extra), gpus=2)
        params = max(r[i]["params"] for r in both)
        optim = max(r[i]["optim"] for r in both)
        assert p.params == params, extra
        assert p.param_bytes == p.grad_bytes == 4 * params
        assert p.optim_bytes == pytest.approx(optim, rel=0.05), (tp, extra)
    # sharding really divides the state: the fullest DP rank holds well under the whole
    whole = plan(_cfg(tmp_path, "optim.name=soap", "optim.shard=false"), gpus=2).optim_bytes
    sharded = plan(_cfg(tmp_path, "optim.name=soap", "optim.shard=true"), gpus=2).optim_bytes
    assert sharded < 0.75 * whole


def test_soap_state_formula_by_hand():
    cfg = load_config(None, ["optim.name=soap", "optim.max_precond_dim=100"])
    m, n = 64, 200  # n > max_precond_dim: no R factor and no R basis
    assert optimizer_state_numel((m, n), cfg.optim) == 2 * m * n + 2 * m * m + 1
    shampoo = load_config(None, ["optim.name=shampoo", "optim.max_precond_dim=100"]).optim
    # blocks: rows [0,64) x cols [0,100), [100,200): each 2*64^2 + 2*100^2
    assert optimizer_state_numel((m, n), shampoo) == 2 * m * n + 2 * (2 * 64**2 + 2 * 100**2) + 1
    adamw = load_config(None, ["optim.name=adamw"]).optim
    assert optimizer_state_numel((m, n), adamw) == 2 * m * n + 1


def test_plan_tool_fits_refuses_and_rejects(single_process, capsys, tmp_path):
    from ofs_scale.analysis import plan_cli as tool

    # the dry run opens the configured datasets: a small one with the 7B configs' vocabulary
    data = write_indexed_dataset(tmp_path / "prepared", random_docs(20, 32000, 0), 32000)
    prepared = f"data.datasets=[{{path: {data}}}]"

    op7b = str(ROOT / "configs/op7b.yaml")
    assert tool.main([op7b, "--gpus", "64", "--gpu-mem", "80"]) == tool.FITS
    out = capsys.readouterr().out
    assert "optimizer state" in out and "FLOPs per token" in out
    # the 7B dry run validates and sizes the model on the meta device
    from ofs_scale.trainer.main import dry_run

    dry_run(load_config(op7b, [prepared]))
    assert "6,704,607,232" in capsys.readouterr().out
    p = plan(load_config(op7b), gpus=64)
    assert 6.5e9 < p.total_params < 7.0e9
    assert p.tp * p.pp * p.dp == 64 and p.total(True) < p.total(False) < 80 * 2**30
    # 6 N FLOPs per token dominate; the step time follows from the MFU
    assert p.flops_per_token == pytest.approx(6 * p.total_params, rel=0.1)
    assert math.isclose(p.step_time_s * 64 * 989e12 * 0.4, p.flops_per_token * 512 * 2048)
    # between the two totals: checkpointing is needed, and a config that turns it on fits
    mem = str(4 + (p.total(True) + p.total(False)) / 2 / 2**30)
    assert tool.main([op7b, "--gpus", "64", "--gpu-mem", mem]) == tool.NEEDS_CHECKPOINTING
    assert "train.activation_checkpointing=true" in capsys.readouterr().out
    on = "train.activation_checkpointing=true"
    assert tool.main([op7b, on, "--gpus", "64", "--gpu-mem", mem]) == tool.FITS
    assert tool.main([op7b, "--gpus", "8", "--gpu-mem", "24"]) == tool.DOES_NOT_FIT
    assert "does not fit" in capsys.readouterr().out
    # the Pre-Norm + AdamW baseline validates, sizes and fits on the same 64 GPUs too
    pre7b = str(ROOT / "configs/pre7b.yaml")
    capsys.readouterr()
    dry_run(load_config(pre7b, [prepared]))
    assert "parameters" in capsys.readouterr().out
    assert tool.main([pre7b, "--gpus", "64", "--gpu-mem", "80"]) == tool.FITS
    assert 6.5e9 < plan(load_config(pre7b), gpus=64).total_params < 7.0e9
    # 48 GPUs: dp=6 does not divide the global batch of 512
    assert tool.main([op7b, "--gpus", "48"]) == 2
    assert "global_batch" in capsys.readouterr().out


# GPU fast paths in the plan (issue 14): tiny Pre-Norm configs, all numbers by hand.
FAST_OFF = [
    "parallel.sequence_parallel=false",
    "train.master_weights=false",
    "parallel.overlap_grad_reduce=false",
    "checkpoint.async_save=false",
]


def _pre(tmp_path: Path, *extra: str):
    return _cfg(tmp_path, "model.block=pre", "model.norm=layernorm", *FAST_OFF, *extra)


def test_sequence_parallel_divides_the_replicated_activations_by_tp(tmp_path):
    from ofs_scale.analysis.plan import layer_activation_bytes

    cfg = _pre(tmp_path, "parallel.tp=2")
    d, tokens = cfg.model.d_model, 64
    # fp32: two LayerNorm inputs (4 d each) and the qkv / MLP-up inputs (4 d each) per token
    replicated = tokens * (2 * 4 * d + 2 * 4 * d)
    plain = layer_activation_bytes(cfg, tokens)
    assert plain - layer_activation_bytes(cfg, tokens, sp=True) == replicated // 2
    on = plan(_pre(tmp_path, "parallel.tp=2", "parallel.sequence_parallel=true"), gpus=2)
    off = plan(cfg, gpus=2)
    per_layer = cfg.train.micro_batch * cfg.data.seq_len * (2 * 4 * d + 2 * 4 * d) // 2
    assert off.act_bytes - on.act_bytes == cfg.model.n_layers * per_layer
    assert on.fast["sequence_parallel"] and not off.fast["sequence_parallel"]
    # `auto` counts as on (the plan is for GPUs), but only with tp > 1
    assert plan(_cfg(tmp_path, "parallel.tp=2"), gpus=2).fast["sequence_parallel"]
    assert not plan(_cfg(tmp_path), gpus=1).fast["sequence_parallel"]
    assert not plan(_cfg(tmp_path, "parallel.tp=2", "train.device=cpu"), gpus=2).fast[
        "sequence_parallel"
    ]


def test_master_weights_staging_and_dp_communication_bytes(tmp_path):
    bf16 = ["train.dtype=bf16"]
    off = plan(_pre(tmp_path, *bf16), gpus=1)
    on = plan(_pre(tmp_path, *bf16, "train.master_weights=true"), gpus=1)
    n = on.params
    assert (off.param_bytes, off.grad_bytes, off.master_bytes) == (4 * n, 4 * n, 0)
    # bf16 weights + fp32 gradient buffers + fp32 masters: 2 + 4 + 4 bytes per parameter
    assert (on.param_bytes, on.grad_bytes, on.master_bytes) == (2 * n, 4 * n, 4 * n)
    assert on.static_bytes - off.static_bytes == 2 * n
    # over DP=2 the masters are sharded with the optimizer state: the fullest rank owns less
    dp2 = plan(_pre(tmp_path, *bf16, "train.master_weights=true", "optim.shard=true"), gpus=2)
    assert 0 < dp2.master_bytes < 4 * n and dp2.param_bytes == 2 * n
    # async checkpoints stage the rank's weights, masters and optimizer state in host RAM
    assert dp2.staging_bytes == 0
    staged = plan(
        _pre(tmp_path, *bf16, "train.master_weights=true", "checkpoint.async_save=true"), gpus=2
    )
    assert staged.staging_bytes == staged.param_bytes + staged.master_bytes + staged.optim_bytes
    # DP bytes per step: plain fp32 all-reduce + fp32 weight broadcast is 12 bytes/param
    # (times (dp-1)/dp = 1/2); reduce-to-owner in bf16 + bf16 gather is 2 + 2
    plain = plan(_pre(tmp_path, "optim.shard=true"), gpus=2).comm_bytes
    assert plain["dp_reduce"] + plain["dp_gather"] == 12 * n // 2
    fast = plan(
        _pre(
            tmp_path,
            *bf16,
            "optim.shard=true",
            "train.master_weights=true",
            "parallel.overlap_grad_reduce=true",
            "parallel.grad_reduce_dtype=bf16",
        ),
        gpus=2,
    ).comm_bytes
    assert (fast["dp_reduce"], fast["dp_gather"]) == (2 * n // 2, 2 * n // 2)
    assert plain["tp"] == plain["pp"] == 0


def test_layout_ranking_picks_a_fitting_layout_and_counts_the_bubble(tmp_path, capsys):
    from ofs_scale.analysis import plan_cli as tool
    from ofs_scale.analysis.layouts import rank_layouts, step_model

    cfg = _cfg(tmp_path, "train.global_batch=16", "train.dtype=bf16")
    smallest = _cfg(tmp_path, "train.global_batch=16", "train.dtype=bf16", "train.micro_batch=1")
    # 0.9 of what tp=1 x pp=1 needs at its smallest (micro batch 1, checkpointing): none fits
    mem_gib = 1 + 0.9 * plan(smallest, gpus=4).total(True) / 2**30
    ranked = rank_layouts(cfg, 4, gpu_mem_gib=mem_gib, reserve_gib=1)
    layouts = {(x.tp, x.pp, x.micro_batch, x.checkpointing) for x in ranked}
    assert (2, 2, 1, False) in layouts and (1, 1, 4, True) in layouts
    fits = [x for x in ranked if x.fits]
    assert fits and ranked[0].fits and (ranked[0].tp, ranked[0].pp) != (1, 1)
    assert all(x.total_bytes <= (mem_gib - 1) * 2**30 for x in fits)
    assert [x.step.step_s for x in fits] == sorted(x.step.step_s for x in fits)
    assert not any(x.fits for x in ranked if (x.tp, x.pp) == (1, 1))
    # the pipeline bubble is (pp - 1) / (m + pp - 1) of the step, m micro batches per DP rank
    pp2 = _cfg(tmp_path, "train.global_batch=16", "parallel.pp=2", "train.micro_batch=2")
    p = plan(pp2, gpus=2)
    assert p.n_micro == 8
    s = step_model(pp2, p)
    assert s.bubble == pytest.approx(1 / 9) and 0 < s.mfu < 0.55
    assert (
        tool.main(
            [
                "--gpus",
                "4",
                "--rank",
                "--gpu-mem",
                str(mem_gib),
                "--reserve",
                "1",
                *_overrides_for_cli(tmp_path),
            ]
        )
        == tool.FITS
    )
    assert "fastest first" in capsys.readouterr().out


def _overrides_for_cli(tmp_path: Path) -> list[str]:
    overrides = tiny_overrides(Path("unused"), Path("unused"), tmp_path)
    return [
        str(ROOT / "configs/smoke.yaml"),
        *overrides,
        *PLAN_OVERRIDES,
        "train.global_batch=16",
        "train.dtype=bf16",
    ]
