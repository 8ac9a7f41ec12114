"""Real int8 (torchao, dynamic per-token activations, per-channel weights) against the simulated
W8A8 protocol with the same options, on one trained checkpoint and the same validation windows."""

from __future__ import annotations

import json

import pytest

from ofs_scale.testing.distributed import run_distributed
from tests.helpers import tiny_overrides

pytest.importorskip("torchao")
pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("single_thread")


def _train_and_quant(rank, overrides, run_dir):
    from ofs_scale.config import load_config
    from ofs_scale.quant.__main__ import main as quant_main
    from ofs_scale.trainer.checkpointing import CheckpointCallback
    from ofs_scale.trainer.loop import Trainer

    Trainer(load_config(None, overrides), callbacks=[CheckpointCallback()]).fit()
    argv = [str(run_dir), "--weights", "channel", "--acts", "dynamic", "--torchao"]
    return quant_main([*argv, "--device", "cpu"])


@pytest.mark.parametrize("block", ["pre", "op"])
def test_torchao_int8_agrees_with_simulated_w8a8(tiny_corpus, cache_dir, tmp_path, block):
    run_dir = tmp_path / "run"
    overrides = [
        *tiny_overrides(tiny_corpus, cache_dir, run_dir),
        f"model.block={block}",
        "model.d_model=64",
        "data.seq_len=64",
        "optim.lr=3e-3",
        "train.eval_batches=4",
        "train.stages=[{name: main, steps: 150, lr_schedule: constant}]",
    ]
    (rc,) = run_distributed(_train_and_quant, 1, overrides, run_dir)
    assert rc == 0
    (path,) = run_dir.glob("quant-wchannel-adynamic-*.json")
    result = json.loads(path.read_text())
    rows, real = result["results"], result["torchao"]
    assert "W8A8 torchao" in rows
    assert "| W8A8 torchao |" in path.with_suffix(".md").read_text()
    # the export computes the model we evaluate ...
    assert abs(real["export_fp_vs_fp_pct"]) < 1e-3
    # ... int8 kernels move perplexity, and land within 0.5% of the simulation
    assert rows["W8A8 torchao"]["val_ppl"] != rows["fp"]["val_ppl"]
    assert abs(real["vs_simulated_W8A8_pct"]) <= 0.5, real
