"""Launcher without SLURM: sweep expansion, a local sweep through submitit's LocalExecutor with a
post-run hook and status, and the signal guard stopping every rank at the same step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ofs_scale.config import ConfigError, load_config
from ofs_scale.launch.sweep import load_sweep, point_name
from ofs_scale.testing.distributed import run_distributed
from ofs_scale.trainer.callbacks import Callback
from tests.helpers import hook_calls, tiny_overrides


def _write_sweep(path: Path, grid: dict, overrides: list[str], out_dir: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            {"name": "grid", "out_dir": str(out_dir), "overrides": overrides, "grid": grid},
            sort_keys=False,
        )
    )
    return path


def test_sweep_expands_grid_into_validated_points(tmp_path):
    grid = {"model.block": ["pre", "op"], "optim.name": ["adamw", "soap"], "optim.lr": [1e-3]}
    sweep = load_sweep(_write_sweep(tmp_path / "s.yaml", grid, ["train.eval_every=7"], tmp_path))
    assert [p.name for p in sweep.points] == [
        "000_block-pre_optim-name-adamw_lr-0.001",
        "001_block-pre_optim-name-soap_lr-0.001",
        "002_block-op_optim-name-adamw_lr-0.001",
        "003_block-op_optim-name-soap_lr-0.001",
    ]
    p = sweep.points[3]
    assert (p.cfg.model.block, p.cfg.optim.name, p.cfg.optim.lr) == ("op", "soap", 1e-3)
    assert p.cfg.train.eval_every == 7
    assert p.cfg.run.out_dir == str(tmp_path / p.name)
    assert p.params == {"model.block": "op", "optim.name": "soap", "optim.lr": 1e-3}
    # list values survive the round trip through a dotted override
    stages = [{"name": "a", "steps": 2}, {"name": "b", "steps": 3}]
    one = load_sweep(_write_sweep(tmp_path / "t.yaml", {"train.stages": [stages]}, [], tmp_path))
    assert [s.steps for s in one.points[0].cfg.train.stages] == [2, 3]
    assert point_name(0, {"train.stages": stages}).startswith("000_stages-")

    with pytest.raises(ConfigError, match=r"sweep point 000_blok-pre.*model\.block"):
        load_sweep(_write_sweep(tmp_path / "u.yaml", {"model.blok": ["pre"]}, [], tmp_path))
    with pytest.raises(ConfigError, match="set per point"):
        load_sweep(_write_sweep(tmp_path / "v.yaml", {"run.seed": [1, 2]}, [], tmp_path))
    with pytest.raises(ConfigError, match="non-empty list"):
        load_sweep(_write_sweep(tmp_path / "w.yaml", {"optim.lr": 0.1}, [], tmp_path))


def test_local_sweep_runs_points_writes_index_and_calls_hooks(
    tiny_corpus, cache_dir, tmp_path, capsys, monkeypatch
):
    from ofs_scale.analysis.report import main as report_main
    from ofs_scale.launch.__main__ import main
    from ofs_scale.launch.status import status

    base = tiny_overrides(tiny_corpus, cache_dir, tmp_path / "unused")
    # the real int8 evaluation hook too, as configs/repro/cpu_grid.yaml uses it
    hook = "launch.post_run=[tests.helpers:record_hook, ofs_scale.quant.hook:post_run]"
    monkeypatch.setenv("OFS_QUANT_ARGS", "--calib-batches 2 --eval-batches 1 --device cpu")
    sweep_dir = tmp_path / "sweep"
    path = _write_sweep(
        tmp_path / "s.yaml", {"model.block": ["pre", "op"]}, [*base, hook], sweep_dir
    )
    assert main(["submit", "--sweep", str(path), "--local", "--wait"]) == 0
    index = json.loads((sweep_dir / "sweep.json").read_text())
    assert [p["params"]["model.block"] for p in index["points"]] == ["pre", "op"]
    for point in index["points"]:
        run_dir = Path(point["out_dir"])
        assert run_dir.parent == sweep_dir and point["job_id"]
        assert hook_calls(run_dir) == [{"block": point["params"]["model.block"], "steps": 3}]
        quant = json.loads((run_dir / "quant_stage_main.json").read_text())
        assert quant["step"] == 3 and set(quant["results"]) >= {"fp", "W8", "A8", "W8A8", "W4"}
        assert load_config(point["config"]).model.block == point["params"]["model.block"]
        assert (run_dir / "checkpoints/stage_main/ofs_meta.json").is_file()
    rows = status(sweep_dir)
    assert [r["state"] for r in rows] == ["COMPLETED", "COMPLETED"]
    assert all(r["step"] == "3" and r["checkpoint"].startswith("stage_main") for r in rows)
    capsys.readouterr()
    assert main(["status", str(sweep_dir)]) == 0
    assert "COMPLETED" in capsys.readouterr().out
    assert main(["tail", index["points"][0]["out_dir"], "-n", "2"]) == 0
    assert "step 3 [main] loss " in capsys.readouterr().out
    # the grid's table: one command over the sweep directory, W8A8 from the hook's result
    assert report_main([str(sweep_dir)]) == 0
    rows = json.loads((sweep_dir / "report.json").read_text())
    assert [r["steps"] for r in rows] == [3, 3]
    assert all(r["w8a8_ppl"] > 0 and r["w8a8_increase_pct"] is not None for r in rows)
    assert "W8A8 ppl" in (sweep_dir / "report.md").read_text()
    assert main(["submit", "--local"]) == 2  # no --config and no --sweep
    assert main(["status", str(tmp_path / "nowhere")]) == 2


class SignalAt(Callback):
    """Sends SIGUSR1 to this process after step `step`, on one rank only."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def post_step(self, trainer, step, record):
        if trainer.mesh.rank == self.rank and step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


