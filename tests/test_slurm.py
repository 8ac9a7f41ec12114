"""Against a real one-node SLURM: sbatch slurm/op7b.sh (on a CPU node) and slurm/smoke.sh, USR1
requeue with exact resume, a submitit job that is preempted (USR2), requeues itself and returns
its result, and --stage-jobs chains.

Skips (with the reason) where SLURM cannot be started; set OFS_REQUIRE_SLURM=1 (CI) to turn the
skip into a failure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from ofs_scale.config import load_config
from ofs_scale.data import prepare_corpus
from tests.helpers import hook_calls, tiny_overrides
from tests.slurm_cluster import (
    CLIENT_TIMEOUT_S,
    JOB_BUDGET_S,
    SlurmCluster,
    module_cluster,
    sbatch,
)

ROOT = Path(__file__).resolve().parents[1]
TWO_STAGES = "train.stages=[{name: a, steps: 5, lr_schedule: constant}, {name: b, steps: 300}]"
# Each test waits on job state until its `deadline`, JOB_BUDGET_S after it starts, and then fails
# with what its jobs printed; pytest's timeout is only a backstop against a hang, after that one
# (with room for starting the cluster and preparing the data).
pytestmark = pytest.mark.timeout(int(JOB_BUDGET_S) + 600)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    yield from module_cluster(tmp_path_factory)


@pytest.fixture
def deadline() -> float:
    """When the test stops waiting on its jobs (time.monotonic())."""
    return time.monotonic() + JOB_BUDGET_S


def _overrides(tiny_corpus: Path, cache_dir: Path, out: Path) -> list[str]:
    return [*tiny_overrides(tiny_corpus, cache_dir, out), TWO_STAGES, "train.eval_every=0"]


def _prepare(overrides: list[str]) -> None:
    # Prepare the corpus once here, so that neither job spends its time on it.
    d = load_config(None, overrides).data
    prepare_corpus(d.corpus, d.vocab_size, d.cache_dir, d.max_files, progress=False)


def _sbatch(script: str, log: Path, overrides: list[str], *sbatch_args: str) -> str:
    env = dict(os.environ, NPROC_PER_NODE="2", PYTHON=str(ROOT / ".venv/bin/python"))
    env["OMP_NUM_THREADS"] = "1"  # the same thread count (and float sums) in both jobs
    env["CONFIG"] = "configs/smoke.yaml"
    argv = [f"--output={log}", "--cpus-per-task=1", *sbatch_args, str(ROOT / script)]
    return sbatch([*argv, *overrides], env, ROOT)


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _wait_records(
    cluster: SlurmCluster, job: str, run_dir: Path, n: int, deadline: float, files=()
) -> None:
    """Wait until the job has logged `n` steps (fails at once if the job ends first)."""
    cluster.wait_for(
        f"{n} metrics records in {run_dir}",
        lambda: len(_records(run_dir)) >= n,
        deadline,
        [job],
        files,
    )


def _release_requeued(cluster: SlurmCluster, job: str, deadline: float, files=()) -> None:
    """Wait until the requeued job is PENDING again, then lift SLURM's ~2 min BeginTime hold."""
    cluster.wait_for(
        f"job {job} requeued (PENDING)",
        lambda: cluster.squeue_state(job) == "PENDING",
        deadline,
        [job],
        files,
    )
    subprocess.run(
        ["scontrol", "update", f"JobId={job}", "StartTime=now"],
        check=True,
        timeout=CLIENT_TIMEOUT_S,
    )


def _final(records: list[dict]) -> tuple[dict, dict]:
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    return train[-1], evals[-1]


