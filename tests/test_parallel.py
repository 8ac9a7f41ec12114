"""TP, PP (1F1B, interleaved, GPipe) and mixes against one process: same loss and full gradients."""

from __future__ import annotations

import pytest
import torch

from ofs_scale.config import load_config
from ofs_scale.data import collate
from ofs_scale.parallel.gather import full_named
from ofs_scale.parallel.grads import average_across_dp
from ofs_scale.testing.distributed import run_distributed
from ofs_scale.trainer.loop import Trainer
from tests.helpers import tiny_overrides

BLOCKS = ["pre", "post", "op"]


def _one_step(rank, base, layout):
    """Loss and full gradients of the first global batch, for each block type."""
    out = {}
    for block in BLOCKS:
        cfg = load_config(None, [*base, *layout, f"model.block={block}"])
        trainer = Trainer(cfg, callbacks=[])
        batches = [collate(trainer.train_split, ids) for ids in trainer.sampler.next()]
        loss = trainer.engine.forward_backward(batches)
        average_across_dp(trainer.params, trainer.mesh)
        if trainer.mesh.dp > 1:
            torch.distributed.all_reduce(loss, group=trainer.mesh.dp_group)
            loss /= trainer.mesh.dp
        grads = full_named(trainer.named_params, trainer.mesh, grads=True)
        out[block] = (float(loss), grads)
    return out


def _merge(results):
    merged = {}
    for block in BLOCKS:
        losses = {r[block][0] for r in results}
        grads = {}
        for r in results:
            grads.update(r[block][1])
        merged[block] = (sorted(losses), grads)
    return merged


@pytest.fixture(scope="module")
def reference(tiny_corpus, cache_dir, tmp_path_factory):
    base = _base(tiny_corpus, cache_dir, tmp_path_factory.mktemp("ref"))
    return base, _merge(run_distributed(_one_step, 1, base, []))


def _base(corpus, cache, out):
    return [
        *tiny_overrides(corpus, cache, out),
        "model.n_layers=4",
        "train.micro_batch=2",
        "model.beta_trainable=true",
    ]


LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "pp2_1f1b": (2, ["parallel.pp=2", "parallel.schedule=1f1b"]),
    "pp2_interleaved": (
        2,
        ["parallel.pp=2", "parallel.schedule=interleaved", "parallel.virtual_stages=2"],
    ),
    "pp2_gpipe": (2, ["parallel.pp=2", "parallel.schedule=gpipe"]),
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
    "tp2_dp2": (4, ["parallel.tp=2"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, reference):
    base, ref = reference
    world, extra = LAYOUTS[layout]
    got = _merge(run_distributed(_one_step, world, base, extra))
    for block in BLOCKS:
        ref_loss, ref_grads = ref[block]
        losses, grads = got[block]
        for loss in losses:  # every rank reports the same loss
            assert loss == pytest.approx(ref_loss[0], rel=1e-5), (layout, block)
        assert set(grads) == set(ref_grads), (layout, block)
        for name, g in ref_grads.items():
            torch.testing.assert_close(
                grads[name], g, rtol=1e-4, atol=1e-6, msg=f"{layout} {block} {name}"
            )


def _train_save_eval(rank, over):
    from ofs_scale.trainer.checkpointing import CheckpointCallback

    cfg = load_config(None, over)
    trainer = Trainer(cfg, callbacks=[CheckpointCallback()])
    trainer.fit()
    ev = trainer.evaluate()["val_loss"]
    return ev, full_named(trainer.named_params, trainer.mesh), trainer.step, trainer.facts


def test_checkpoint_reshards_tp2_pp2_to_single(tiny_corpus, cache_dir, tmp_path):
    over = [*_base(tiny_corpus, cache_dir, tmp_path), "train.stages=[{name: a, steps: 2}]"]
    results = run_distributed(_train_save_eval, 4, [*over, "parallel.tp=2", "parallel.pp=2"])
    params = {}
    for _, p, _, _ in results:
        params.update(p)
    ((ev1, p1, step, facts),) = run_distributed(_train_save_eval, 1, over)  # resumes: no steps
    assert step == 2
    # the start-up table's parameter count, summed over TP and PP, is the single process's
    assert {r[3].num_params for r in results} == {facts.num_params}
    assert {r[3].micro_batches for r in results} == {4}  # 8 / (2 per micro batch x dp 1)
    assert ev1 == pytest.approx(results[0][0], rel=1e-6)
    for name, t in p1.items():
        torch.testing.assert_close(params[name], t, rtol=0, atol=0, msg=name)
