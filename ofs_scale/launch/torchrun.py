"""torchrun under submitit: one task per node; torchrun restarts failed ranks (max_restarts).

With `launch.max_restarts` above 0 the submitit launcher submits `TorchrunJob` with one task per
node instead of `TrainJob` with one task per rank. Each task runs
`python -m torch.distributed.run --max-restarts=N ... -m ofs_scale.train --config launch.yaml`
with a c10d rendezvous on the first node; when a rank dies, torchrun stops the node's ranks,
rendezvouses again and starts them anew, and `Trainer.fit()` resumes from the newest checkpoint.

Signals: SLURM sends submitit's signal (USR2) `signal_delay_s` before the limit to every
process of the step. torchrun and the ranks start with USR1 and USR2 ignored (torchrun would die
of either); the task forwards the signal to torchrun's descendants (the ranks) as USR1, which
their `PreemptionGuard` (installed by `ofs_scale.train`) turns into "checkpoint, stop,
`scontrol requeue`", as under slurm/*.sh.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import submitit

from ofs_scale.config import ConfigError
from ofs_scale.launch.job import rendezvous

TRAIN_ENTRY = ("-m", "ofs_scale.train")


def torchrun_argv(
    nnodes: int,
    nproc_per_node: int,
    max_restarts: int,
    endpoint: str,
    rdzv_id: str,
    train_args: list[str],
    entry: tuple[str, ...] = TRAIN_ENTRY,
) -> list[str]:
    """The torchrun command line of one node: `entry` (default `-m ofs_scale.train`) with
    `train_args`, c10d rendezvous at `endpoint` (host:port), restarting up to `max_restarts`."""
    if max_restarts < 0:
        raise ConfigError(f"launch.max_restarts={max_restarts} must be 0 or more")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--nproc_per_node={nproc_per_node}",
        f"--max-restarts={max_restarts}",
        f"--rdzv_id={rdzv_id}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={endpoint}",
        *entry,
        *train_args,
    ]


def _ignore_preemption_signals() -> None:
    """In the child before exec: torchrun must outlive USR1/USR2 (ignored dispositions are
    inherited; the ranks install their own USR1 handler)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def descendants(pid: int) -> list[int]:
    """Process ids below `pid` (from /proc: torchrun starts each rank in a session of its own,
    so a process-group signal would miss them)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # pid (comm) state ppid ...: comm may hold spaces, so split after the last ")"
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [c for c, pp in parent.items() if pp in frontier]
        found += children
        frontier = children
    return found


def run_torchrun(argv: list[str], forward: signal.Signals) -> int:
    """Run torchrun; `forward` received here reaches its ranks as USR1. Returns torchrun's
    exit status."""
    proc = subprocess.Popen(argv, preexec_fn=_ignore_preemption_signals)

    def relay(signum: int, frame: Any) -> None:
        for pid in descendants(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)

    previous = signal.signal(forward, relay)
    try:
        return proc.wait()
    finally:
        signal.signal(forward, previous)


class TorchrunJob(submitit.helpers.Checkpointable):
    """What submitit runs on each node: `TorchrunJob()(config_path, nproc_per_node, restarts)`.

    Returns a small record from the first node; exits non-zero when torchrun did (after its
    restarts ran out). A requeue (`scontrol requeue` by rank 0) reruns it with the same
    arguments, and training resumes from the checkpoint."""

    def __call__(self, config_path: str, nproc_per_node: int, max_restarts: int) -> dict | None:
        env = submitit.JobEnvironment()
        job_id, host, port = rendezvous(env)
        argv = torchrun_argv(
            env.num_nodes,
            nproc_per_node,
            max_restarts,
            f"{host}:{port}",
            job_id,
            ["--config", config_path],
        )
        print("[torchrun] " + " ".join(argv), flush=True)
        forward = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
        status = run_torchrun(argv, forward)
        if status != 0:
            sys.exit(status)
        if env.node != 0:
            return None
        return {"config": config_path, "job_id": job_id, "nodes": env.num_nodes}
