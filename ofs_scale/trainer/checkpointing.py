"""The checkpoint schedule as a callback: periodic `step_NNNNNN`, one `stage_<name>` a stage."""

from __future__ import annotations

from typing import Any

from ofs_scale.trainer.callbacks import Callback, TrainerView


class CheckpointCallback(Callback):
    """Periodic checkpoints every `checkpoint.every` steps and one at the end of every stage."""

    def post_step(self, trainer: TrainerView, step: int, record: dict[str, Any]) -> None:
        every = trainer.cfg.checkpoint.every
        stage_end = trainer.is_stage_end(step)
        if every and step % every == 0 and not stage_end:
            trainer.save_checkpoint(f"step_{step:06d}")

    def on_stage_end(self, trainer: TrainerView, stage_index: int) -> None:
        trainer.save_checkpoint(f"stage_{trainer.cfg.train.stages[stage_index].name}")
