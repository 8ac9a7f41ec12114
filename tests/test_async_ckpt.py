"""Asynchronous checkpoint saves (`checkpoint.async_save`): the staged copy is the state at the
save (training goes on meanwhile), the commit waits for every rank, a failed background write
fails on every rank, and a process killed during the background write keeps the previous
checkpoint as `latest`."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp

from ofs_scale.checkpoint import CheckpointError
from ofs_scale.config import load_config
from ofs_scale.testing.distributed import run_distributed
from ofs_scale.trainer.callbacks import Callback
from ofs_scale.trainer.checkpointing import CheckpointCallback
from ofs_scale.trainer.loop import Trainer
from tests.helpers import tiny_overrides


class WeightsAt(Callback):
    """The weights right after optimizer step `step` (before its checkpoint is written)."""

    def __init__(self, step: int) -> None:
        self.step, self.weights = step, {}

    def post_step(self, trainer, step, record) -> None:
        if step == self.step:
            self.weights = {n: p.detach().clone() for n, p in trainer.named_params}


def _patched_write(behaviour):
    """Replace FileSystemWriter.write_data by `behaviour(original, writer, *args)`; returns
    the function that restores it."""
    original = dcp.FileSystemWriter.write_data

    def write_data(self, *args, **kwargs):
        return behaviour(original, self, *args, **kwargs)

    dcp.FileSystemWriter.write_data = write_data
    return lambda: setattr(dcp.FileSystemWriter, "write_data", original)


def _async_dp2(rank: int, overrides: list[str], tmp) -> dict:
    cfg = load_config(None, overrides)
    snap = WeightsAt(1)
    trainer = Trainer(cfg, callbacks=[snap, CheckpointCallback()])
    trainer.fit()
    root = tmp / "checkpoints"
    out = {
        "listing": sorted(p.name for p in root.iterdir()),
        "latest": (root / "latest").read_text().strip(),
    }

    # a background write that fails on rank 1 only: every rank raises, nothing is committed
    def fail_on_rank1(original, writer, *args, **kwargs):
        if rank == 1:
            raise OSError("simulated full disk")
        return original(writer, *args, **kwargs)

    restore = _patched_write(fail_on_rank1)
    try:
        trainer.step = 98
        trainer.save_checkpoint("step_000098")  # returns while the write runs
        with pytest.raises(CheckpointError, match="in the background"):
            trainer.ckpt.wait()
    finally:
        restore()
    out["latest_after_failure"] = (root / "latest").read_text().strip()
    out["committed_98"] = (root / "step_000098").exists()
    # step_000001 holds the weights after step 1, although step 2 changed them during the write
    named = load_config(None, [*overrides, f"checkpoint.resume_from={root}/step_000001"])
    fresh = Trainer(named, callbacks=[])
    path = fresh.resume()
    restored = {n: p.detach() for n, p in fresh.named_params}
    out["resumed"] = (path.name, fresh.step)
    out["exact"] = all(torch.equal(snap.weights[n], restored[n]) for n in snap.weights)
    return out


def test_async_saves_are_snapshots_and_fail_together(tiny_corpus, cache_dir, tmp_path):
    over = [
        *tiny_overrides(tiny_corpus, cache_dir, tmp_path),
        "checkpoint.every=1",
        "checkpoint.async_save=true",
    ]
    for out in run_distributed(_async_dp2, 2, over, tmp_path):
        assert out["listing"] == ["latest", "stage_main", "step_000001", "step_000002"]
        assert out["latest"] == out["latest_after_failure"] == "stage_main"
        assert not out["committed_98"]
        assert out["resumed"] == ("step_000001", 1) and out["exact"]


def _killed_during_write(rank: int, overrides: list[str], tmp) -> None:
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, callbacks=[CheckpointCallback()])
    trainer.fit()  # step_000001, then stage_main at step 2, both committed
    torch.save({n: p.detach().clone() for n, p in trainer.named_params}, tmp / "good.pt")
    writing = threading.Event()

    def write_then_hang(original, writer, *args, **kwargs):
        result = original(writer, *args, **kwargs)  # the tensor files are on disk now
        writing.set()
        time.sleep(3600)
        return result

    _patched_write(write_then_hang)
    with torch.no_grad():
        for p in trainer.params:
            p.add_(1.0)
    trainer.step = 99
    trainer.save_checkpoint("step_000099")
    assert writing.wait(timeout=600)
    os.kill(os.getpid(), signal.SIGKILL)  # dies inside the background write


def _resume(rank: int, overrides: list[str], tmp) -> tuple[str, int, bool]:
    fresh = Trainer(load_config(None, overrides), callbacks=[])
    path = fresh.resume()
    good = torch.load(tmp / "good.pt")
    same = all(torch.equal(good[n], p.detach()) for n, p in fresh.named_params)
    return path.name, fresh.step, same


def test_killed_async_save_keeps_previous_checkpoint(tiny_corpus, cache_dir, tmp_path):
    over = [
        *tiny_overrides(tiny_corpus, cache_dir, tmp_path),
        "train.stages=[{name: main, steps: 2}]",
        "checkpoint.every=1",
        "checkpoint.async_save=true",
    ]
    with pytest.raises(RuntimeError, match=r"rank 0 exited \(code -9\) without a result"):
        run_distributed(_killed_during_write, 1, over, tmp_path)
    root = tmp_path / "checkpoints"
    assert (root / ".tmp-step_000099").is_dir() and not (root / "step_000099").exists()
    assert (root / "latest").read_text().strip() == "stage_main"
    ((name, step, same),) = run_distributed(_resume, 1, over, tmp_path)
    assert (name, step, same) == ("stage_main", 2, True)
