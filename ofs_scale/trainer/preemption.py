"""Stop cleanly on SLURM's signals: finish the step, write a checkpoint, then requeue.

SLURM signals every process of a job step (`--signal=USR1@120` before the time limit, SIGTERM on
preemption or `scancel`). Ranks may see a signal at different steps, so the handler only sets a
local flag; `PreemptionGuard.post_step` takes the maximum of that flag over all ranks, and every
rank sets `trainer.stop_requested` at the same step. The Trainer then writes `step_NNNNNN` and
returns from `fit()`.

What happens next depends on the signal:
* the requeue signal (USR1 for slurm/*.sh): rank 0 runs `scontrol requeue $SLURM_JOB_ID`; the
  job goes back to the queue and the new allocation resumes from the checkpoint;
* SIGTERM: no requeue here (`scancel` must stay final); a preemption with PreemptMode=REQUEUE
  is requeued by SLURM itself.

Either way `ofs-scale train` then exits with EXIT_STOPPED (75, EX_TEMPFAIL: "try again later"),
so a script tells a stopped, resumable run from a finished one (0). Under a torchrun that would
restart the ranks after a non-zero exit (restarts left), the ranks exit 0 instead: a restart
would only train on past a stop meant for a requeue or a cancellation.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from ofs_scale.trainer.callbacks import Callback, TrainerView

REQUEUE_SIGNAL = signal.SIGUSR1
EXIT_STOPPED = 75
"""Exit status of a run stopped early by a signal after writing its checkpoint (resumable)."""


def stopped_exit_status(environ: dict[str, str] | None = None) -> int:
    """EXIT_STOPPED, or 0 under a torchrun agent with restarts left, which would restart the
    ranks on any non-zero exit (torchrun sets TORCHELASTIC_MAX_RESTARTS/_RESTART_COUNT)."""
    env = os.environ if environ is None else environ
    restarts_left = int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) - int(
        env.get("TORCHELASTIC_RESTART_COUNT", "0")
    )
    return 0 if restarts_left > 0 else EXIT_STOPPED


class PreemptionGuard(Callback):
    """Turns SLURM signals into `trainer.stop_requested` on all ranks at the same step."""

    def __init__(
        self,
        stop_signals: Iterable[int] = (signal.SIGUSR1, signal.SIGTERM),
        requeue_signals: Iterable[int] = (REQUEUE_SIGNAL,),
    ) -> None:
        self.stop_signals = tuple(stop_signals)
        self.requeue_signals = set(requeue_signals)
        self.received: int | None = None
        self.agreed = False
        self._previous: dict[int, Any] = {}

    def install(self) -> PreemptionGuard:
        """Install the signal handlers (main thread only); returns self."""
        for sig in self.stop_signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Put back the handlers that were there before `install`."""
        for sig, old in self._previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        # Keep the first signal: a SIGTERM that follows a USR1 must not cancel the requeue.
        if self.received is None:
            self.received = signum

    def post_step(self, trainer: TrainerView, step: int, record: dict[str, Any]) -> None:
        code = 0 if self.received is None else int(self.received)
        flag = torch.tensor([code], dtype=torch.int64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            # gloo reduces CPU tensors, nccl CUDA ones: a tiny copy either way.
            flag = flag.to(trainer.mesh.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        code = int(flag.item())
        if code:
            if self.received is None:
                self.received = code
            self.agreed = True
            trainer.stop_requested = True

    @property
    def wants_requeue(self) -> bool:
        """A requeue signal stopped the run."""
        return self.agreed and self.received in self.requeue_signals

    def on_train_end(self, trainer: TrainerView) -> None:
        if self.agreed and trainer.mesh.is_logging_rank:
            name = signal.Signals(self.received).name if self.received else "?"
            trainer.log(f"[launch] {name} received: stopped at step {trainer.step}")


def slurm_requeue(job_id: str | None = None) -> str:
    """Requeue this SLURM batch job (`scontrol requeue`); returns a line saying what happened.
    SLURM_JOB_ID is also the unique id of one element of a job array."""
    job_id = job_id or os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return "not inside a SLURM job: rerun the same command to resume from the checkpoint"
    try:
        subprocess.run(
            ["scontrol", "requeue", job_id], check=True, capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        return f"scontrol requeue {job_id} failed ({detail.strip()}); resubmit to resume"
    return f"job {job_id} requeued; it resumes from the checkpoint"


def finish_preempted(trainer: TrainerView, guard: PreemptionGuard) -> str | None:
    """After `fit()`: requeue the job (rank 0) if a requeue signal stopped it. Returns the
    message to print, or None when the run was not stopped by a signal."""
    if not (guard.agreed and trainer.stopped_early):
        return None
    if not guard.wants_requeue:
        return f"stopped by signal at step {trainer.step}; checkpoint written, not requeued"
    if not trainer.mesh.is_logging_rank:
        return None
    return slurm_requeue()
