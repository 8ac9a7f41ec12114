"""Submission: one run, a chain of per-stage jobs, or a sweep grid as a job array.

Every submission first resolves and validates each config (a bad key stops before anything is
queued), writes the resolved config to `<run.out_dir>/launch.yaml` (the job reads this snapshot,
so later edits of the YAML file do not change a queued or requeued job) and records its job ids in
`<run.out_dir>/launch.json`, which `status` and `tail` read.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import submitit

from ofs_scale.config import Config, ConfigError, dump_yaml, load_config
from ofs_scale.launch.files import LAUNCH_FILE
from ofs_scale.launch.job import CONFIG_SNAPSHOT, TrainJob
from ofs_scale.launch.torchrun import TorchrunJob


def make_executor(
    cfg: Config, folder: Path, local: bool, torchrun: bool = False
) -> submitit.AutoExecutor:
    """An AutoExecutor (SLURM, or the local one with `local`) with the `launch` resources: one
    task per rank, or with `torchrun` one task per node holding all its ranks' CPUs."""
    if not local and shutil.which("sbatch") is None:
        raise ConfigError("sbatch is not on PATH: submit on a SLURM login node, or pass --local")
    lc = cfg.launch
    executor = submitit.AutoExecutor(
        folder=str(folder),
        cluster="local" if local else "slurm",
        slurm_max_num_timeout=lc.max_requeues,
    )
    tasks = lc.gpus_per_node or lc.tasks_per_node
    per_node = tasks if torchrun else 1
    params: dict[str, Any] = {
        "name": cfg.run.name,
        "nodes": lc.nodes,
        "tasks_per_node": tasks // per_node,
        "cpus_per_task": lc.cpus_per_task * per_node,
        "timeout_min": lc.time_min,
        "stderr_to_stdout": True,
    }
    if lc.gpus_per_node:
        params["gpus_per_node"] = lc.gpus_per_node
    if lc.mem_gb:
        params["mem_gb"] = lc.mem_gb
    if not local:
        params["slurm_signal_delay_s"] = lc.signal_delay_s
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(lc, key):
                params[f"slurm_{key}"] = getattr(lc, key)
    executor.update_parameters(**params)
    return executor


def job_result(job: submitit.Job) -> Any:
    """The result of rank 0 of a job (blocks until it ends; raises if the job failed)."""
    return job.results()[0]


def write_snapshot(cfg: Config) -> Path:
    """Write the resolved config into the run directory; returns the file."""
    out = Path(cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_SNAPSHOT
    path.write_text(dump_yaml(cfg))
    # Round-trip now, so a snapshot the job could not read fails here and not in the queue.
    load_config(path)
    return path


def write_launch_record(out_dir: Path, record: dict[str, Any]) -> None:
    """Append this submission to `<out_dir>/launch.json` (a resubmission keeps the history)."""
    path = Path(out_dir) / LAUNCH_FILE
    history = json.loads(path.read_text()) if path.is_file() else {"submissions": []}
    history["submissions"].append(record)
    path.write_text(json.dumps(history, indent=1))


def _dependency(executor: submitit.AutoExecutor, job_id: str | None) -> None:
    extra = {"dependency": f"afterok:{job_id}"} if job_id else {}
    if executor.cluster == "slurm":
        executor.update_parameters(slurm_additional_parameters=extra)


def submit_run(
    cfg: Config, local: bool = False, stage_jobs: bool = False, wait: bool = False
) -> list[submitit.Job]:
    """Submit one run; with `stage_jobs`, one job per stage chained with `afterok`, each
    training through the end of its stage and resuming from the previous stage's checkpoint."""
    lc = cfg.launch
    if stage_jobs and lc.max_restarts > 0:
        raise ConfigError("--stage-jobs runs one task per rank: leave launch.max_restarts at 0")
    snapshot = write_snapshot(cfg)
    out = Path(cfg.run.out_dir)
    torchrun = lc.max_restarts > 0
    executor = make_executor(cfg, out / "submitit", local, torchrun)
    jobs: list[submitit.Job] = []
    stage_ids: list[int | None] = list(range(len(cfg.train.stages))) if stage_jobs else [None]
    for k in stage_ids:
        _dependency(executor, jobs[-1].job_id if jobs else None)
        if torchrun:
            nproc = lc.gpus_per_node or lc.tasks_per_node
            job = executor.submit(TorchrunJob(), str(snapshot), nproc, lc.max_restarts)
        else:
            job = executor.submit(TrainJob(), str(snapshot), k)
        jobs.append(job)
        if local and stage_jobs:
            job_result(job)  # the local executor has no dependencies: run the chain in order
    write_launch_record(
        out,
        {
            "time": time.time(),
            "cluster": executor.cluster,
            "config": str(snapshot),
            "jobs": [
                {"job_id": str(j.job_id), "stage": None if k is None else cfg.train.stages[k].name}
                for j, k in zip(jobs, stage_ids)
            ],
        },
    )
    if wait:
        for job in jobs:
            job_result(job)
    return jobs
