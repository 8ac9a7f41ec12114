"""Launching on SLURM: submitit jobs and sweeps, signal handling with requeue, run status.

ofs-scale launch submit --config FILE [overrides] [--sweep FILE] [--local] [--stage-jobs]
ofs-scale launch status RUN_OR_SWEEP_DIR
ofs-scale launch tail RUN_DIR [-n N] [--follow]

The names below are imported on first use, so `launch status` and `tail` import no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TrainJob": "ofs_scale.launch.job",
    "run_point": "ofs_scale.launch.job",
    "train_run": "ofs_scale.launch.job",
    "PreemptionGuard": "ofs_scale.trainer.preemption",
    "finish_preempted": "ofs_scale.trainer.preemption",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
