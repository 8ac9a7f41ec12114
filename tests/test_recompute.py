"""Activation checkpointing (`train.activation_checkpointing`): the same training as without it
(losses, weights, OF and collapse metrics, psBN running statistics, the batchless aux loss)
under DP=2, TP=2, PP=2 and bf16 autocast (DeepSpeed: tests/test_deepspeed.py), and far fewer
activations kept between forward and backward."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch

from ofs_scale.config import load_config
from ofs_scale.model.build import build_model
from ofs_scale.model.recompute import saved_activation_bytes
from ofs_scale.parallel.mesh import init_mesh
from ofs_scale.testing.distributed import run_distributed
from ofs_scale.trainer.loop import Trainer
from tests.helpers import assert_weights_close, tiny_overrides

TIMING = ("tokens_per_s", "step_time_s", "model_tflops_per_s", "mfu")  # wall-clock based


def _with_and_without(rank: int, layouts: list[list[str]]) -> list[dict]:
    out = []
    for overrides in layouts:
        res = {}
        for on in (False, True):
            cfg = load_config(None, [*overrides, f"train.activation_checkpointing={on}"])
            cfg.run.out_dir = f"{cfg.run.out_dir}/{on}"
            trainer = Trainer(cfg)
            trainer.fit()
            lines = (
                (trainer.out_dir / "metrics.jsonl").read_text().splitlines() if rank == 0 else []
            )
            buffers = trainer.engine.state_module.named_buffers()
            res[on] = {
                "records": [json.loads(line) for line in lines],
                "params": {n: p.detach().clone() for n, p in trainer.named_params},
                "buffers": {n: b.clone() for n, b in buffers if b.is_floating_point()},
            }
        out.append(res)
    return out


def test_checkpointing_changes_nothing_but_memory(tiny_corpus, cache_dir, tmp_path):
    base = [
        *tiny_overrides(tiny_corpus, cache_dir, tmp_path / "run"),
        "metrics.every=1",
        "optim.lr=0.01",
    ]
    layouts = {
        "dp2 pre psbn": ["model.norm=psbn", "model.activation=relu"],
        "tp2 op": ["model.block=op", "parallel.tp=2"],
        "pp2 batchless": ["model.norm=batchless", "model.bln_data_init=true", "parallel.pp=2"],
        "dp2 bf16": ["train.dtype=bf16"],
    }
    runs = [
        [*base, *extra, f"run.out_dir={tmp_path}/{i}"] for i, extra in enumerate(layouts.values())
    ]
    ranks = run_distributed(_with_and_without, 2, runs)
    for name, i in zip(layouts, range(len(layouts))):
        for rank in ranks:
            plain, ckpt = rank[i][False], rank[i][True]
            assert_weights_close(ckpt["params"], plain["params"], lr=0.01)
            assert ckpt["buffers"].keys() == plain["buffers"].keys()
            for n, b in plain["buffers"].items():
                torch.testing.assert_close(ckpt["buffers"][n], b, rtol=1e-5, atol=1e-7, msg=n)
        records = zip(ranks[0][i][True]["records"], ranks[0][i][False]["records"], strict=True)
        for got, want in records:
            assert got.keys() == want.keys(), name
            for k, v in want.items():
                if k not in TIMING and isinstance(v, float):
                    assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-7), f"{name} {k}"
        keys = set().union(*ranks[0][i][False]["records"])
        assert {"of/kurtosis/block_01", "loss", "val_loss"} <= keys, name
    assert any(k.startswith("collapse/") for k in set().union(*ranks[0][0][False]["records"]))
    assert any("running_var" in n for n in ranks[0][0][False]["buffers"])


def _kept(rank: int, overrides: list[str]) -> dict[tuple[int, bool], int]:
    kept, mesh = {}, init_mesh(1, 1)
    for layers in (3, 6):
        for on in (False, True):
            over = [*overrides, f"model.n_layers={layers}", f"train.activation_checkpointing={on}"]
            cfg = load_config(None, over)
            model = build_model(cfg, mesh, 512)
            tokens = torch.randint(0, 512, (cfg.train.micro_batch, cfg.data.seq_len))
            kept[layers, on] = saved_activation_bytes(model.train(), partial(model, tokens))
    # stateful norms count one checkpointed forward + backward (with its recompute) once
    for norm in ("batchless", "psbn"):
        over = [*overrides, f"model.norm={norm}", "train.activation_checkpointing=true"]
        model = build_model(load_config(None, over), mesh, 512).train()
        tokens = torch.randint(0, 512, (2, 16))
        model(tokens).float().sum().backward()
        counts = [
            int(m.num_batches_tracked) if norm == "psbn" else m.pop_aux_loss()[1]
            for m in model.modules()
            if type(m).__name__ in ("BatchlessNorm", "PostShiftBatchNorm")
        ]
        kept[norm, True] = counts
    return kept


def test_checkpointing_keeps_only_block_inputs(tiny_corpus, cache_dir, tmp_path):
    (kept,) = run_distributed(_kept, 1, tiny_overrides(tiny_corpus, cache_dir, tmp_path))
    # 3 more checkpointed blocks keep exactly their 3 fp32 inputs (micro 4 x seq 16 x d 32)
    block_input = 4 * 16 * 32 * 4
    assert kept[6, True] - kept[3, True] == 3 * block_input
    assert kept[6, False] - kept[3, False] > 3 * 8 * block_input
    # 2 blocks x 2 norms + the final norm, each counted once despite the recompute
    assert kept["batchless", True] == [1] * 5 and kept["psbn", True] == [1] * 5
