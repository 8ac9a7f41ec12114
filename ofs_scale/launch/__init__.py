"""Launching on SLURM: submitit jobs and sweeps, signal handling with requeue, run status.

ofs-scale launch submit --config FILE [overrides] [--sweep FILE] [--local] [--stage-jobs]
ofs-scale launch status RUN_OR_SWEEP_DIR
ofs-scale launch tail RUN_DIR [-n N] [--follow]
"""

from ofs_scale.launch.job import TrainJob, run_point, train_run
from ofs_scale.trainer.preemption import PreemptionGuard, finish_preempted

__all__ = ["PreemptionGuard", "TrainJob", "finish_preempted", "run_point", "train_run"]
