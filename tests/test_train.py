"""Trainer: DP=2 equals DP=1, exact resume, crash-safe checkpoints, non-finite handling."""

from __future__ import annotations

import json

import pytest
import torch

from ofs_scale.checkpoint import CheckpointError
from ofs_scale.checkpoint import manager as ckpt_mod
from ofs_scale.config import load_config
from ofs_scale.testing.distributed import run_distributed
from ofs_scale.trainer.callbacks import Callback
from ofs_scale.trainer.checkpointing import CheckpointCallback
from ofs_scale.trainer.loop import Trainer, TrainingStopped
from tests.helpers import (
    Losses,
    assert_weights_close,
    crashed_save,
    random_docs,
    tiny_overrides,
    write_indexed_dataset,
)


def _train(rank, overrides, with_ckpt=False):
    cfg = load_config(None, overrides)
    rec = Losses()
    cbs = [rec, CheckpointCallback()] if with_ckpt else [rec]
    trainer = Trainer(cfg, callbacks=cbs)
    trainer.fit()
    params = {n: p.detach().clone() for n, p in trainer.named_params}
    return rec.losses, params, trainer.step


def test_dp2_equals_dp1(tiny_corpus, cache_dir, tmp_path):
    base = tiny_overrides(tiny_corpus, cache_dir, tmp_path / "run")
    ((l1, p1, _),) = run_distributed(_train, 1, [*base, f"run.out_dir={tmp_path}/a"])
    r2 = run_distributed(_train, 2, [*base, f"run.out_dir={tmp_path}/b"])
    for losses, params, _ in r2:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(l1), rtol=1e-5, atol=0)
        assert_weights_close(params, p1, lr=1e-3)
    assert l1[-1] < l1[0]


def test_resume_is_exact(tiny_corpus, cache_dir, tmp_path):
    base = [*tiny_overrides(tiny_corpus, cache_dir, tmp_path / "x"), "train.eval_every=2"]
    stages = "train.stages=[{name: a, steps: 4, lr_schedule: warmup}, {name: b, steps: 4}]"
    ((straight, p_straight, _),) = run_distributed(
        _train, 1, [*base, stages, f"run.out_dir={tmp_path}/straight"]
    )
    half = "train.stages=[{name: a, steps: 4, lr_schedule: warmup}]"
    out = f"run.out_dir={tmp_path}/resumed"
    first, _, step = run_distributed(_train, 2, [*base, half, out], True)[0]
    assert step == 4 and (tmp_path / "resumed/checkpoints/stage_a/.metadata").exists()
    # resume with a different DP size: the checkpoint reshards
    ((second, p_resumed, step),) = run_distributed(_train, 1, [*base, stages, out], True)
    assert step == 8 and len(second) == 4
    torch.testing.assert_close(
        torch.tensor(first + second), torch.tensor(straight), rtol=1e-5, atol=0
    )
    assert_weights_close(p_resumed, p_straight, lr=1e-3)


def test_blend_of_megatron_datasets_trains_resumes_and_ignores_dp(tmp_path):
    # datasets written by megatron-core's builder outside our command, plus a manifest
    a = write_indexed_dataset(tmp_path / "a", random_docs(200, 512, 0), 512)
    b = write_indexed_dataset(tmp_path / "b", random_docs(60, 512, 1), 512)
    base = [
        *tiny_overrides(tmp_path / "unused", tmp_path / "cache", tmp_path / "x"),
        f"data.datasets=[{{path: {a}, weight: 0.7}}, {{path: {b}, weight: 0.3}}]",
    ]
    stages = "train.stages=[{name: a, steps: 2, lr_schedule: constant}, {name: b, steps: 2}]"
    ((straight, p_straight, _),) = run_distributed(
        _train, 1, [*base, stages, f"run.out_dir={tmp_path}/straight"]
    )
    out = f"run.out_dir={tmp_path}/resumed"
    half = "train.stages=[{name: a, steps: 2, lr_schedule: constant}]"
    first, _, step = run_distributed(_train, 2, [*base, half, out], True)[0]
    ((second, p_resumed, step),) = run_distributed(_train, 1, [*base, stages, out], True)
    assert step == 4 and len(second) == 2
    torch.testing.assert_close(
        torch.tensor(first + second), torch.tensor(straight), rtol=1e-5, atol=0
    )
    assert_weights_close(p_resumed, p_straight, lr=1e-3)
    assert not (tmp_path / "cache").exists()  # data.corpus was not prepared


