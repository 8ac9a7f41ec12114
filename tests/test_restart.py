"""Launch path of issue 14: torchrun restarts a failed rank, which resumes from the newest
checkpoint; against a real one-node SLURM, the sbatch scripts hand --cpus-per-task to srun and
MAX_RESTARTS to torchrun, and the submitit launcher runs one torchrun per node with
`launch.max_restarts`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ofs_scale.config import ConfigError, load_config
from ofs_scale.launch.torchrun import run_torchrun, torchrun_argv
from tests.helpers import tiny_overrides
from tests.slurm_cluster import JOB_BUDGET_S, module_cluster, sbatch

ROOT = Path(__file__).resolve().parents[1]

# A rank that dies (SIGKILL) after step 3 in torchrun's first attempt only; checkpoint at step 2.
_DIES_ONCE = """
import os, signal, sys
from ofs_scale.trainer import loop, main
from ofs_scale.trainer.callbacks import Callback

class DieOnce(Callback):
    def post_step(self, trainer, step, record):
        if step == 3 and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
            os.kill(os.getpid(), signal.SIGKILL)

class Trainer(loop.Trainer):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.callbacks.append(DieOnce())

loop.Trainer = Trainer  # main() imports it from loop when it runs
sys.exit(main.main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_restart_resumes_from_last_checkpoint(tiny_corpus, cache_dir, tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "dies_once.py"
    script.write_text(_DIES_ONCE)
    overrides = [
        *tiny_overrides(tiny_corpus, cache_dir, out),
        "train.stages=[{name: main, steps: 5, lr_schedule: constant}]",
        "checkpoint.every=2",
    ]
    argv = torchrun_argv(1, 1, 1, f"127.0.0.1:{_free_port()}", "t1", overrides, (str(script),))
    assert "--max-restarts=1" in argv
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    log = " ".join((p.stdout + p.stderr).split())
    assert p.returncode == 0, log[-4000:]
    # the first attempt died after step 3; the restart resumed from step 2's checkpoint
    assert f"resumed from {out}/checkpoints/step_000002" in log, log[-4000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]
    with pytest.raises(ConfigError, match="max_restarts"):
        torchrun_argv(1, 1, -1, "h:1", "t", [])


def test_preemption_signal_reaches_the_ranks_of_torchrun(tiny_corpus, cache_dir, tmp_path):
    """submitit's USR2 on the task becomes USR1 on the ranks: they checkpoint and stop, and
    torchrun (which ignores both) exits 0 without restarting them."""
    out = tmp_path / "run"
    overrides = [
        *tiny_overrides(tiny_corpus, cache_dir, out),
        "train.stages=[{name: main, steps: 100000, lr_schedule: constant}]",
    ]
    argv = torchrun_argv(1, 1, 1, f"127.0.0.1:{_free_port()}", "t2", overrides)

    def signal_after_first_records() -> None:
        deadline = time.monotonic() + JOB_BUDGET_S
        while time.monotonic() < deadline:
            path = out / "metrics.jsonl"
            if path.is_file() and len(path.read_text().splitlines()) >= 3:
                os.kill(os.getpid(), signal.SIGUSR2)
                return
            time.sleep(0.5)

    watcher = threading.Thread(target=signal_after_first_records, daemon=True)
    watcher.start()
    assert run_torchrun(argv, signal.SIGUSR2) == 0
    watcher.join()
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert 3 <= steps[-1] < 100000
    assert (out / "checkpoints" / f"step_{steps[-1]:06d}" / "ofs_meta.json").is_file()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    yield from module_cluster(tmp_path_factory)


@pytest.mark.timeout(int(JOB_BUDGET_S) + 600)
def test_sbatch_passes_cpus_per_task_and_max_restarts(slurm, tiny_corpus, cache_dir, tmp_path):
    # a dry run through the whole path: sbatch -> srun -> torchrun -> ofs_scale.train
    log = tmp_path / "dry.log"
    env = dict(os.environ, NPROC_PER_NODE="1", MAX_RESTARTS="2", CONFIG="configs/smoke.yaml")
    env.update(PYTHON=str(ROOT / ".venv/bin/python"), OMP_NUM_THREADS="1")
    env.pop("SRUN_CPUS_PER_TASK", None)
    overrides = tiny_overrides(tiny_corpus, cache_dir, tmp_path / "run")
    argv = [f"--output={log}", "--cpus-per-task=2", str(ROOT / "slurm/smoke.sh")]
    job = sbatch([*argv, *overrides, "--dry-run"], env, ROOT)
    deadline = time.monotonic() + JOB_BUDGET_S
    assert slurm.wait_job(job, deadline, [log]) == "COMPLETED", log.read_text()
    text = log.read_text()
    assert "srun --cpus-per-task=2 torchrun --max-restarts=2" in text
    assert "[step] node 0: 2 cpus per task" in text  # what srun gave the step
    assert "dry run (nothing allocated)" in text


@pytest.mark.timeout(int(JOB_BUDGET_S) + 600)
def test_submitit_runs_one_torchrun_per_node_with_max_restarts(
    slurm, tiny_corpus, cache_dir, tmp_path
):
    from ofs_scale.launch.submit import job_result, submit_run

    out = tmp_path / "torchrun_run"
    overrides = [
        *tiny_overrides(tiny_corpus, cache_dir, out),
        "launch.tasks_per_node=2",
        "launch.cpus_per_task=1",
        "launch.max_restarts=1",
        "launch.time_min=30",
    ]
    cfg = load_config(ROOT / "configs/smoke.yaml", overrides)
    with pytest.raises(ConfigError, match="max_restarts"):
        submit_run(cfg, stage_jobs=True)
    (job,) = submit_run(cfg)
    folder = out / "submitit"
    deadline = time.monotonic() + JOB_BUDGET_S
    assert slurm.wait_job(str(job.job_id), deadline, [folder]) == "COMPLETED"
    result = job_result(job)
    assert result["nodes"] == 1 and result["config"].endswith("launch.yaml")
    script = (folder / f"{job.job_id}_submission.sh").read_text()
    assert "#SBATCH --ntasks-per-node=1" in script and "#SBATCH --cpus-per-task=2" in script
    logs = " ".join(p.read_text() for p in folder.glob("*_log.out"))
    assert "--nproc_per_node=2 --max-restarts=1" in logs, logs[-4000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
