"""The outlier-feature alarm: say so, once, the moment outliers appear in a long run.

On a metric step the OF metrics callback (which runs first) has put the residual stream's
kurtosis and MMR into the step's record. The first time the maximum over the residual sites
exceeds `metrics.alarm_kurtosis` (or `metrics.alarm_mmr`), this callback prints a warning on the
logging rank, adds `alarm` (the message) and `alarm/<metric>` (the value) to the record, so that
metrics.jsonl and wandb (numbers only) carry it, and with `metrics.alarm_checkpoint` writes
checkpoint `alarm_step_NNNNNN` (never pruned) at that step. Each threshold fires once per run;
which have fired is checkpointed with the run, so a resumed run does not fire them again.
"""

from __future__ import annotations

import math
from typing import Any

from ofs_scale.trainer.callbacks import Callback, TrainerView

RESID_SITES = ("embed", "final")
METRICS = ("kurtosis", "mmr")


def residual_max(record: dict[str, Any], metric: str) -> float | None:
    """Largest finite `of/<metric>/<site>` over the residual sites (embed, block_NN, final),
    or None when the record has none (not a metric step)."""
    prefix = f"of/{metric}/"
    values = [
        float(v)
        for k, v in record.items()
        if k.startswith(prefix)
        and (k[len(prefix) :] in RESID_SITES or k[len(prefix) :].startswith("block_"))
        and isinstance(v, int | float)
        and math.isfinite(v)
    ]
    return max(values) if values else None


class OFAlarmCallback(Callback):
    """Warns (console, record) and optionally checkpoints the first time a residual kurtosis
    or MMR threshold of the `metrics` section is crossed."""

    def __init__(self, thresholds: dict[str, float], checkpoint: bool = False) -> None:
        self.thresholds = {m: t for m, t in thresholds.items() if t > 0}
        self.checkpoint = checkpoint
        self.fired: set[str] = set()

    def post_step(self, trainer: TrainerView, step: int, record: dict[str, Any]) -> None:
        crossed = []
        for metric, threshold in self.thresholds.items():
            value = residual_max(record, metric)
            if metric in self.fired or value is None or value <= threshold:
                continue
            self.fired.add(metric)
            record[f"alarm/{metric}"] = value
            crossed.append(f"max residual {metric} {value:.4g} > {threshold:g}")
        if not crossed:
            return
        message = f"outlier-feature alarm at step {step}: " + "; ".join(crossed)
        record["alarm"] = message
        trainer.log(f"warning: {message}")
        if self.checkpoint:
            # Collective: every rank has the same record (the metrics are reduced over the mesh).
            path = trainer.save_checkpoint(f"alarm_step_{step:06d}")
            trainer.log(f"alarm checkpoint written: {path}")

    def shard_state(self, trainer: TrainerView) -> dict[str, Any] | None:
        return {"fired": [1.0 if m in self.fired else 0.0 for m in METRICS]}

    def load_shard_state(self, trainer: TrainerView, state: dict[str, Any] | None) -> None:
        fired = state["fired"] if state else [0.0] * len(METRICS)
        self.fired = {m for m, f in zip(METRICS, fired) if float(f) > 0}