def _guarded(rank: int, overrides: list[str]) -> dict:
    from ofs_scale.trainer.loop import Trainer
    from ofs_scale.trainer.preemption import PreemptionGuard, finish_preempted

    os.environ.pop("SLURM_JOB_ID", None)
    cfg = load_config(None, overrides)
    guard = PreemptionGuard().install()
    trainer = Trainer(cfg)
    # rank 1 alone gets the signal during step 2; the guard's vote stops rank 0 there too
    trainer.callbacks = [SignalAt(1, 2), guard, *trainer.callbacks]
    trainer.fit()
    guard.uninstall()
    return {
        "step": trainer.step,
        "stopped": trainer.stopped_early,
        "message": finish_preempted(trainer, guard),
        "loss": trainer.last_record["loss"],
    }


def test_signal_on_one_rank_stops_all_ranks_at_the_same_step(tiny_corpus, cache_dir, tmp_path):
    out = tmp_path / "run"
    overrides = [
        *tiny_overrides(tiny_corpus, cache_dir, out),
        "train.stages=[{name: main, steps: 6, lr_schedule: constant}]",
    ]
    r0, r1 = run_distributed(_guarded, 2, overrides)
    assert r0["step"] == r1["step"] == 2 and r0["stopped"] and r1["stopped"]
    torch.testing.assert_close(r0["loss"], r1["loss"])
    assert "not inside a SLURM job" in r0["message"] and r1["message"] is None
    ckpts = out / "checkpoints"
    assert (ckpts / "step_000002/ofs_meta.json").is_file()
    assert (ckpts / "latest").read_text().strip() == "step_000002"


DETACHED_SUBMIT = """
import sys, time, submitit
from ofs_scale.launch.__main__ import _detached_stdio
executor = submitit.AutoExecutor(folder=sys.argv[1], cluster="local")
with _detached_stdio():
    job = executor.submit(time.sleep, 60)
print(job.job_id, flush=True)
"""


def test_local_submit_returns_while_the_job_runs(tmp_path):
    # A caller capturing the output waits for the pipe to close: without detaching, the job
    # controller holds it until the job ends (the "blocks for minutes").
    from ofs_scale.launch.status import job_state

    done = subprocess.run(
        [sys.executable, "-c", DETACHED_SUBMIT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.split()[-1]
    assert job_state(job_id, "local", tmp_path) == "RUNNING or LOST (no result yet)"


def test_unreachable_slurm_is_one_line(tiny_corpus, cache_dir, tmp_path, monkeypatch, capsys):
    from ofs_scale.launch.__main__ import main

    # a configuration sbatch cannot read: no controller is reachable (or sbatch is missing)
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "missing.conf"))
    argv = tiny_overrides(tiny_corpus, cache_dir, tmp_path / "run")
    assert main(["submit", *argv]) == 2  # no --config: named
    assert "submit needs --config" in capsys.readouterr().out
    config = tmp_path / "c.yaml"
    config.write_text("run: {name: slurmless}\n")
    assert main(["submit", "--config", str(config), *argv]) == 2
    captured = capsys.readouterr()
    out = " ".join((captured.out + captured.err).split())
    assert "Traceback" not in out and "--local" in out, out
    assert "SLURM is not reachable" in out or "sbatch is not on PATH" in out, out
    # the dry run's checks stop a submission before anything is queued
    assert main(["submit", "--config", str(config), *argv, "metrics.sites=[block_09]"]) == 2
    out = capsys.readouterr().out
    assert "error: metrics.sites: unknown site 'block_09'" in out and "SLURM" not in out
