"""Trainer callbacks: instruments (metrics, checkpoints, loggers) hook into the loop here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ofs_scale.train import Trainer


class Callback:
    """Base class; every hook is optional. Hooks run on every rank in list order."""

    def on_train_start(self, trainer: Trainer) -> None:
        """After model, data and state (possibly resumed) are ready."""

    def pre_step(self, trainer: Trainer, step: int) -> None:
        """Before optimizer step `step` (1-based) runs its forward/backward passes."""

    def post_step(self, trainer: Trainer, step: int, record: dict[str, Any]) -> None:
        """After step `step`; `record` is the metrics record and may be extended."""

    def on_eval(self, trainer: Trainer, step: int, record: dict[str, Any]) -> None:
        """After an evaluation at step `step` (`val_loss`, `val_ppl` in `record`)."""

    def on_stage_end(self, trainer: Trainer, stage_index: int) -> None:
        """After the last step (and evaluation) of a stage."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After the last stage, or when the run stops early."""

    def summary(self, trainer: Trainer) -> dict[str, Any]:
        """Rows this callback adds to the end-of-run summary table."""
        return {}

    def shard_state(self, trainer: Trainer) -> dict[str, Any] | None:
        """State to checkpoint with the model: the same on every DP replica, this rank's
        (pp, tp) shard of it (tensors, numbers, lists). None: nothing to save."""
        return None

    def load_shard_state(self, trainer: Trainer, state: dict[str, Any] | None) -> None:
        """Called on resume, before on_train_start, with what shard_state returned when the
        checkpoint was written, or None when the checkpoint has none usable."""


class CheckpointCallback(Callback):
    """Periodic checkpoints every `checkpoint.every` steps and one at the end of every stage."""

    def post_step(self, trainer: Trainer, step: int, record: dict[str, Any]) -> None:
        every = trainer.cfg.checkpoint.every
        stage_end = trainer.is_stage_end(step)
        if every and step % every == 0 and not stage_end:
            trainer.save_checkpoint(f"step_{step:06d}")

    def on_stage_end(self, trainer: Trainer, stage_index: int) -> None:
        trainer.save_checkpoint(f"stage_{trainer.cfg.train.stages[stage_index].name}")