def test_sbatch_scripts_stage_checkpoints_and_usr1_requeue(
    slurm, tiny_corpus, cache_dir, tmp_path, deadline
):
    ref_dir, cut_dir = tmp_path / "reference", tmp_path / "interrupted"
    _prepare(_overrides(tiny_corpus, cache_dir, ref_dir))
    # The reference runs the 7B script itself, its header cut down to one CPU node on the
    # command line; the other job runs slurm/smoke.sh and is signalled mid-run.
    cpu = ["parallel.backend=gloo", "train.device=cpu"]
    ref_log, cut_log = tmp_path / "ref.log", tmp_path / "cut.log"
    ref_overrides = [*_overrides(tiny_corpus, cache_dir, ref_dir), *cpu]
    ref_job = _sbatch("slurm/op7b.sh", ref_log, ref_overrides, "--nodes=1", "--gpus-per-node=0")
    cut_job = _sbatch("slurm/smoke.sh", cut_log, _overrides(tiny_corpus, cache_dir, cut_dir))

    # Signal the second job the way `--signal=USR1@60` does: every process of its job steps.
    _wait_records(slurm, cut_job, cut_dir, 20, deadline)
    subprocess.run(["scancel", "--signal=USR1", cut_job], check=True, timeout=CLIENT_TIMEOUT_S)
    _release_requeued(slurm, cut_job, deadline)

    assert slurm.wait_job(ref_job, deadline) == "COMPLETED", ref_log.read_text()
    assert slurm.wait_job(cut_job, deadline) == "COMPLETED", cut_log.read_text()

    # both scripts ran to completion and kept both stage checkpoints
    assert "[op7b.sh] job" in ref_log.read_text() and "1 x 2 ranks" in ref_log.read_text()
    for run_dir in (ref_dir, cut_dir):
        for name in ("stage_a", "stage_b"):
            assert (run_dir / "checkpoints" / name / "ofs_meta.json").is_file()
    ref_train, ref_eval = _final(_records(ref_dir))
    assert ref_train["step"] == 305

    # the signalled job checkpointed mid-run, was requeued, resumed and ended like the reference
    log = " ".join(cut_log.read_text().split())  # undo console line wrapping
    stopped = re.search(r"checkpoint written at step (\d+)", log)
    assert stopped and 20 <= int(stopped.group(1)) < 305, log
    assert f"resumed from {cut_dir}/checkpoints/step_{int(stopped.group(1)):06d}" in log, log
    assert "restart 1" in log
    cut_train, cut_eval = _final(_records(cut_dir))
    assert cut_train["step"] == 305
    torch.testing.assert_close(cut_train["loss"], ref_train["loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(cut_eval["val_loss"], ref_eval["val_loss"], rtol=1e-5, atol=0)


def test_submitit_job_requeues_on_usr2_and_returns_result(
    slurm, tiny_corpus, cache_dir, tmp_path, deadline
):
    from ofs_scale.launch.submit import job_result, submit_run

    out = tmp_path / "submitit_run"
    overrides = [
        *_overrides(tiny_corpus, cache_dir, out),
        "launch.tasks_per_node=2",
        "launch.cpus_per_task=1",
        "launch.time_min=30",
    ]
    _prepare(overrides)
    (job,) = submit_run(load_config(ROOT / "configs/smoke.yaml", overrides))
    job_id, job_logs = str(job.job_id), [out / "submitit"]
    _wait_records(slurm, job_id, out, 20, deadline, job_logs)
    # submitit's preemption/timeout signal goes to the tasks of its srun step
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=CLIENT_TIMEOUT_S)
    _release_requeued(slurm, job_id, deadline, job_logs)
    assert slurm.wait_job(job_id, deadline, job_logs) == "COMPLETED"
    result = job_result(job)
    assert result["run_dir"] == str(out) and result["step"] == 305
    logs = " ".join(" ".join(p.read_text().split()) for p in (out / "submitit").glob("*_log.out"))
    assert "resumed from" in logs and "Requeued job" in logs, logs
    assert (out / "checkpoints/stage_b/ofs_meta.json").is_file()
    launch = json.loads((out / "launch.json").read_text())
    assert launch["submissions"][-1]["jobs"][0]["job_id"] == str(job.job_id)


def test_submitit_stage_jobs_chain_with_afterok(slurm, tiny_corpus, cache_dir, tmp_path, deadline):
    from ofs_scale.launch.status import status
    from ofs_scale.launch.submit import job_result, submit_run

    out = tmp_path / "staged"
    overrides = [
        *tiny_overrides(tiny_corpus, cache_dir, out),
        "train.stages=[{name: a, steps: 2, lr_schedule: constant}, {name: b, steps: 3}]",
        "launch.cpus_per_task=1",
        "launch.post_run=[tests.helpers:record_hook]",
    ]
    _prepare(overrides)
    jobs = submit_run(load_config(None, overrides), stage_jobs=True)
    assert len(jobs) == 2
    script = (out / "submitit" / f"{jobs[1].job_id}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{jobs[0].job_id}" in script
    assert "dependency" not in (out / "submitit" / f"{jobs[0].job_id}_submission.sh").read_text()
    for job in jobs:  # on the queue: job_result would block, silently, on a job that never ends
        if slurm.wait_job(str(job.job_id), deadline, [out / "submitit"]) != "COMPLETED":
            break  # job_result raises with the job's error; afterok holds the next job forever
    first, second = (job_result(j) for j in jobs)
    assert (first["step"], second["step"]) == (2, 5)
    log = " ".join(" ".join(p.read_text().split()) for p in (out / "submitit").glob("*_log.out"))
    assert f"resumed from {out}/checkpoints/stage_a at step 2" in log
    for name in ("stage_a", "stage_b"):
        assert (out / "checkpoints" / name / "ofs_meta.json").is_file()
    assert slurm.wait_job(str(jobs[1].job_id), deadline) == "COMPLETED"
    # post-run hooks run once, after the last stage's job (the whole run), not after stage a
    assert hook_calls(out) == [{"block": "pre", "steps": 5}]
    rows = status(out)  # what `ofs-scale launch status` shows
    assert [(r["stage"], r["state"], r["step"]) for r in rows] == [
        ("a", "COMPLETED", "5"),
        ("b", "COMPLETED", "5"),
    ]
    assert rows[0]["checkpoint"].startswith("stage_b")
