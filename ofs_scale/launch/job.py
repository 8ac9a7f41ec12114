"""What a submitit job runs: one training run over all tasks of the job, requeued on timeout.

submitit starts one task per GPU (or `launch.tasks_per_node` CPU tasks); `TrainJob` turns
submitit's `JobEnvironment` into the torch.distributed environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR = first host of the job), runs the Trainer and returns the run directory.

Timeout and preemption: SLURM sends submitit's signal (USR2 by default) `launch.signal_delay_s`
before the limit. Every rank sets a flag; the ranks agree on the step to stop at
(`PreemptionGuard`), the Trainer writes `step_NNNNNN`, and then rank 0 hands over to submitit's own
handler, which pickles `checkpoint()`'s DelayedSubmission and runs `scontrol requeue`. The
requeued job calls `TrainJob` again, and `Trainer.fit()` resumes from the newest checkpoint.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
import torch

from ofs_scale.config import Config, ConfigError, load_config
from ofs_scale.parallel.mesh import destroy_mesh
from ofs_scale.trainer.loop import Trainer
from ofs_scale.trainer.preemption import PreemptionGuard

CONFIG_SNAPSHOT = "launch.yaml"


def port_for_job(job_id: str) -> int:
    """A rendezvous port derived from the job id: the same on every task and every requeue."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return 15000 + int(digits) % 20000


def rendezvous(env: submitit.JobEnvironment) -> tuple[str, str, str]:
    """The job id, and the host and port of the first node that the tasks (or the torchruns)
    of this job meet at: the same on every task and every requeue."""
    job_id = os.environ.get("SLURM_JOB_ID") or str(env.job_id)
    host = str(env.hostnames[0]) if env.hostnames else "127.0.0.1"
    port = os.environ.get("OFS_MASTER_PORT") or str(port_for_job(job_id))
    return job_id, host, port


def set_dist_env(env: submitit.JobEnvironment) -> None:
    """Export the torch.distributed variables for this task from submitit's job environment."""
    tasks_per_node = max(1, env.num_tasks // max(1, env.num_nodes))
    _, host, port = rendezvous(env)
    os.environ.update(
        RANK=str(env.global_rank),
        WORLD_SIZE=str(env.num_tasks),
        LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(tasks_per_node),
        MASTER_ADDR=host,
        MASTER_PORT=port,
    )
    # One intra-op thread pool per task sized to its CPUs (an explicit OMP_NUM_THREADS wins):
    # oversubscribed pools make gloo collectives crawl on CPU nodes.
    cpus = (
        os.environ.get("OMP_NUM_THREADS")
        or os.environ.get("SLURM_CPUS_PER_TASK")
        or str(max(1, (os.cpu_count() or 1) // tasks_per_node))
    )
    torch.set_num_threads(int(cpus))


def load_hook(spec: str):
    """The callable named by `module:function` (a `launch.post_run` entry)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"launch.post_run entry {spec!r} should look like 'package.module:func'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"launch.post_run entry {spec!r} cannot be loaded ({e})") from e


def run_post_hooks(cfg: Config, run_dir: Path) -> None:
    """Call every `launch.post_run` hook as `hook(cfg, run_dir)` (rank 0, after training)."""
    for spec in cfg.launch.post_run:
        load_hook(spec)(cfg, run_dir)


@dataclass
class RunOutcome:
    """How one call of `train_run` ended."""

    run_dir: Path
    summary: dict[str, Any]
    step: int
    stopped_by: int | None
    """The signal that stopped training early, or None when every stage finished."""
    requeue: bool
    """True when the stop asks for a requeue (the timeout signal)."""
    rank: int


def train_run(
    cfg: Config, guard: PreemptionGuard | None = None, last_job: bool = True
) -> RunOutcome:
    """Train `cfg` in this process group (resuming if possible), then run the post-run hooks on
    rank 0 if training finished the run: not after the earlier jobs of a `--stage-jobs` chain
    (`last_job` False), whose `cfg` ends at their own stage. Tears the process group down
    before returning."""
    try:
        trainer = Trainer(cfg)
        if guard is not None:
            trainer.callbacks.append(guard)
        summary = trainer.fit()
        stopped = guard is not None and guard.agreed and trainer.stopped_early
        rank = trainer.mesh.rank
        if not stopped and last_job and rank == 0:
            run_post_hooks(cfg, trainer.out_dir)
        return RunOutcome(
            run_dir=trainer.out_dir,
            summary=summary,
            step=trainer.step,
            stopped_by=guard.received if stopped else None,
            requeue=bool(stopped and guard.wants_requeue),
            rank=rank,
        )
    finally:
        destroy_mesh()


def run_point(cfg: Config) -> Path:
    """Train one run (or sweep point) in this process and return its run directory."""
    return train_run(cfg).run_dir


def load_snapshot(config_path: str | Path, stages_upto: int | None = None) -> tuple[Config, bool]:
    """The config a job runs: the snapshot written at submission, optionally cut after stage
    `stages_upto` (0-based) for one job of a `--stage-jobs` chain; and whether the job trains
    the run's last stage (only then do the post-run hooks run)."""
    cfg = load_config(config_path)
    last_job = stages_upto is None or stages_upto + 1 >= len(cfg.train.stages)
    if stages_upto is not None:
        cfg.train.stages = cfg.train.stages[: stages_upto + 1]
    return cfg, last_job


class TrainJob(submitit.helpers.Checkpointable):
    """The callable submitit runs on every task: `TrainJob()(config_path, stages_upto)`.

    Being Checkpointable, it is requeued on timeout/preemption with the same arguments; the
    training state itself lives in the run's DCP checkpoints, not in the pickle."""

    def __call__(self, config_path: str, stages_upto: int | None = None) -> dict[str, Any] | None:
        env = submitit.JobEnvironment()
        set_dist_env(env)
        usr_sig = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
        submitit_handler = signal.getsignal(usr_sig)
        guard = PreemptionGuard(stop_signals=(usr_sig, signal.SIGTERM), requeue_signals=(usr_sig,))
        guard.install()
        cfg, last_job = load_snapshot(config_path, stages_upto)
        outcome = train_run(cfg, guard, last_job)
        if outcome.stopped_by is not None:
            guard.uninstall()
            if outcome.requeue and outcome.rank == 0 and callable(submitit_handler):
                # submitit checkpoints this callable, runs `scontrol requeue` and exits.
                submitit_handler(usr_sig, None)
            # Other ranks (and SIGTERM) leave without a result: the job is not finished.
            sys.exit(-1)
        if outcome.rank != 0:
            return None
        return {
            "run_dir": str(outcome.run_dir),
            "step": outcome.step,
            "summary": outcome.summary,
            "job_id": str(env.job_id),
        }
