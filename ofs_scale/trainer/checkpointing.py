"""The checkpoint schedule as a callback: periodic `step_NNNNNN`, one `stage_<name>` a stage."""

from __future__ import annotations

from typing import Any

from ofs_scale.trainer.callbacks import Callback, TrainerView


class CheckpointCallback(Callback):
    """Periodic checkpoints every `checkpoint.every` steps and one at the end of every stage.

    A periodic checkpoint due at an evaluation step is written after the evaluation, so a run
    that dies between the two redoes both on resume instead of skipping the evaluation."""

    def _periodic_due(self, trainer: TrainerView, step: int) -> bool:
        every = trainer.cfg.checkpoint.every
        return bool(every and step % every == 0 and not trainer.is_stage_end(step))

    def post_step(self, trainer: TrainerView, step: int, record: dict[str, Any]) -> None:
        if self._periodic_due(trainer, step) and not trainer.is_eval_step(step):
            trainer.save_checkpoint(f"step_{step:06d}")

    def on_eval(self, trainer: TrainerView, step: int, record: dict[str, Any]) -> None:
        if self._periodic_due(trainer, step):
            trainer.save_checkpoint(f"step_{step:06d}")

    def on_stage_end(self, trainer: TrainerView, stage_index: int) -> None:
        trainer.save_checkpoint(f"stage_{trainer.cfg.train.stages[stage_index].name}")
