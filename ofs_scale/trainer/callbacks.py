"""The contract between the Trainer and everything that hooks into its loop.

`Callback` is the base of loggers, checkpointing, preemption and the instruments; callbacks see
the run through `TrainerView`, a protocol of what the Trainer offers them, so no callback module
imports the Trainer (and the Trainer imports none of them by name: see `instruments.build`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from torch import nn

from ofs_scale.config import Config
from ofs_scale.parallel.mesh import Mesh


class EngineView(Protocol):
    """What callbacks read from the engine: this rank's model chunks."""

    chunks: list[nn.Module]


class TrainerView(Protocol):
    """What a callback may read from, or ask of, the Trainer it is attached to."""

    cfg: Config
    mesh: Mesh
    engine: EngineView
    out_dir: Path
    step: int
    named_params: list[tuple[str, nn.Parameter]]
    params: list[nn.Parameter]
    stop_requested: bool
    stopped_early: bool

    def log(self, msg: str) -> None:
        """Print a plain message on the logging rank."""

    def is_stage_end(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based) is the last of a stage."""

    def is_eval_step(self, step: int) -> bool:
        """Whether an evaluation runs after optimizer step `step` (1-based)."""

    def evaluate(self) -> dict[str, Any]:
        """Validation loss of the current weights (collective)."""

    def save_checkpoint(self, name: str) -> Path:
        """Write checkpoint `name` (collective)."""


class Callback:
    """Base class; every hook is optional. Hooks run on every rank in list order."""

    def on_train_start(self, trainer: TrainerView) -> None:
        """After model, data and state (possibly resumed) are ready."""

    def pre_step(self, trainer: TrainerView, step: int) -> None:
        """Before optimizer step `step` (1-based) runs its forward/backward passes."""

    def post_step(self, trainer: TrainerView, step: int, record: dict[str, Any]) -> None:
        """After step `step`; `record` is the metrics record and may be extended."""

    def on_eval(self, trainer: TrainerView, step: int, record: dict[str, Any]) -> None:
        """After an evaluation at step `step` (`val_loss`, `val_ppl` in `record`)."""

    def on_stage_end(self, trainer: TrainerView, stage_index: int) -> None:
        """After the last step (and evaluation) of a stage."""

    def on_train_end(self, trainer: TrainerView) -> None:
        """After the last stage, or when the run stops early."""

    def summary(self, trainer: TrainerView) -> dict[str, Any]:
        """Rows this callback adds to the end-of-run summary table."""
        return {}

    def shard_state(self, trainer: TrainerView) -> dict[str, Any] | None:
        """State to checkpoint with the model: the same on every DP replica, this rank's
        (pp, tp) shard of it (tensors, numbers, lists). None: nothing to save."""
        return None

    def load_shard_state(self, trainer: TrainerView, state: dict[str, Any] | None) -> None:
        """Called on resume, before on_train_start, with what shard_state returned when the
        checkpoint was written, or None when the checkpoint has none usable."""