def _killed_save(rank, overrides, tmp):
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, callbacks=[CheckpointCallback()])
    trainer.fit()  # 2 steps: periodic step_000001 is written, then stage_main at step 2
    good = {n: p.detach().clone() for n, p in trainer.named_params}

    crashed_save(trainer, ckpt_mod, "commit_dir")  # between the write and the rename
    leftovers = sorted(p.name for p in (tmp / "checkpoints").iterdir())
    fresh = Trainer(cfg, callbacks=[])
    path = fresh.resume()
    restored = {n: p.detach().clone() for n, p in fresh.named_params}
    return leftovers, path.name, fresh.step, all(torch.equal(good[n], restored[n]) for n in good)


def test_killed_save_keeps_previous_checkpoint(tiny_corpus, cache_dir, tmp_path):
    over = [
        *tiny_overrides(tiny_corpus, cache_dir, tmp_path),
        "train.stages=[{name: main, steps: 2}]",
        "checkpoint.every=1",
    ]
    ((leftovers, name, step, same),) = run_distributed(_killed_save, 1, over, tmp_path)
    assert ".tmp-step_000099" in leftovers and "step_000099" not in leftovers
    assert (name, step, same) == ("stage_main", 2, True)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "stage_main"


def _corrupt_then_resume(rank, overrides, tmp):
    cfg = load_config(None, overrides)
    Trainer(cfg, callbacks=[CheckpointCallback()]).fit()
    stage = tmp / "checkpoints" / "stage_main"
    data = sorted(stage.glob("*.distcp"))[0]
    data.write_bytes(data.read_bytes()[:10])  # truncate the newest checkpoint
    messages = []
    fresh = Trainer(cfg, callbacks=[])
    fresh.log = messages.append
    path = fresh.resume()
    return path.name, fresh.step, messages


def test_truncated_checkpoint_is_reported_and_skipped(tiny_corpus, cache_dir, tmp_path):
    over = [
        *tiny_overrides(tiny_corpus, cache_dir, tmp_path),
        "train.stages=[{name: main, steps: 2}]",
        "checkpoint.every=1",
    ]
    ((name, step, messages),) = run_distributed(_corrupt_then_resume, 1, over, tmp_path)
    assert (name, step) == ("step_000001", 1)
    assert any("skipping" in m and "stage_main" in m and "truncated" in m for m in messages)


def _wrong_model_then_broken(rank, overrides, tmp):
    Trainer(load_config(None, overrides), callbacks=[CheckpointCallback()]).fit()
    files = {p: p.stat().st_mtime_ns for p in (tmp / "checkpoints").rglob("*")}
    errors = []
    for change in ("model.d_model=64", "model.block=op", "optim.name=soap"):
        try:
            Trainer(load_config(None, [*overrides, change]), callbacks=[]).resume()
        except CheckpointError as e:
            errors.append(str(e))
    unchanged = files == {p: p.stat().st_mtime_ns for p in (tmp / "checkpoints").rglob("*")}
    for data in (tmp / "checkpoints").glob("*/*.distcp"):
        data.write_bytes(b"")  # every checkpoint truncated: no fresh start over them
    try:
        Trainer(load_config(None, overrides), callbacks=[]).resume()
    except CheckpointError as e:
        errors.append(str(e))
    return errors, unchanged


def test_checkpoint_of_another_model_or_none_usable_stops_the_resume(
    tiny_corpus, cache_dir, tmp_path
):
    over = [
        *tiny_overrides(tiny_corpus, cache_dir, tmp_path),
        "train.stages=[{name: main, steps: 2}]",
        "checkpoint.every=1",
    ]
    ((errors, unchanged),) = run_distributed(_wrong_model_then_broken, 1, over, tmp_path)
    assert unchanged and len(errors) == 4
    assert "model.d_model=32 (this run: 64)" in errors[0] and "config.yaml" in errors[0]
    assert "model.block='pre' (this run: 'op')" in errors[1]
    assert "optim.name='adamw' (this run: 'soap')" in errors[2]
    assert "none of the 2 checkpoints" in errors[3] and "new run.out_dir" in errors[3]


def _nan_run(rank, overrides):
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, callbacks=[])
    with torch.no_grad():
        next(iter(trainer.params)).fill_(float("nan"))
    before = {n: p.detach().clone() for n, p in trainer.named_params}
    with pytest.raises(TrainingStopped) as stopped:  # a clear failure if the run goes on
        trainer.fit()
    msg = str(stopped.value)
    after = {n: p.detach().clone() for n, p in trainer.named_params}
    unchanged = all(torch.equal(before[n].nan_to_num(), after[n].nan_to_num()) for n in before)
    return msg, trainer.step, unchanged


