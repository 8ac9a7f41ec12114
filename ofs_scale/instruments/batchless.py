"""The batchless-norm auxiliary loss as a logged instrument.

`BatchlessAuxCallback` adds `bln/aux_loss` every step: the sum over batchless norm layers of each
layer's auxiliary loss (mean over the step's micro batches and DP ranks), before `bln_weight`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ofs_scale.model.batchless import pop_aux_losses
from ofs_scale.trainer.callbacks import Callback, TrainerView


class BatchlessAuxCallback(Callback):
    """Logs `bln/aux_loss` every step (see the module docstring)."""

    def post_step(self, trainer: TrainerView, step: int, record: dict[str, Any]) -> None:
        m = trainer.mesh
        total = 0.0
        for chunk in trainer.engine.chunks:
            total += pop_aux_losses(chunk)[0]
        t = torch.tensor([total], dtype=torch.float64, device=m.device)
        if m.pp > 1:
            dist.all_reduce(t, group=m.pp_group)
        if m.dp > 1:
            dist.all_reduce(t, group=m.dp_group)
            t /= m.dp
        record["bln/aux_loss"] = float(t)