def test_non_finite_steps_are_skipped_then_stop(tiny_corpus, cache_dir, tmp_path):
    over = [*tiny_overrides(tiny_corpus, cache_dir, tmp_path), "train.max_bad_steps=2"]
    ((msg, step, unchanged),) = run_distributed(_nan_run, 1, over)
    assert step == 2 and unchanged
    assert "2 non-finite steps in a row" in msg and "step_000002" in msg
    assert (tmp_path / "checkpoints" / "step_000002" / "ofs_meta.json").exists()


def test_cli_writes_metrics_and_summary(tiny_corpus, cache_dir, tmp_path, capsys):
    from ofs_scale.trainer.main import main

    over = [
        *tiny_overrides(tiny_corpus, cache_dir, tmp_path),
        "train.eval_every=2",
        "train.stages=[{name: main, steps: 4}]",
        "logging.wandb=offline",
    ]
    assert main(over) == 0
    out = capsys.readouterr().out
    assert "val ppl" in out and "run summary" in out
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in ("step", "loss", "lr", "tokens", "tokens_per_s"):
        assert key in steps[0]
    assert [r["step"] for r in recs if "val_loss" in r] == [2, 4]
    assert any((tmp_path / "wandb").iterdir())
    assert main([*over, "model.n_head=2"]) == 2
    assert "did you mean model.n_heads" in capsys.readouterr().out


class FirstMetrics(Callback):
    """The OF and signal-propagation metrics of the first metric step."""

    def __init__(self):
        self.of = {}

    def post_step(self, trainer, step, record):
        if not self.of:
            self.of = {k: v for k, v in record.items() if k.startswith(("of/", "sigprop/"))}


def _losses_and_ckpts(rank, overrides):
    from ofs_scale.instruments.of_metrics import MetricsCallback

    cfg = load_config(None, overrides)
    rec, first = Losses(), FirstMetrics()
    metrics = MetricsCallback(plots=False)
    trainer = Trainer(cfg, callbacks=[rec, metrics, first, CheckpointCallback()])
    trainer.fit()
    names = sorted(p.name for p in trainer.ckpt.root.iterdir())
    return rec.losses, names, first.of


def test_bf16_autocast_tracks_fp32_and_keep_prunes(tiny_corpus, cache_dir, tmp_path):
    over = [
        *tiny_overrides(tiny_corpus, cache_dir, tmp_path),
        "train.stages=[{name: a, steps: 3}, {name: b, steps: 3}]",
        "checkpoint.every=1",
        "checkpoint.keep=2",
        "metrics.every=3",
    ]
    ((fp32, names, of32),) = run_distributed(
        _losses_and_ckpts, 1, [*over, f"run.out_dir={tmp_path}/f"]
    )
    ((bf16, _, of16),) = run_distributed(
        _losses_and_ckpts, 1, [*over, "train.dtype=bf16", f"run.out_dir={tmp_path}/b"]
    )
    torch.testing.assert_close(torch.tensor(bf16), torch.tensor(fp32), rtol=3e-2, atol=0)
    assert bf16 != fp32  # autocast really ran in bf16
    # OF metrics of bf16 activations (measured in fp32) track the fp32 run's at step 3
    assert "of/kurtosis/block_01" in of32 and of16.keys() == of32.keys()
    for k, v in of32.items():
        assert of16[k] == pytest.approx(v, rel=5e-2, abs=1e-3), k
    # stage checkpoints are kept forever, periodic ones only the newest `keep`
    assert names == ["latest", "stage_a", "stage_b", "step_000004", "step_000005"]


def test_fingerprint_covers_what_the_tensors_depend_on():
    from ofs_scale.checkpoint import checkpoint_fingerprint as fp

    def cfg(*over):
        return load_config(None, list(over))

    # SOAP/Shampoo factors are per TP shard: a TP change cannot resume them; AdamW state can
    assert fp(cfg("optim.name=soap")) != fp(cfg("optim.name=soap", "parallel.tp=2"))
    assert fp(cfg()) == fp(cfg("parallel.tp=2", "parallel.pp=2"))
    # init-only settings, RoPE sequence length and hyperparameters may change on resume
    same = cfg("model.init_std=0.01", "data.seq_len=256", "optim.lr=0.5", "train.grad_clip=0")
    assert fp(same) == fp(cfg())
    assert fp(cfg("model.position=learned")) != fp(cfg("model.position=learned", "data.seq_len=64"))
    # defaults are resolved: naming the OP block's default activation changes nothing
    assert fp(cfg("model.block=op")) == fp(cfg("model.block=op", "model.activation=relu"))
